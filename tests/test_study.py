"""Faithful settings (dtype by device, the baseline's name, presets and flags), hawq's analysis
served once for every budget, and the `bench study` rehearsal on the tiny shape."""
import json
import types

import pytest
import torch

from hawq import AnalysisCache, hutchinson_traces
from qrobust.cli import build_parser, main
from qrobust.errors import QrobustError
from qrobust.models import load_model
from qrobust.models.loading import MODELS, preset_for
from qrobust.models.presets import CODA_PRESET, DEFAULT_PRESET, with_overrides
from qrobust.models.tiny import build_tiny
from qrobust.precision import baseline_label, default_dtype, resolve_dtype
from qrobust.sweep import Job, SweepConfig, eval_config_for, generation_settings, plan_jobs, quantize_for

MICRO = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def micro_ar(tmp_path_factory, tokenizer):
    return build_tiny("ar", tokenizer, tmp_path_factory.mktemp("micro") / "ar", seed=3, **MICRO)


def test_presets_match_the_published_settings_and_flags_override_them_field_by_field():
    coda = preset_for("coda-instruct")
    assert (coda.style, coda.max_new_tokens, coda.steps, coda.alg, coda.temperature, coda.top_p) == \
        ("instruct", 768, 768, "entropy", 0.1, 0.9)
    assert preset_for("coda-base") == coda and "published" in coda.source
    qwen = preset_for("qwen3-1.7b")
    assert qwen.max_new_tokens == 768 and qwen.style == "instruct" and "our choice" in qwen.source
    assert all(MODELS[m].preset.max_new_tokens != 128 for m in ("qwen3-1.7b", "coda-instruct", "coda-base"))
    assert preset_for("tiny-ar").max_new_tokens == 128 and preset_for("/some/dir") == DEFAULT_PRESET
    mine = with_overrides(CODA_PRESET, {"max_new_tokens": 64, "temperature": None, "diffusion_sampler": "fast"})
    assert (mine.max_new_tokens, mine.temperature, mine.steps, mine.diffusion_sampler) == (64, 0.1, 768, "fast")
    assert "overridden: diffusion_sampler, max_new_tokens" in mine.source
    with pytest.raises(QrobustError, match="diffusion sampler"):
        with_overrides(CODA_PRESET, {"diffusion_sampler": "quick"})


def test_dtype_follows_the_device_and_names_the_baseline(tiny_dirs, monkeypatch):
    import qrobust.precision as precision

    assert (default_dtype("cpu"), default_dtype("cuda")) == ("float32", "bfloat16")  # the suite pins CPUs
    monkeypatch.delenv("QROBUST_CPU_DTYPE")
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        assert default_dtype("cpu") == expected and default_dtype("cuda") == "bfloat16"
    monkeypatch.setenv("QROBUST_CPU_DTYPE", "fp16")
    assert default_dtype("cpu") == "float16"
    monkeypatch.setenv("QROBUST_CPU_DTYPE", "float32")
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype(None, "cuda") is torch.bfloat16
    assert next(load_model(str(tiny_dirs["ar"])).model.parameters()).dtype is torch.float32
    with pytest.raises(QrobustError, match="unknown dtype"):
        resolve_dtype("float8", "cpu")
    cpu = plan_jobs(SweepConfig(models=("tiny-ar",), methods=("rtn",), bits=(4,), seeds=(0,)))
    cuda = plan_jobs(SweepConfig(models=("tiny-ar",), methods=("rtn",), bits=(4,), seeds=(0,), device="cuda"))
    half = plan_jobs(SweepConfig(models=("tiny-ar",), methods=("rtn",), bits=(4,), seeds=(0,), dtype="float16"))
    assert [(j.method, j.bits) for j in cpu] == [("fp32", 32), ("rtn", 4)]
    assert (cuda[0].method, cuda[0].bits, half[0].method, half[0].bits) == ("bf16", 16, "fp16", 16)
    assert baseline_label(torch.bfloat16) == "bf16"


SWEEP_FLAGS = ["--models", "coda-instruct", "--dtype", "bf16", "--style", "instruct", "--max-new-tokens", "64",
               "--temperature", "0.3", "--top-p", "0.5", "--steps", "16", "--block-length", "32", "--alg", "margin",
               "--diffusion-sampler", "fast", "--threshold", "0.8", "--n-samples", "2"]


