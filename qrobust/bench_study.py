"""`qrobust bench study`: a rehearsal of the whole degradation study on random weights, no hub.

Builds the random-weight pair at a real shape (an AR model and its diffusion twin, both with the
built-in tokenizer), then runs what `qrobust sweep` runs for each config — load, calibrate and
quantize (with hawq's sensitivity analysis timed on its own), held-out loss, generate, execute —
over `limit` problems per benchmark, every generation forced to full length (min_new_tokens =
max_new_tokens, so the figures are upper bounds), with each kind's settings taken from the preset
of the model it stands for (Qwen3-1.7B, CoDA-1.7B-Instruct). Throughput of each quantized config
is compared with full precision measured in the same run, and the whole study's time is projected
from the per-problem rates measured.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from qrobust.bench import QuantBench, check_device, random_lm, shape_config
from qrobust.errors import QrobustError
from qrobust.sweep import (METHODS, Job, SweepConfig, baseline_job, environment, eval_config_for, generation_settings,
                           likelihood, quantize_for, validate)

# The study projected: two models, every method at 2/3/4 bits plus the baseline, one seed, HumanEval (164)
# and MBPP's test split (500).
STUDY_METHODS, STUDY_BITS, STUDY_PROBLEMS = tuple(METHODS), (2, 3, 4), {"humaneval": 164, "mbpp": 500}
# Each kind of random model stands for one registered model and takes its evaluation preset.
STANDS_FOR = {"ar": "qwen3-1.7b", "diffusion": "coda-instruct"}
STAGES = ("load", "hawq_analysis", "quantize", "likelihood", "warmup", "generate", "execute")
# the diffusion kind's warm-up generation: one fast-sampler block, whose graphs every later block replays
WARMUP_TOKENS = 32


@dataclass
class StudyBench:
    shape: str = "qwen3-1.7b"
    kinds: tuple[str, ...] = ("ar", "diffusion")
    methods: tuple[str, ...] = tuple(METHODS)
    bits: tuple[int, ...] = (2, 3, 4)
    benchmarks: tuple[str, ...] = ("humaneval", "mbpp")
    limit: int = 8  # problems per benchmark
    batch_size: int = 8
    device: str = "cuda"
    layers: int | None = None  # fewer blocks than the real shape (quick runs)
    vocab_size: int | None = None
    # generation settings over each preset (None: the preset's), as in `qrobust sweep`
    generation: dict = field(default_factory=dict)
    group_size: int = 128
    nsamples: int = 32
    seqlen: int = 512
    hawq_probes: int = 32
    hawq_probes_per_backward: int = 4
    workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in STANDS_FOR]
        if bad or not self.kinds:
            raise QrobustError(f"unknown kind(s) {bad or list(self.kinds)}: use ar, diffusion or both")
        if self.limit < 1 or self.batch_size < 1:
            raise QrobustError(f"--limit and --batch-size must be at least 1, got {self.limit} and {self.batch_size}")

    def sweep_config(self) -> SweepConfig:
        """The sweep these measurements stand for (calibration, hawq, evaluation settings)."""
        return SweepConfig(models=tuple(STANDS_FOR[k] for k in self.kinds), bits=self.bits, methods=self.methods,
                           benchmarks=self.benchmarks, seeds=(self.seed,), limit=self.limit,
                           group_size=self.group_size, nsamples=self.nsamples, seqlen=self.seqlen,
                           batch_size=self.batch_size, hawq_probes=self.hawq_probes,
                           hawq_probes_per_backward=self.hawq_probes_per_backward, device=self.device,
                           workers=self.workers, **self.generation)


def builtin_tokenizer():
    from qrobust.models.files import load_tokenizer
    from qrobust.models.loading import MODELS, resolve_source

    return load_tokenizer(resolve_source(MODELS["tiny-ar"].name))


def build_pair(bench: StudyBench, root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """The random-weight models, one per kind, saved where load_model reads them."""
    from qrobust.models.files import save_native

    tokenizer = builtin_tokenizer()
    dirs = {}
    for kind in bench.kinds:
        cfg = shape_config(QuantBench(shape=bench.shape, kind=kind, layers=bench.layers, vocab_size=bench.vocab_size))
        model = random_lm(cfg, bench.device, bench.seed, dtype).cpu()  # drawn on the device, saved from the host
        dirs[kind] = save_native(model, tokenizer, root / f"{bench.shape}-{kind}")
        del model
    return dirs


class Stages:
    """Seconds per stage of one config; on CUDA each boundary synchronizes."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, fn, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        return out


