import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from harness.metrics import bootstrap_pooled_quantile
from qrobust.cli import main
from qrobust.degradation import DegradationConfig, degradation, flips, prepare, problem_tokens
from qrobust.models import load_model
from qrobust.quant import QuantizeConfig, quantize_model

CONFIG = DegradationConfig(benchmarks=("humaneval",), limit=3, context_tokens=48, solution_tokens=24, batch_size=4)


def _rtn(adapter, bits=2):
    q = copy.deepcopy(adapter)
    quantize_model(q, QuantizeConfig(method="rtn", bits=bits, group_size=32), progress=False)
    return q


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {kind: load_model(str(path)) for kind, path in tiny_dirs.items()}


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_model_against_itself_has_zero_kl_and_full_agreement(models, kind):
    base = models[kind]
    out = degradation(copy.deepcopy(base), CONFIG, base=base)["humaneval"]
    m = out["metrics"]
    assert m["kl"]["value"] == pytest.approx(0, abs=1e-6) and m["kl_p99"]["value"] == pytest.approx(0, abs=1e-6)
    assert m["top1_agreement"]["value"] == 1.0
    loss = "solution_nll" if kind == "ar" else "solution_nelbo"
    assert m[f"{loss}_delta"]["value"] == pytest.approx(0, abs=1e-6) and m[loss]["value"] > 0
    assert out["problems"] == 3 and len(out["per_problem"]["kl"]) == 3


def test_ar_kl_and_nll_match_a_hand_computation(models):
    base = models["ar"]
    quant = _rtn(base)
    out = degradation(quant, CONFIG, base=base)["humaneval"]["per_problem"]
    task_id, prompt, solution = problem_tokens(base, "humaneval", CONFIG)[0]
    ids = torch.tensor([prompt + solution])
    with torch.no_grad():
        p = torch.log_softmax(base.logits(ids)[0, len(prompt) - 1:-1].double(), -1)
        q = torch.log_softmax(quant.logits(ids)[0, len(prompt) - 1:-1].double(), -1)
    targets = ids[0, len(prompt):]
    kl = (p.exp() * (p - q)).sum(-1)
    assert out["task_id"][0] == task_id and out["tokens"][0] == len(solution) == 24
    assert out["kl"][0] == pytest.approx(float(kl.mean()), rel=1e-4) and out["kl"][0] > 0
    assert out["loss"][0] == pytest.approx(float(-q.gather(-1, targets[:, None]).mean()), rel=1e-4)
    assert out["baseline_loss"][0] == pytest.approx(float(-p.gather(-1, targets[:, None]).mean()), rel=1e-4)
    assert out["top1_agreement"][0] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).double().mean()))


def test_diffusion_masks_are_identical_across_configs_and_seeded(models):
    base = models["diffusion"]
    rows = prepare(base, CONFIG)["humaneval"].rows
    again = prepare(_rtn(base), CONFIG)["humaneval"].rows  # another config of the same model
    other = prepare(base, DegradationConfig(**{**CONFIG.__dict__, "seed": 1}))["humaneval"].rows
    assert len(rows) == 3 * CONFIG.masks
    assert all(torch.equal(a.ids, b.ids) and torch.equal(a.reads, b.reads) for a, b in zip(rows, again))
    assert any(not torch.equal(a.ids, b.ids) for a, b in zip(rows, other))
    ratios = sorted(1 / (r.weight * CONFIG.masks) for r in rows if r.problem == 0)
    assert ratios[0] < 0.5 < ratios[-1]  # one mask per stratum of (0, 1)
    masked = [(r.ids == base.mask_token_id).nonzero().squeeze(-1) for r in rows]
    assert all(torch.equal(m - 1 if base.shift_logits else m, r.reads) for m, r in zip(masked, rows))


def test_flips_and_mcnemar_on_hand_made_results():
    base = {f"t{i}": i < 6 for i in range(10)}  # t0..t5 pass
    quant = {**base, "t0": False, "t1": False, "t2": False, "t9": True}
    f = flips(base, quant)
    assert f["problems"] == 10 and f["pass_to_fail"]["value"] == 3 and f["fail_to_pass"]["value"] == 1
    assert f["p_value"] == pytest.approx(0.625)  # 2 · P(X ≤ 1), X ~ Bin(4, 1/2) = 2 · 5/16
    same = flips(base, base)
    assert same["pass_to_fail"]["value"] == same["fail_to_pass"]["value"] == 0 and same["p_value"] == 1.0


def test_pooled_quantile_bootstrap_resamples_problems():
    per_problem = [np.zeros(50), np.ones(50)]
    est = bootstrap_pooled_quantile(per_problem, 0.99, n_boot=200)
    assert est.value == 1.0 and est.low == 0.0 and est.high == 1.0  # a resample can hold problem 0 twice