def test_sweep_flags_reach_the_eval_and_sampler_configs(monkeypatch, tmp_path):
    import qrobust.sweep as sw

    seen = {}
    monkeypatch.setattr(sw, "sweep", lambda config, *a, **k: seen.setdefault("config", config) and tmp_path)
    assert main(["sweep", *SWEEP_FLAGS, "--out", str(tmp_path)]) == 0
    config = seen["config"]
    settings = generation_settings(config, "coda-instruct")
    ev, sampler = eval_config_for(config, settings, seed=5), settings.sampler()
    assert (ev.style, ev.max_new_tokens, ev.temperature, ev.top_p, ev.n_samples, ev.seed) == \
        ("instruct", 64, 0.3, 0.5, 2, 5)
    assert (sampler.steps, sampler.block_length, sampler.alg, sampler.mode, sampler.threshold) == \
        (16, 32, "margin", "fast", 0.8)
    assert settings.dtype == "bfloat16" and settings.record()["diffusion_sampler"] == "fast"
    # eval takes the same flags through the same function
    eval_args = build_parser().parse_args(["eval", "--model", "m", "--out", "o", *SWEEP_FLAGS[2:]])
    assert {k: getattr(eval_args, k) for k in ("max_new_tokens", "steps", "diffusion_sampler", "threshold")} == \
        {"max_new_tokens": 64, "steps": 16, "diffusion_sampler": "fast", "threshold": 0.8}


def test_eval_loads_in_the_preset_dtype_with_the_preset_sampler(monkeypatch, tmp_path):
    import harness
    import qrobust.models

    seen = {}
    adapter = types.SimpleNamespace(for_generation=lambda: 0)  # what eval asks of the model besides evaluate
    monkeypatch.setattr(qrobust.models, "load_model", lambda name, **kw: seen.update(kw) or adapter)
    monkeypatch.setattr(harness, "evaluate",
                        lambda adapter, config, out, name: seen.update(config=config) or {"benchmarks": {}})
    assert main(["eval", "--model", "coda-instruct", "--device", "cpu", "--out", str(tmp_path), "--steps", "32"]) == 0
    assert seen["dtype"] is None and seen["sampler"].steps == 32 and seen["sampler"].alg == "entropy"
    assert seen["config"].max_new_tokens == 768 and seen["config"].style == "instruct"
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["steps"] == 32