def generate_and_execute(adapter, settings, sweep: SweepConfig, stages: Stages) -> dict:
    """Every benchmark's problems generated at full length, then sanitized and executed."""
    from harness.evaluate import generate_samples, sanitize_samples
    from harness.execute import execute_samples
    from harness.sandbox import Limits
    from harness.tasks import get_task

    config = replace(eval_config_for(sweep, settings, sweep.seeds[0]), min_new_tokens=settings.max_new_tokens)
    # The first call of each kernel compiles it (Triton) and of each shape captures its graph: costs
    # that would land in whichever config first runs them (the bf16 baseline, which then looked
    # slower than it is). A generation of the first batch pays them first, as its own stage: for
    # diffusion one block; for AR the full length, since the AR engine captures a graph per
    # cache-length bucket and compiles some kernels per bucket (attention's split count).
    first = get_task(sweep.benchmarks[0])
    warm = settings.max_new_tokens if adapter.kind == "ar" else min(WARMUP_TOKENS, settings.max_new_tokens)
    stages.run("warmup", generate_samples, adapter, first, first.problems(sweep.limit)[:sweep.batch_size],
               replace(config, max_new_tokens=warm, min_new_tokens=warm), first.check_style(settings.style), False)
    problems = tokens = 0
    for name in sweep.benchmarks:
        task = get_task(name)
        style = task.check_style(settings.style)
        todo = task.problems(sweep.limit)
        samples, stats = stages.run("generate", generate_samples, adapter, task, todo, config, style, False)
        sanitized = sanitize_samples(samples, task, todo, style)
        stages.run("execute", execute_samples, sanitized, task, todo, sweep.workers,
                   Limits(timeout=config.timeout), style, False)
        problems += len(todo)
        tokens += stats["tokens"]
    return {"problems": problems, "tokens": tokens}