@pytest.mark.slow  # test_sweep.py's sweep checks the rows and report section in the default suite
def test_sweep_rows_and_report_carry_the_metrics(tmp_path, tiny_dirs):
    out = tmp_path / "sweep"
    args = ["sweep", "--models", str(tiny_dirs["ar"]), "--bits", "2", "--methods", "rtn", "--benchmarks", "humaneval",
            "--seeds", "0,1", "--limit", "3", "--gen-limit", "2", "--group-size", "32", "--nsamples", "2",
            "--calib-seqlen", "256", "--max-new-tokens", "4", "--metrics-context", "32", "--metrics-solution", "16",
            "--out", str(out)]
    assert main(args) == 0
    df = pd.read_csv(out / "results.csv")
    he = df[df.benchmark == "humaneval"]
    rtn, base = he[he.method == "rtn"], he[he.method == "fp32"]
    expected = {"kl", "kl_p99", "top1_agreement", "solution_nll", "solution_nll_delta", "flips_pass_to_fail",
                "flips_fail_to_pass", "pass@1"}
    assert expected <= set(rtn.metric) and len(rtn[rtn.metric == "kl"]) == 2  # one row per seed
    assert (rtn[rtn.metric == "kl"].value > 0).all() and rtn[rtn.metric == "kl"].ci_low.notna().all()
    assert (rtn[rtn.metric == "kl"].problems == 3).all() and (rtn[rtn.metric == "pass@1"].problems == 2).all()
    assert rtn[rtn.metric == "flips_pass_to_fail"].p_value.between(0, 1).all()
    assert (base[base.metric == "kl"].value == 0).all() and (base[base.metric == "top1_agreement"].value == 1).all()
    # the baseline's own solution NLL is the one each quantized config is paired with
    rec = json.loads((out / "configs" / f"{rtn.config_id.iloc[0]}.json").read_text())
    nll = base[base.metric == "solution_nll"].value.iloc[0]
    assert np.mean(rec["degradation"]["humaneval"]["per_problem"]["baseline_loss"]) == pytest.approx(nll)
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Degradation on the benchmark problems" in text and "degradation_humaneval.png" in text
    assert (out / "degradation_humaneval.png").exists() and "first 2 problems" in text
    table = pd.read_csv(out / "degradation.csv")
    row = table[table.method == "rtn"].iloc[0]
    assert row.seeds == 2 and row.kl == pytest.approx(rtn[rtn.metric == "kl"].value.mean())
    assert row.kl_low <= row.kl <= row.kl_high


def test_eval_baseline_computes_metrics_and_flips_against_an_earlier_run(tmp_path, tiny_dirs, capsys):
    model = str(tiny_dirs["diffusion"])
    common = ["--benchmarks", "humaneval", "--limit", "2", "--max-new-tokens", "4", "--metrics-context", "32",
              "--metrics-solution", "16"]
    assert main(["eval", "--model", model, *common, "--out", str(tmp_path / "fp")]) == 0
    assert main(["quantize", "--model", model, "--method", "rtn", "--bits", "2", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    assert main(["eval", "--model", model, "--quantized", str(tmp_path / "q"), *common,
                 "--baseline", str(tmp_path / "fp"), "--out", str(tmp_path / "qe")]) == 0
    result = json.loads((tmp_path / "qe" / "degradation.json").read_text())["humaneval"]
    assert result["baseline_model"] == model and result["problems"] == 2
    assert result["metrics"]["kl"]["value"] > 0 and "solution_nelbo_relative" in result["metrics"]
    assert result["flips"]["problems"] == 2 and 0 <= result["flips"]["p_value"] <= 1
    assert "flips pass→fail" in capsys.readouterr().out
    assert main(["eval", "--model", model, *common, "--baseline", str(tmp_path / "q"),
                 "--out", str(tmp_path / "x")]) == 2


def test_sweep_metrics_use_the_prompt_style_the_config_generates_in():
    """A preset that generates from chat prompts (CoDA's instruct style) is scored on those prompts."""
    from qrobust.models.presets import EvalPreset
    from qrobust.sweep import SweepConfig, degradation_config

    assert degradation_config(SweepConfig(), EvalPreset(style="instruct")).style == "instruct"
    assert degradation_config(SweepConfig(), EvalPreset()).style is None


def test_eval_fused_for_generation_matches_its_unfused_baseline(tmp_path, tiny_dirs, request):
    """`qrobust eval` readies the model for generation (on CUDA; forced here): the fused model
    generates the unfused one's completions, and its metrics against that run find no change."""
    model = str(tiny_dirs["ar"])
    common = ["--benchmarks", "humaneval", "--limit", "2", "--max-new-tokens", "8", "--metrics-context", "32",
              "--metrics-solution", "16"]
    assert main(["eval", "--model", model, *common, "--out", str(tmp_path / "plain")]) == 0
    fused = request.getfixturevalue("forced_fusion")  # from here on
    assert main(["eval", "--model", model, *common, "--baseline", str(tmp_path / "plain"),
                 "--out", str(tmp_path / "fused")]) == 0
    assert fused == [2 * 2]  # q/k/v and gate/up in each of the two blocks

    def completions(run: str) -> list[str]:
        return [json.loads(x)["completion"] for x in (tmp_path / run / "humaneval" / "samples.jsonl").open()]

    assert completions("fused") == completions("plain")
    result = json.loads((tmp_path / "fused" / "degradation.json").read_text())["humaneval"]
    assert result["metrics"]["kl"]["value"] == pytest.approx(0, abs=1e-6)
    assert result["metrics"]["top1_agreement"]["value"] == 1