def test_hawq_analysis_runs_once_for_every_budget_and_rerun(micro_ar, tmp_path, monkeypatch):
    import hawq.cache

    calls = []
    real = hawq.cache.analyse
    monkeypatch.setattr(hawq.cache, "analyse", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = load_model(str(micro_ar))
    config = SweepConfig(models=(str(micro_ar),), group_size=16, nsamples=2, seqlen=16, hawq_probes=3,
                         hawq_probes_per_backward=1)
    cache = AnalysisCache(tmp_path / "hawq")
    avg = [quantize_for(Job(str(micro_ar), "hawq", b, 0), base, config, tmp_path, analyses=cache)[1]["avg_bits"]
           for b in (2, 4)]
    assert len(calls) == 1 and cache.computed == 1 and avg[0] <= 2 + 1e-9 < avg[1] <= 4 + 1e-9
    assert len(list((tmp_path / "hawq").glob("*.json"))) == 1 and len(list((tmp_path / "plans").glob("*.json"))) == 2
    rerun = AnalysisCache(tmp_path / "hawq")  # a new process: served from disk
    quantize_for(Job(str(micro_ar), "hawq", 3, 0), base, config, tmp_path, analyses=rerun)
    assert len(calls) == 1 and rerun.computed == 0


def test_bfloat16_traces_agree_with_float32_within_their_error(micro_ar, calib):
    name = "model.layers.1.self_attn.v_proj"
    batch = calib[:2, :24]
    est = {}
    for dtype in (torch.float32, torch.bfloat16):
        adapter = load_model(str(micro_ar), dtype=dtype)
        est[dtype] = hutchinson_traces(adapter, [batch], [name], max_probes=40, min_probes=40, seed=1,
                                       progress=False, loss_seed=7, probes_per_backward=4)[name]
    fp32, bf16 = est[torch.float32], est[torch.bfloat16]
    assert fp32.probes == bf16.probes == 40 and fp32.stderr < abs(fp32.mean)
    assert abs(bf16.mean - fp32.mean) < fp32.stderr, (fp32, bf16)


def tiny_study(tmp_path, *flags: str) -> dict:
    """`bench study` on the tiny shape with one HumanEval problem and 2 calibration sequences."""
    out = tmp_path / "study.json"
    assert main(["bench", "study", "--shape", "tiny", "--device", "cpu", "--bits", "4", "--benchmarks", "humaneval",
                 "--limit", "1", "--nsamples", "2", "--hawq-probes", "2", "--work-dir", str(tmp_path / "w"),
                 "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_bench_study_on_the_tiny_shape_times_every_stage_and_projects(tmp_path, capsys):
    results = tiny_study(tmp_path, "--kinds", "ar", "--methods", "rtn", "--max-new-tokens", "2",
                         "--calib-seqlen", "512")
    full, rtn = results["rows"]
    assert (full["method"], full["bits"], rtn["method"], rtn["bits"]) == ("fp32", 32, "rtn", 4)
    assert set(full["stages"]) == {"load", "quantize", "likelihood", "warmup", "generate", "execute"}
    assert set(rtn["stages"]) == {"quantize", "likelihood", "warmup", "generate", "execute"}
    assert full["tokens"] == rtn["tokens"] == 2 and rtn["throughput_vs_full"] > 0  # forced to full length
    ar = results["projection"]["models"]["ar"]
    assert (ar["stands_for"], ar["configs"], ar["measured_configs"], ar["problems"]) == ("qwen3-1.7b", 10, 2, 664)
    assert ar["generation_scale_to_preset"] == pytest.approx(768 / 2) and not ar["hawq_analysis_measured"]
    assert "projected study" in capsys.readouterr().out


def test_projection_adds_the_measured_rates_over_the_whole_study():
    from qrobust.bench_study import StudyBench, project

    def row(method, bits, **stages):
        return {"kind": "ar", "method": method, "bits": bits, "problems": 2, "stages": stages,
                "mean_prompt_tokens": 100.0}

    rows = [row("bf16", 16, load=10.0, quantize=0.0, likelihood=1.0, generate=4.0, execute=2.0),
            row("gptq", 4, quantize=20.0, likelihood=1.0, warmup=3.0, generate=2.0, execute=2.0),
            row("hawq", 3, hawq_analysis=60.0, quantize=30.0, likelihood=1.0, generate=6.0, execute=2.0),
            row("hawq", 4, hawq_analysis=0.001, quantize=30.0, likelihood=1.0, generate=6.0, execute=2.0)]
    bench = StudyBench(kinds=("ar",), methods=("gptq", "hawq"), bits=(3, 4), generation={"max_new_tokens": 384})
    ar = project(rows, bench)["models"]["ar"]
    # load + analysis once (the cached second one adds nothing); baseline; gptq x3, hawq x3, and rtn x3 (the mean
    # of the quantized rows), each over 664 problems; quantize and warm-up (which rows without one lack) per config
    per = {"full": (0.0, 1.0, 2.0, 1.0), "gptq": (23.0, 1.0, 1.0, 1.0), "hawq": (30.0, 1.0, 3.0, 1.0),
           "rtn": (83 / 3, 1.0, 7 / 3, 1.0)}
    counts = {"full": 1, "gptq": 3, "hawq": 3, "rtn": 3}
    each = sum(counts[k] * (q + lk + 664 * ex) for k, (q, lk, _, ex) in per.items())
    gen = sum(counts[k] * 664 * g for k, (_, _, g, _) in per.items())
    assert ar["measured_configs"] == 4 and ar["seconds_as_measured"] == pytest.approx(70.0 + each + gen)
    assert ar["seconds_at_preset"] == pytest.approx(70.0 + each + 2 * gen)  # 768 / 384 new tokens


@pytest.mark.slow
def test_bench_study_times_every_stage_of_every_config_and_projects_the_study(tmp_path, capsys):
    results = tiny_study(tmp_path, "--methods", "rtn,hawq", "--max-new-tokens", "4", "--steps", "2",
                         "--calib-seqlen", "256")
    rows = results["rows"]
    assert [(r["kind"], r["method"]) for r in rows] == [(k, m) for k in ("ar", "diffusion")
                                                        for m in ("fp32", "rtn", "hawq")]
    for r in rows:
        assert {"quantize", "likelihood", "warmup", "generate", "execute"} <= set(r["stages"])
        assert r["tokens"] == 4 * r["problems"] == 4  # forced to full length (the warm-up's tokens not counted)
        assert r["throughput_vs_full"] > 0
    assert all("load" in r["stages"] for r in rows if r["method"] == "fp32")
    assert all("hawq_analysis" in r["stages"] for r in rows if r["method"] == "hawq")
    p = results["projection"]
    assert set(p["models"]) == {"ar", "diffusion"} and p["models"]["diffusion"]["stands_for"] == "coda-instruct"
    for k in p["models"].values():
        assert k["configs"] == 10 and k["measured_configs"] == 3 and k["problems"] == 664
        assert k["seconds_at_preset"] > k["seconds_as_measured"] > 0  # 768 tokens cost more than 4
    assert p["models"]["ar"]["generation_scale_to_preset"] == pytest.approx(768 / 4)
    printed = capsys.readouterr().out
    assert "projected study" in printed and "hawq_analysis" in printed


def test_runs_of_separate_kinds_merge_into_one_projection(tmp_path, capsys):
    """Each config's line is printed as it finishes; two runs' files give the whole projection."""
    ar = tiny_study(tmp_path, "--kinds", "ar", "--methods", "rtn", "--max-new-tokens", "2", "--calib-seqlen", "256")
    assert "[ar] fp32-32: load" in capsys.readouterr().err
    twin = json.loads(json.dumps(ar))
    for r in twin["rows"]:
        r["kind"] = "diffusion"
    twin["bench"]["generation"] = {"diffusion_sampler": "fast", "max_new_tokens": 1}
    (tmp_path / "ar.json").write_text(json.dumps(ar))
    (tmp_path / "d.json").write_text(json.dumps(twin))
    out = tmp_path / "merged.json"
    assert main(["bench", "study", "--merge", f"{tmp_path / 'ar.json'},{tmp_path / 'd.json'}", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert set(merged["projection"]["models"]) == {"ar", "diffusion"} and len(merged["rows"]) == 4
    assert merged["projection"]["seconds_as_measured"] == pytest.approx(
        sum(k["seconds_as_measured"] for k in merged["projection"]["models"].values()))
    # each kind keeps its own run's settings: the second run's sampler and length, not the first's
    models = merged["projection"]["models"]
    assert models["diffusion"]["settings"]["diffusion_sampler"] == "fast"
    assert models["ar"]["settings"]["max_new_tokens"] == 2 and models["diffusion"]["settings"]["max_new_tokens"] == 1
    assert models["diffusion"]["generation_scale_to_preset"] == pytest.approx(768)
    assert main(["bench", "study", "--merge", f"{tmp_path / 'ar.json'},{tmp_path / 'ar.json'}"]) != 0
    assert "merge runs of different kinds" in capsys.readouterr().err


@pytest.mark.parametrize("kind,warm_tokens", [("ar", 40), ("diffusion", 32)])
def test_the_rehearsal_warms_the_ar_engine_up_at_full_length(kind, warm_tokens, monkeypatch):
    """The warm-up stage generates the first batch before the timed ones: for AR at the full length
    (a graph per cache-length bucket), for diffusion one 32-token block; then every benchmark's
    problems at the full length, forced."""
    import importlib

    from qrobust.bench_study import Stages, generate_and_execute

    evaluate, execute = (importlib.import_module(f"harness.{m}") for m in ("evaluate", "execute"))

    calls = []

    def fake_generate(adapter, task, problems, config, style, progress):
        calls.append((task.name, len(problems), config.max_new_tokens, config.min_new_tokens))
        return [], {"tokens": len(problems) * config.max_new_tokens}

    monkeypatch.setattr(evaluate, "generate_samples", fake_generate)
    monkeypatch.setattr(evaluate, "sanitize_samples", lambda samples, *args: samples)
    monkeypatch.setattr(execute, "execute_samples", lambda *args: None)
    sweep = SweepConfig(benchmarks=("humaneval", "mbpp"), limit=3, batch_size=2)
    out = generate_and_execute(types.SimpleNamespace(kind=kind), with_overrides(DEFAULT_PRESET, {"max_new_tokens": 40}),
                               sweep, Stages(torch.device("cpu")))
    assert calls == [("humaneval", 2, warm_tokens, warm_tokens), ("humaneval", 3, 40, 40), ("mbpp", 3, 40, 40)]
    assert out == {"problems": 6, "tokens": 240}