def measure_kind(kind: str, model_dir: Path, bench: StudyBench, out_dir: Path,
                 on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """One row per config of this kind: its stage seconds, problems and generated tokens; on_row
    sees each row as soon as it is measured."""
    from hawq import AnalysisCache
    from qrobust.models import load_model

    sweep = bench.sweep_config()
    out_dir.mkdir(parents=True, exist_ok=True)
    stands_for = STANDS_FOR[kind]
    settings = generation_settings(sweep, stands_for)
    device = torch.device(bench.device)
    load = Stages(device)
    base = load.run("load", load_model, str(model_dir), device=bench.device, dtype=settings.dtype,
                    sampler=settings.sampler())
    prompts = prompt_tokens(base, settings, sweep)
    full = baseline_job(sweep, stands_for, bench.seed)
    # every method at the first width before any at the next, so a run stopped early has measured each method
    jobs = [full] + [Job(stands_for, m, b, bench.seed) for b in bench.bits for m in bench.methods]
    analyses = AnalysisCache()  # in memory: the first hawq config pays for the analysis, as in a sweep
    rows = []
    for job in jobs:
        stages = Stages(device)
        if job is full:
            stages.seconds["load"] = load.seconds["load"]
        t0 = time.perf_counter()
        adapter, facts = stages.run("quantize", quantize_for, job, base, sweep, out_dir, False, analyses)
        if facts.get("hawq_analysis_seconds"):
            stages.seconds["hawq_analysis"] = facts["hawq_analysis_seconds"]
            stages.seconds["quantize"] -= facts["hawq_analysis_seconds"]
        if job is full:
            stages.seconds["quantize"] = time.perf_counter() - t0  # the copy of the base model only
        stages.run("likelihood", likelihood, adapter, sweep.seqlen, batch_size=sweep.batch_size)
        adapter.for_generation()  # as a sweep's evaluation
        counts = generate_and_execute(adapter, settings, sweep, stages) if sweep.benchmarks else \
            {"problems": 0, "tokens": 0}
        rows.append({"kind": kind, "stands_for": stands_for, "method": job.method, "bits": job.bits,
                     "avg_bits": facts.get("avg_bits"), **counts, "stages": stages.seconds,
                     "tokens_per_second": counts["tokens"] / stages.seconds["generate"]
                     if stages.seconds.get("generate") else None, "mean_prompt_tokens": prompts})
        with_ratios(rows)
        on_row(rows[-1])
        del adapter
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's generation throughput against the full-precision row of its kind (its first)."""
    first: dict[str, float | None] = {}
    for r in rows:
        base = first.setdefault(r["kind"], r["tokens_per_second"])
        r["throughput_vs_full"] = r["tokens_per_second"] / base if base and r["tokens_per_second"] else None
    return rows


def prompt_tokens(adapter, settings, sweep: SweepConfig) -> float:
    """Mean prompt length in tokens over the problems generated (for scaling to other lengths)."""
    from harness.tasks import get_task

    lengths = []
    for name in sweep.benchmarks:
        task = get_task(name)
        style = task.check_style(settings.style)
        chat = adapter.apply_chat_template if style == "instruct" else None
        lengths += [len(adapter.tokenizer(task.prompt(p, style, chat)).input_ids) for p in task.problems(sweep.limit)]
    return sum(lengths) / len(lengths) if lengths else 0.0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


PROJECTION_NOTE = ("random weights, every generation at full length: an upper bound on generation; execution "
                   "of random text fails fast, so real execution (tests that run, time-outs) costs more")


def project(rows: list[dict], bench: StudyBench) -> dict:
    """The whole study's time from the measured rates: per model, load once, hawq's analysis once,
    and for each of its 10 configs quantize + held-out loss + warm-up + (generate + execute) × 664 problems.
    A config not measured here takes the mean of the measured quantized configs of its method (or of
    all measured quantized configs). Generation is also scaled to each preset's full length where
    --max-new-tokens or --steps made it shorter: linear in new tokens (AR decoding), and in steps ×
    (prompt + new tokens) for diffusion, whose every step runs the whole sequence; an estimate that
    ignores prefill and attention's quadratic term. The fast sampler's steps run a block each, so
    it scales with new tokens like AR decoding (an upper bound: random weights commit one token per step)."""
    from qrobust.models.loading import preset_for

    sweep = bench.sweep_config()
    n_study = sum(STUDY_PROBLEMS.values())
    per_kind = {}
    for kind in bench.kinds:
        mine = [r for r in rows if r["kind"] == kind]
        full, quantized = mine[0], mine[1:]
        settings, preset = generation_settings(sweep, STANDS_FOR[kind]), preset_for(STANDS_FOR[kind])
        scale = preset.max_new_tokens / settings.max_new_tokens
        if kind == "diffusion" and settings.diffusion_sampler == "exact":
            prompt = full.get("mean_prompt_tokens", 0.0)
            scale = ((preset.steps or preset.max_new_tokens) * (prompt + preset.max_new_tokens)) / \
                ((settings.steps or settings.max_new_tokens) * (prompt + settings.max_new_tokens))

        def rate(r: dict, stage: str) -> float:
            return r["stages"].get(stage, 0.0) / r["problems"] if r["problems"] else 0.0

        def like(method: str) -> dict:
            same = [r for r in quantized if r["method"] == method] or quantized or [full]
            return {s: _mean([r["stages"].get(s, 0.0) for r in same]) for s in ("quantize", "likelihood", "warmup")} | \
                {"generate_rate": _mean([rate(r, "generate") for r in same]),
                 "execute_rate": _mean([rate(r, "execute") for r in same])}

        def own(r: dict) -> dict:
            return {"quantize": r["stages"]["quantize"], "likelihood": r["stages"]["likelihood"],
                    "warmup": r["stages"].get("warmup", 0.0), "generate_rate": rate(r, "generate"),
                    "execute_rate": rate(r, "execute")}

        configs = [("full", own(full))]
        measured = {(r["method"], r["bits"]): r for r in quantized}
        for m in STUDY_METHODS:
            for b in STUDY_BITS:
                r = measured.get((m, b))
                configs.append((f"{m}-{b}", own(r) if r else like(m)))
        # the first hawq config runs the analysis, later ones read it from the cache (~0 s)
        analysis = max((r["stages"]["hawq_analysis"] for r in quantized if "hawq_analysis" in r["stages"]),
                       default=None)
        fixed = full["stages"]["load"] + (analysis or 0.0)
        each = sum(c["quantize"] + c["likelihood"] + c["warmup"] + n_study * c["execute_rate"] for _, c in configs)
        generate = sum(n_study * c["generate_rate"] for _, c in configs)
        per_kind[kind] = {
            "stands_for": STANDS_FOR[kind], "configs": len(configs), "measured_configs": 1 + len(measured),
            "hawq_analysis_measured": analysis is not None, "problems": n_study,
            "seconds_as_measured": fixed + each + generate, "seconds_at_preset": fixed + each + generate * scale,
            "generation_scale_to_preset": scale,
            "settings": settings.record(), "preset": preset.record(),
        }
    return _projection(per_kind)


def _projection(models: dict[str, dict]) -> dict:
    """The study's projection from its models' (kinds') projections."""
    return {"models": models, "seconds_as_measured": sum(k["seconds_as_measured"] for k in models.values()),
            "seconds_at_preset": sum(k["seconds_at_preset"] for k in models.values()), "note": PROJECTION_NOTE}


def bench_study(bench: StudyBench, work_dir: str | Path | None = None, out: str | Path | None = None) -> dict:
    from qrobust.precision import resolve_dtype

    check_device(bench.device)
    sweep = bench.sweep_config()
    validate(replace(sweep, models=()))  # bits, methods, benchmarks, settings: before any work
    for model in sweep.models:
        generation_settings(sweep, model).sampler()
    root = Path(work_dir or tempfile.mkdtemp(prefix="qrobust-study-"))
    dtype = resolve_dtype(bench.generation.get("dtype"), bench.device)
    t0 = time.perf_counter()
    dirs = build_pair(bench, root, dtype)
    results = {"bench": asdict(bench), "build_seconds": time.perf_counter() - t0,
               "environment": environment(bench.device), "rows": []}

    def on_row(row: dict) -> None:  # each config is written as it finishes, so a stopped run keeps it
        results["rows"].append(row)
        write(results, out)
        print(progress_line(row), file=sys.stderr, flush=True)

    for kind, model_dir in dirs.items():
        measure_kind(kind, model_dir, bench, root / f"sweep-{kind}", on_row)
    results["projection"] = project(results["rows"], bench)
    write(results, out)
    return results


def write(results: dict, out: str | Path | None) -> None:
    """The results as JSON at `out` (nothing without one)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))


def progress_line(row: dict) -> str:
    stages = ", ".join(f"{s} {row['stages'][s]:.1f}s" for s in STAGES if s in row["stages"])
    tps = f", {row['tokens_per_second']:.0f} tok/s" if row["tokens_per_second"] else ""
    return f"[{row['kind']}] {row['method']}-{row['bits']}: {stages}{tps}"


def _bench_of(run: dict, kinds: tuple[str, ...]) -> StudyBench:
    b = run["bench"]
    return StudyBench(**{**b, "kinds": kinds, "methods": tuple(b["methods"]), "bits": tuple(b["bits"]),
                         "benchmarks": tuple(b["benchmarks"])})


def merge(paths: list[str | Path], out: str | Path | None = None) -> dict:
    """One result from runs of separate kinds (e.g. each within a device's time limit): their rows
    together, each kind projected with its own run's settings (one run's --diffusion-sampler fast
    is not another's), written to `out`. Each kind must come from one file."""
    runs = []
    for p in paths:
        try:
            runs.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise QrobustError(f"cannot read bench study results {p}: {e}; give files written by --out") from None
    run_kinds = [tuple(dict.fromkeys(r["kind"] for r in run.get("rows", []))) for run in runs]
    kinds = [k for ks in run_kinds for k in ks]
    if len(set(kinds)) != len(kinds) or not kinds:
        raise QrobustError(f"the files hold the kinds {kinds}: merge runs of different kinds, each with rows")
    rows = with_ratios([r for run in runs for r in run["rows"]])
    models = {}
    for run, ks in zip(runs, run_kinds):
        if ks:
            models |= project([r for r in rows if r["kind"] in ks], _bench_of(run, ks))["models"]
    projection = _projection(models)
    results = {"bench": asdict(_bench_of(runs[0], tuple(kinds))), "runs": [run["bench"] for run in runs],
               "merged_from": [str(p) for p in paths], "environment": runs[0].get("environment"), "rows": rows,
               "projection": projection}
    write(results, out)
    return results


def summary_lines(results: dict) -> list[str]:
    head = f"{'kind':<10} {'config':<9} {'problems':>8} {'tokens':>7} " + \
        " ".join(f"{s:>13}" for s in STAGES) + f" {'tok/s':>8} {'vs full':>7}"
    lines = [head]
    for r in results["rows"]:
        stages = " ".join(f"{r['stages'][s]:>12.2f}s" if s in r["stages"] else f"{'-':>13}" for s in STAGES)
        tps = f"{r['tokens_per_second']:>8.1f}" if r["tokens_per_second"] else f"{'-':>8}"
        ratio = f"{r['throughput_vs_full']:>6.2f}x" if r["throughput_vs_full"] else f"{'-':>7}"
        lines.append(f"{r['kind']:<10} {r['method'] + '-' + str(r['bits']):<9} {r['problems']:>8} {r['tokens']:>7} "
                     f"{stages} {tps} {ratio}")
    p = results.get("projection")
    if p:
        for kind, k in p["models"].items():
            lines.append(f"projected {kind} ({k['stands_for']}, {k['configs']} configs, "
                         f"{k['measured_configs']} measured, {k['problems']} problems): "
                         f"{k['seconds_as_measured'] / 3600:.2f} h as measured, "
                         f"{k['seconds_at_preset'] / 3600:.2f} h at its preset "
                         f"(generation x{k['generation_scale_to_preset']:.2f})")
        lines.append(f"projected study: {p['seconds_as_measured'] / 3600:.2f} h as measured, "
                     f"{p['seconds_at_preset'] / 3600:.2f} h at the presets ({p['note']})")
    return lines
