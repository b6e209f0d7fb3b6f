"""The degradation study: every (model × method × bits × seed) config, quantized, scored, stored.

Each finished config is written atomically to configs/<id>.json as soon as it completes, so a
killed sweep (even by SIGKILL) loses only the config in flight; a re-run skips finished
configs and retries failed ones. results.parquet/.csv — one row per config × benchmark × seed —
is rebuilt from those files and is what `qrobust report` reads.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from qrobust import __version__
from qrobust.errors import QrobustError
from qrobust.models.presets import GENERATION_FIELDS, EvalPreset, with_overrides
from qrobust.precision import baseline_label, default_dtype, dtype_bits, dtype_name, is_baseline
from qrobust.resume import check_same_settings

if TYPE_CHECKING:
    from qrobust.probe import Target

@dataclass(frozen=True)
class SweepMethod:
    """How a sweep quantizes a config of one method: the quantizer of qrobust.quant it runs, and
    whether it first asks hawq for a per-layer plan under the config's bits as a budget."""
    quantizer: str
    planned: bool = False

    @property
    def calibrated(self) -> bool:
        """Whether it reads a calibration sample (so its result depends on the seed)."""
        return self.quantizer == "gptq"


METHODS: dict[str, SweepMethod] = {"gptq": SweepMethod("gptq"), "rtn": SweepMethod("rtn"),
                                   "hawq": SweepMethod("gptq", planned=True)}


@dataclass
class SweepConfig:
    models: tuple[str, ...] = ("tiny-ar", "tiny-dllm")
    bits: tuple[int, ...] = (2, 3, 4)
    methods: tuple[str, ...] = tuple(METHODS)
    benchmarks: tuple[str, ...] = ("humaneval", "mbpp")
    seeds: tuple[int, ...] = (0, 1, 2)
    limit: int | None = None
    group_size: int = 128
    nsamples: int = 32
    seqlen: int = 512
    batch_size: int = 8
    # generation settings: None takes the model's preset (qrobust.models.presets), a value overrides it
    dtype: str | None = None
    style: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    steps: int | None = None
    block_length: int | None = None
    alg: str | None = None
    diffusion_sampler: str | None = None
    threshold: float | None = None
    n_samples: int = 1
    hawq_candidates: tuple[int, ...] = (2, 3, 4, 8)
    hawq_probes: int = 32
    hawq_probes_per_backward: int = 4  # Hutchinson probes sharing one forward and first backward
    device: str = "cpu"
    workers: int = 2
    probe: bool = False  # after the configs: `qrobust probe` on each model's quantized configs
    attribution: bool = False  # after the configs: attribution of each quantized config vs full precision
    attribution_limit: int = 200  # corpus documents (evenly spaced over the built-in corpus)
    gen_limit: int | None = 1  # pass@1 over the first K problems (within --limit); None: all of them
    metrics: bool = True  # KL, top-1 agreement and solution likelihood vs the baseline (qrobust.degradation)
    metrics_context: int | None = 64  # prompt tokens the metrics keep (its end); None: all that fit
    metrics_solution: int | None = 64  # solution tokens the metrics score; None: all that fit
    metrics_masks: int = 1  # diffusion: masks per problem (paired deltas cancel most of the mask noise)
    calib_masking: str = "stratified"  # diffusion GPTQ calibration inputs: stratified masks or 'none' (clean)


@dataclass(frozen=True)
class Job:
    model: str
    method: str
    bits: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model.replace('/', '--')}__{self.method}__{self.bits}__s{self.seed}"


def generation_settings(config: SweepConfig, model: str) -> EvalPreset:
    """The model's preset with the sweep's flags applied and the dtype resolved for the device."""
    from qrobust.models.loading import preset_for

    given = {f.name: getattr(config, f.name) for f in fields(config) if f.name in GENERATION_FIELDS}
    settings = with_overrides(preset_for(model), given)
    return replace(settings, dtype=dtype_name(settings.dtype or default_dtype(config.device)))


def baseline_job(config: SweepConfig, model: str, seed: int) -> Job:
    """The full-precision config, named and sized by the dtype it runs in (bf16 16, fp32 32)."""
    dtype = generation_settings(config, model).dtype
    return Job(model, baseline_label(dtype), dtype_bits(dtype), seed)


def plan_jobs(config: SweepConfig) -> list[Job]:
    jobs = []
    for model in config.models:
        for seed in config.seeds:
            jobs.append(baseline_job(config, model, seed))
            jobs += [Job(model, m, b, seed) for m in config.methods for b in config.bits]
    return jobs


def seed_free(job: Job, config: SweepConfig) -> bool:
    """Whether nothing in the config depends on its seed: no calibration sample (the baseline,
    RTN) and deterministic generation (greedy, and for diffusion a confidence rule, not 'random');
    the metrics' and held-out loss's masks are fixed per model. Its first seed's record then
    serves every seed: running it again would repeat the same computation."""
    if not is_baseline(job.method) and METHODS[job.method].calibrated:
        return False
    settings = generation_settings(config, job.model)
    return settings.temperature == 0 and settings.alg != "random"


def record_source(job: Job, config: SweepConfig) -> Job:
    """The job whose record this one's is: itself, or for a seed-free config its first seed's."""
    return replace(job, seed=config.seeds[0]) if seed_free(job, config) else job


def reused_record(record: dict, job: Job) -> dict:
    """Another seed's copy of a seed-free config's record, saying where it comes from."""
    return {**record, "job": asdict(job), "id": job.id, "reused_from": record.get("id")}


def validate(config: SweepConfig) -> None:
    """Check arguments before any work starts."""
    from harness.tasks import get_task
    from qrobust.models.loading import MODELS, resolve_source
    from qrobust.quant.grid import QuantSpec

    for b in config.bits:
        QuantSpec(b, config.group_size)
    bad = [m for m in config.methods if m not in METHODS]
    if bad:
        raise QrobustError(f"unknown method(s) {', '.join(bad)}: choose from {', '.join(METHODS)}")
    for name in config.benchmarks:
        get_task(name).problems(limit=1)  # the data must load now, not after the first quantization
    for model in config.models:
        if model not in MODELS:
            resolve_source(model)  # raises a clear error for unknown names and missing directories
    if not config.seeds:
        raise QrobustError("no seeds given: use e.g. --seeds 0,1,2")
    if config.n_samples < 1:
        raise QrobustError(f"--n-samples must be at least 1, got {config.n_samples}")
    for model in config.models:
        settings = generation_settings(config, model)
        settings.sampler()  # a bad --alg fails now
        for name in config.benchmarks:
            get_task(name).check_style(settings.style)
        if settings.temperature == 0 and config.n_samples > 1:
            raise QrobustError("greedy decoding gives identical samples: set --temperature > 0 with --n-samples > 1")


def environment(device: str) -> dict:
    import transformers

    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=5).stdout.strip() or None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=here, timeout=5).stdout.strip()
        if commit and changed:
            commit += "+changes"  # the code that ran is this commit plus uncommitted edits
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    env = {"qrobust": __version__, "commit": commit, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": device, "machine": platform.machine(),
           "cpus": os.cpu_count()}
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


# The held-out diffusion loss's masks, like the metrics' (qrobust.degradation), are the same for
# every config and seed of a model, so that the sweep's seed varies the calibration sample alone.
HELD_OUT_MASK_SEED = 0


def likelihood(adapter, seqlen: int, seed: int = HELD_OUT_MASK_SEED, batch_size: int = 8) -> dict:
    """Held-out loss per token on the validation sample shipped with qrobust, per window too."""
    from qrobust.zoo.card import read_val_sample
    from qrobust.zoo.metrics import windows
    from qrobust.zoo.train import tokenize_docs

    ids = windows(tokenize_docs(adapter.tokenizer, read_val_sample()), seqlen).to(adapter.device)
    per_window = adapter.held_out_loss_rows(ids, samples=4, seed=seed, batch_size=batch_size)
    return {"kind": adapter.held_out_loss, "value": float(per_window.mean()), "per_window": per_window.tolist()}


def quantize_for(job: Job, base, config: SweepConfig, out_dir: Path, progress: bool = False, analyses=None):
    """A quantized copy of the base model for this job, and facts about it. analyses: a
    hawq.AnalysisCache shared by the jobs of one model (default: one on disk under out_dir/hawq),
    so that the sensitivity analysis runs once for every budget."""
    from qrobust.calib import calibration_tokens
    from qrobust.quant import QuantizeConfig, quantize_model

    adapter = copy.deepcopy(base)
    if is_baseline(job.method):
        return adapter, {"avg_bits": float(job.bits)}
    method = METHODS[job.method]
    calib = calibration_tokens(adapter.tokenizer, "stdlib", config.nsamples, config.seqlen, seed=job.seed) \
        if method.calibrated else None
    facts: dict = {}
    plan = None
    if method.planned:
        plan, facts = hawq_plan(job, base, config, calib, out_dir, analyses)
    qconf = QuantizeConfig(method=method.quantizer, bits=job.bits, group_size=config.group_size,
                           nsamples=config.nsamples, seqlen=config.seqlen, seed=job.seed, plan=plan,
                           calib_masking=config.calib_masking)
    t0 = time.perf_counter()
    records = quantize_model(adapter, qconf, calib, progress=progress)
    facts["quantize_seconds"] = time.perf_counter() - t0
    facts.setdefault("avg_bits", float(job.bits))
    facts["calib_masking"] = config.calib_masking
    facts["layer_output_error"] = sum(r.output_error or 0.0 for r in records)
    return adapter, facts


def hawq_plan(job: Job, base, config: SweepConfig, calib, out_dir: Path, analyses=None) -> tuple[dict, dict]:
    """hawq's per-layer specs for this job's budget (its bits, on average), from the analysis of
    its model, calibration and seed (computed once per AnalysisCache), and facts about it; the
    plan document goes to out_dir/plans."""
    from hawq import AnalysisCache, Budget, PlanConfig, plan_document, solve
    from qrobust.quant import QuantSpec

    pconf = PlanConfig(bits=config.hawq_candidates, group_size=config.group_size, probes=config.hawq_probes,
                       seed=job.seed, probes_per_backward=config.hawq_probes_per_backward)
    calibration = {"source": "stdlib", "nsamples": config.nsamples, "seqlen": config.seqlen, "seed": job.seed}
    analyses = analyses if analyses is not None else AnalysisCache(out_dir / "hawq")
    t0 = time.perf_counter()
    sens = analyses.analyse(base, job.model, calib, pconf, calibration)
    facts = {"hawq_analysis_seconds": time.perf_counter() - t0}  # ~0 when the analysis was cached
    alloc = solve(sens, pconf, Budget(avg_bits=float(job.bits)))
    doc = plan_document(base, job.model, sens, pconf, Budget(avg_bits=float(job.bits)), alloc, calibration)
    (out_dir / "plans").mkdir(exist_ok=True)
    (out_dir / "plans" / f"{job.id}.json").write_text(json.dumps(doc, indent=2))
    facts["avg_bits"] = alloc.avg_bits
    return {n: QuantSpec(b, config.group_size) for n, b in alloc.bits.items()}, facts


# Base models a worker keeps loaded (with their metrics' cached baseline): two, so that the sweep
# can run one config of each of a pair early (its time estimate) and return to the first.
BASE_MODELS_KEPT = 2


def early_order(jobs: list[Job]) -> list[Job]:
    """The jobs with the first two of each model (its baseline and a quantized config) in front:
    the time estimate then knows every model's cost within the first minutes."""
    first: list[Job] = []
    for model in dict.fromkeys(j.model for j in jobs):
        first += [j for j in jobs if j.model == model][:2]
    return first + [j for j in jobs if j not in first]


def run_job(job: Job, config: SweepConfig, out_dir: Path, base_cache: dict, progress: bool = False) -> dict:
    """Quantize, measure likelihood, evaluate every benchmark; returns the config record.
    base_cache is what a worker keeps between configs: the current base model and its hawq analyses."""
    from harness import evaluate
    from hawq import AnalysisCache
    from qrobust.models import load_model

    settings = generation_settings(config, job.model)
    models = base_cache.setdefault("models", {})  # model -> its base adapter and what was derived from it
    if job.model not in models:
        while len(models) >= BASE_MODELS_KEPT:  # the least recently loaded goes, with its metrics state
            dropped = next(iter(models))
            del models[dropped]
            base_cache.pop(("degradation", dropped), None)
        models[job.model] = load_model(job.model, device=config.device, dtype=settings.dtype,
                                       sampler=settings.sampler())
    base = models[job.model]
    torch.manual_seed(job.seed)
    analyses = base_cache.setdefault("hawq analyses", AnalysisCache(out_dir / "hawq"))
    adapter, facts = quantize_for(job, base, config, out_dir, progress, analyses)
    record = {"job": asdict(job), "id": job.id, "kind": base.kind, **facts, "settings": settings.record(),
              "likelihood": likelihood(adapter, config.seqlen, batch_size=config.batch_size)}
    record["benchmarks"] = {}
    if not config.benchmarks:
        return record
    record.update(degradation_for(job, base, adapter, config, settings, base_cache))
    eval_config = eval_config_for(config, settings, job.seed)
    adapter.for_generation()  # the copy is evaluated and dropped
    total = evaluate(adapter, eval_config, out_dir / "runs" / job.id, job.model, progress=progress)
    for name, s in total["benchmarks"].items():
        rows = [json.loads(x) for x in (out_dir / "runs" / job.id / name / "results.jsonl").read_text().splitlines()]
        record["benchmarks"][name] = {"summary": s, "passed": passed_by_task(rows)}
    return record


def eval_config_for(config: SweepConfig, settings: EvalPreset, seed: int):
    from harness import EvalConfig

    return EvalConfig(benchmarks=tuple(config.benchmarks), n_samples=config.n_samples,
                      temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                      limit=generation_limit(config), style=settings.style, batch_size=config.batch_size,
                      workers=config.workers, timeout=10.0, seed=seed)


def passed_by_task(rows: list[dict]) -> dict[str, bool | float]:
    """Each problem's outcome: passed or not with one sample, the fraction passed with several."""
    outcomes: dict[str, list[bool]] = {}
    for r in rows:
        outcomes.setdefault(r["task_id"], []).append(r["passed"])
    return {t: v[0] if len(v) == 1 else sum(v) / len(v) for t, v in outcomes.items()}


def generation_limit(config: SweepConfig) -> int | None:
    """Problems per benchmark that are generated and executed: the first gen_limit within limit."""
    limits = [x for x in (config.limit, config.gen_limit) if x is not None]
    return min(limits) if limits else None


def degradation_config(config: SweepConfig, settings: EvalPreset):
    """The metrics' settings; their prompts are built in the style the config generates in."""
    from qrobust.degradation import DegradationConfig

    return DegradationConfig(benchmarks=tuple(config.benchmarks), limit=config.limit, style=settings.style,
                             context_tokens=config.metrics_context, solution_tokens=config.metrics_solution,
                             masks=config.metrics_masks, batch_size=config.batch_size)


def degradation_for(job: Job, base, adapter, config: SweepConfig, settings: EvalPreset, base_cache: dict) -> dict:
    """{"degradation": per benchmark} of this config against the base model in memory, with
    {"degradation_seconds"}. The baseline's own scores, its log-probabilities and the rows are
    computed once per model (the masks do not depend on the job's seed) and kept in base_cache."""
    from qrobust.degradation import degradation, prepare

    if not config.metrics:
        return {}
    t0 = time.perf_counter()
    dconf = degradation_config(config, settings)
    state = base_cache.setdefault(("degradation", job.model), {"cache": {}})
    if "prepared" not in state:
        state["prepared"] = prepare(base, dconf)
        state["baseline"] = degradation(base, dconf, prepared=state["prepared"], cache=state["cache"])
    if is_baseline(job.method):
        result = state["baseline"]
    else:
        result = degradation(adapter, dconf, base=base, prepared=state["prepared"], cache=state["cache"],
                             baseline=state["baseline"])
    return {"degradation": result, "degradation_seconds": time.perf_counter() - t0}


def degradation_rows(rec: dict, baselines: dict) -> list[dict]:
    """Tidy rows of one config's degradation metrics and flips (vs the same model and seed's baseline)."""
    from qrobust.degradation import flips

    rows = []
    for name, d in (rec.get("degradation") or {}).items():
        for metric, est in d["metrics"].items():
            rows.append({"benchmark": name, "metric": metric, "value": est["value"], "ci_low": est["ci_low"],
                         "ci_high": est["ci_high"], "problems": d["problems"], "tokens": d["tokens"]})
    job = rec["job"]
    base = baselines.get((job["model"], job["seed"]))
    if is_baseline(job["method"]) or base is None:
        return rows
    for name, b in rec["benchmarks"].items():
        if name not in base["benchmarks"]:
            continue
        f = flips(base["benchmarks"][name]["passed"], b["passed"])
        for metric in ("pass_to_fail", "fail_to_pass"):
            rows.append({"benchmark": name, "metric": f"flips_{metric}", **f[metric], "problems": f["problems"],
                         "p_value": f["p_value"], "test": "exact McNemar"})
    return rows


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def local_executor(jobs: list[Job], config: SweepConfig, out_dir: Path, on_done: Callable[[Job, dict], None],
                   ray_address: str | None = None, progress: bool = True) -> None:
    cache: dict = {}
    for job in jobs:
        on_done(job, _guarded(job, config, out_dir, cache, progress))


def _guarded(job: Job, config: SweepConfig, out_dir: Path, cache: dict, progress: bool = False) -> dict:
    try:
        return {"status": "ok", **run_job(job, config, out_dir, cache, progress)}
    except Exception as e:  # a failed config is recorded and the sweep goes on
        return {"status": "failed", "id": job.id, "job": asdict(job), "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=5)}


# A config whose Ray worker dies (killed, out of memory, node lost) runs again up to this many
# times; exceptions inside a config are not retried (_guarded records them as failed).
RAY_MAX_RETRIES = 3


def ray_executor(jobs: list[Job], config: SweepConfig, out_dir: Path, on_done: Callable[[Job, dict], None],
                 ray_address: str | None = None, progress: bool = True, run: Callable[[Job], dict] | None = None,
                 max_retries: int = RAY_MAX_RETRIES) -> None:
    """Each config as a Ray task (one GPU each when the device is CUDA) on a Ray cluster; each
    record reaches on_done (which writes it) as soon as its task ends. run: what a task does
    with its job (default: the config itself, as the local executor runs it)."""
    try:
        import ray
    except ImportError:
        raise QrobustError("--executor ray needs Ray: pip install 'qrobust[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:  # a local instance when no address is given; workers must import qrobust
        ray.init(address=ray_address, log_to_driver=False, include_dashboard=False)
    gpus = 1 if config.device.startswith("cuda") else 0
    run = run or (lambda j: _guarded(j, config, out_dir, {}))
    task = ray.remote(num_gpus=gpus, max_retries=max_retries)(run)
    pending = {task.remote(j): j for j in jobs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                on_done(job, _ray_result(ray, ref, job, max_retries))
    finally:
        if started_here:
            ray.shutdown()


def _ray_result(ray, ref, job: Job, max_retries: int) -> dict:
    """The task's record, or a failed one when its worker died on every attempt (the sweep goes on)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        return {"status": "failed", "id": job.id, "job": asdict(job),
                "error": f"Ray worker lost on all {max_retries + 1} attempts: {type(e).__name__}: {str(e)[:500]}"}


EXECUTORS = {"local": local_executor, "ray": ray_executor}


def plan_text(config: SweepConfig, jobs: list[Job], todo: list[Job], compute: list[Job] | None = None) -> str:
    """What the sweep will run, said before it starts."""
    gen = generation_limit(config)
    compute = todo if compute is None else compute
    lines = [f"sweep: {len(todo)} of {len(jobs)} configs to run: models {', '.join(config.models)} x "
             f"(baseline + methods {', '.join(config.methods)} x bits {', '.join(map(str, config.bits))}) x "
             f"seeds {', '.join(map(str, config.seeds))}"]
    if len(compute) < len(todo):
        lines.append(f"  {len(todo) - len(compute)} of them take the record of their first seed: nothing in them "
                     "depends on the seed (baseline and rtn: no calibration sample; greedy decoding)")
    if config.benchmarks:
        scope = f"the first {config.limit}" if config.limit else "all"
        metrics = f"KL, top-1 agreement and solution likelihood over {scope} problems; " if config.metrics else ""
        lines.append(f"  per config: {metrics}pass@1 over {'the first ' + str(gen) if gen else 'all'} problems of "
                     f"{', '.join(config.benchmarks)} (--gen-limit all widens it)")
    lines.append("  time: estimated once the first two configs of each model are done (they run first)")
    return "\n".join(lines)


class TimeEstimate:
    """Time left, extrapolated from the configs done so far: the mean seconds of the same model's
    quantized configs (baselines and other models' configs where none is done yet)."""

    def __init__(self, todo: list[Job]):
        self.left = list(todo)
        self.seconds: dict[tuple[str, bool], list[float]] = {}
        self.last = time.perf_counter()

    def _guess(self, job: Job) -> float:
        key = (job.model, is_baseline(job.method))
        same_model = [x for k, v in self.seconds.items() if k[0] == job.model for x in v]
        pool = self.seconds.get(key) or same_model or [x for v in self.seconds.values() for x in v]
        return sum(pool) / len(pool)

    def done(self, job: Job) -> str | None:
        """The estimate, when a (model, baseline or not) kind of config finishes for the first time."""
        now = time.perf_counter()
        key = (job.model, is_baseline(job.method))
        first = key not in self.seconds
        self.seconds.setdefault(key, []).append(now - self.last)
        self.last = now
        if job in self.left:
            self.left.remove(job)
        if not first or not self.left:
            return None
        left = sum(self._guess(j) for j in self.left)
        return (f"sweep: {job.id} took {self.seconds[key][-1]:.0f} s; about {left / 60:.1f} min left for "
                f"{len(self.left)} configs")


# What a resumed sweep may change: which configs there are and where they run. Any other setting
# would mix results made two ways under one sweep.json.
RESUMABLE = frozenset({"models", "bits", "methods", "seeds", "device", "workers", "probe", "attribution"})


def check_resume(out: Path, config: SweepConfig) -> None:
    """Refuse to resume the sweep in `out` with settings other than those it was made with."""
    check_same_settings(out / "sweep.json", asdict(config), RESUMABLE, "sweep")


def failed_configs(out: Path) -> list[str]:
    """The ids of the configs in `out` whose record says they failed."""
    return sorted(p.stem for p in (out / "configs").glob("*.json") if _status(p) == "failed")


def _status(record: Path) -> str | None:
    """A config record's status; a record cut short (a killed write) counts as not done."""
    try:
        return json.loads(record.read_text()).get("status")
    except ValueError:
        return None


def sweep(config: SweepConfig, out_dir: str | Path, executor: str = "local", ray_address: str | None = None,
          progress: bool = True) -> Path:
    validate(config)
    if executor not in EXECUTORS:
        raise QrobustError(f"unknown executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    out = Path(out_dir)
    check_resume(out, config)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"config": asdict(config), "environment": environment(config.device)},
                                               indent=2))
    jobs = plan_jobs(config)
    done = {p.stem for p in (out / "configs").glob("*.json") if _status(p) == "ok"}
    todo = [j for j in jobs if j.id not in done]
    source = {j: record_source(j, config) for j in todo}
    compute = early_order([j for j in todo if source[j] == j])
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="sweep configs", disable=not progress)
    eta = TimeEstimate(compute)
    if progress:
        tqdm.write(plan_text(config, jobs, todo, compute))

    def write(job: Job, record: dict) -> None:
        _write_json(out / "configs" / f"{job.id}.json", record)
        bar.update(1)
        bar.set_postfix(last=job.id, status=record["status"])

    def on_done(job: Job, record: dict) -> None:
        write(job, record)
        for twin in (t for t in todo if t != job and source[t] == job):
            write(twin, reused_record(record, twin))
        message = eta.done(job)
        if message and progress:
            tqdm.write(message)

    for job in todo:  # seed-free configs whose first seed finished in an earlier run of this sweep
        if source[job] != job and source[job].id in done:
            write(job, reused_record(json.loads((out / "configs" / f"{source[job].id}.json").read_text()), job))
    EXECUTORS[executor](compute, config, out, on_done, ray_address, progress)
    bar.close()
    write_table(out)
    if config.probe:
        probe_models(config, out, progress)
    if config.attribution:
        attribution_models(config, out, progress)
    return out


def build_targets(model: str, base, out_dir: str | Path, quantized: list[str] = (), method: str | None = None,
                  bits: list[int] = (), plan: str | None = None, group_size: int = 128, nsamples: int = 32,
                  seqlen: int = 512, seed: int = 0) -> list[tuple[Target, object]]:
    """The full-precision target and one per quantized config, each with a lazy adapter factory
    (the probe's targets; `qrobust probe`, `attribute` and `lm-eval` build theirs here too)."""
    from qrobust.models import load_model
    from qrobust.probe import QUANTIZED, Target, full_target, target_for_checkpoint

    targets: list[tuple[Target, object]] = [(full_target(next(base.model.parameters()).dtype), lambda: base)]
    for path in quantized:
        if not (Path(path) / "qrobust.json").exists():
            raise QrobustError(f"{path} is not a qrobust checkpoint: make one with `qrobust quantize --out {path}`")
        targets.append((target_for_checkpoint(path), lambda p=path: load_model(p, device=str(base.device))))
    if bits and method is None:
        raise QrobustError("--bits needs --method (gptq, rtn or hawq)")
    if method is not None:
        if method not in METHODS:
            raise QrobustError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
        sweep_config = SweepConfig(models=(model,), group_size=group_size, nsamples=nsamples, seqlen=seqlen,
                                   device=str(base.device))
        for b in bits or (4,):
            job = Job(model, method, b, seed)
            targets.append((Target(f"{method}-{b}", QUANTIZED, b),
                            lambda job=job: quantize_for(job, base, sweep_config, Path(out_dir))[0]))
    if plan is not None:
        from qrobust.calib import calibration_tokens
        from qrobust.quant import QuantizeConfig, QuantSpec, load_plan, quantize_model

        specs = load_plan(plan, QuantSpec(4, group_size))
        avg = sum(s.bits for s in specs.values()) / len(specs)

        def planned():
            adapter = copy.deepcopy(base)
            qconf = QuantizeConfig(group_size=group_size, nsamples=nsamples, seqlen=seqlen, seed=seed, plan=specs)
            calib = calibration_tokens(adapter.tokenizer, "stdlib", nsamples, seqlen, seed=seed)
            quantize_model(adapter, qconf, calib, progress=False)
            return adapter

        targets.append((Target(f"plan-{Path(plan).stem}", QUANTIZED, round(avg)), planned))
    if len(targets) == 1:
        raise QrobustError("nothing to compare with: pass --quantized DIR, --method M --bits B, or --plan FILE")
    return targets


def probe_models(config: SweepConfig, out: Path, progress: bool = True) -> None:
    """The probe study over the sweep's configs (first seed), one directory per model."""
    from qrobust.models import load_model
    from qrobust.probe import ProbeConfig, run_probe

    for model in config.models:
        settings = generation_settings(config, model)
        pconf = ProbeConfig(tasks=tuple(config.benchmarks) or ("humaneval",), shots=(0, 3), limit=config.limit,
                            max_new_tokens=settings.max_new_tokens, batch_size=config.batch_size,
                            workers=config.workers, seed=config.seeds[0])
        base = load_model(model, device=config.device, dtype=settings.dtype, sampler=settings.sampler())
        probe_dir = out / "probe" / model.replace("/", "--")
        per_method = [build_targets(model, base, probe_dir, method=m, bits=list(config.bits),
                                    group_size=config.group_size, nsamples=config.nsamples, seqlen=config.seqlen,
                                    seed=config.seeds[0]) for m in config.methods]
        targets = per_method[0][:1] + [t for ts in per_method for t in ts[1:]]
        run_probe(base, targets, pconf, probe_dir, f"qrobust sweep --probe (model {model})", progress)


def attribution_models(config: SweepConfig, out: Path, progress: bool = True) -> Path:
    """Attribution of full precision, of full precision with another projection seed (the noise
    floor), and of each method × bits (first seed); agreement with full precision in one tidy table,
    attribution/attribution.csv. Finished runs are reused."""
    import pandas as pd

    from qrobust.attribution import AttributionConfig, attribute, compare_attributions, load_inputs
    from qrobust.attribution.run import finished
    from qrobust.models import load_model

    aconf = AttributionConfig(queries=",".join(config.benchmarks) or "humaneval", limit=config.attribution_limit,
                              query_limit=config.limit or 20)
    reseeded = replace(aconf, gradients=replace(aconf.gradients, projection_seed=aconf.gradients.projection_seed + 1))
    inputs = load_inputs(aconf)
    rows = []

    def add(model: str, method: str, bits: int, run_a: Path, run_b: Path) -> None:
        for metric, m in compare_attributions(run_a, run_b)["metrics"].items():
            rows.append({"model": model, "method": method, "bits": bits, "seed": config.seeds[0],
                         "benchmark": "attribution", "metric": metric, **m})

    for model in config.models:
        full = baseline_job(config, model, config.seeds[0])
        base = load_model(model, device=config.device, dtype=generation_settings(config, model).dtype)
        root = out / "attribution" / model.replace("/", "--")
        fp_dir = root / full.method
        runs = [(full.method, full.bits, fp_dir, aconf, lambda: copy.deepcopy(base)),
                (f"{full.method}-reseeded", full.bits, root / f"{full.method}-seed1", reseeded,
                 lambda: copy.deepcopy(base))]
        for method in config.methods:
            for target, make in build_targets(model, base, root, method=method, bits=list(config.bits),
                                              group_size=config.group_size, nsamples=config.nsamples,
                                              seqlen=config.seqlen, seed=config.seeds[0])[1:]:
                runs.append((method, target.bits, root / target.label, aconf, make))
        for method, bits, run_dir, conf, make in runs:
            if not finished(run_dir, conf):
                attribute(make(), f"{model} {run_dir.name}", conf, run_dir, inputs, progress)
            if run_dir != fp_dir:
                add(model, method, bits, fp_dir, run_dir)
    path = out / "attribution" / "attribution.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def settings_columns(record: dict) -> dict:
    """The effective generation settings of a config as table columns: dtype, then gen_* for the rest."""
    settings = dict(record.get("settings") or {})
    return {"dtype": settings.pop("dtype", None), **{f"gen_{k}": v for k, v in settings.items()}}


def result_rows(out_dir: str | Path) -> list[dict]:
    """The tidy table: one row per config × benchmark × seed (likelihood rows use benchmark 'heldout')."""
    out = Path(out_dir)
    env = json.loads((out / "sweep.json").read_text())["environment"] if (out / "sweep.json").exists() else {}
    rows = []
    records = [json.loads(p.read_text()) for p in sorted((out / "configs").glob("*.json"))]
    baselines = {(r["job"]["model"], r["job"]["seed"]): r for r in records
                 if r["status"] == "ok" and is_baseline(r["job"]["method"])}
    for rec in records:
        job = rec["job"]
        common = {"config_id": rec["id"], "model": job["model"], "kind": rec.get("kind"), "method": job["method"],
                  "bits": job["bits"], "avg_bits": rec.get("avg_bits"), "seed": job["seed"], "status": rec["status"],
                  "error": rec.get("error"), "quantize_seconds": rec.get("quantize_seconds"),
                  "calib_masking": rec.get("calib_masking"), "degradation_seconds": rec.get("degradation_seconds"),
                  **settings_columns(rec), **{f"env_{k}": v for k, v in env.items()}}
        if rec["status"] != "ok":
            rows.append({**common, "benchmark": None})
            continue
        lik = rec["likelihood"]
        rows.append({**common, "benchmark": "heldout", "metric": lik["kind"], "value": lik["value"]})
        for name, b in rec["benchmarks"].items():
            s, g = b["summary"], b["summary"].get("generation") or {}
            p1 = s.get("pass@1", {})
            rows.append({**common, "benchmark": name, "metric": "pass@1", "value": p1.get("value"),
                         "ci_low": p1.get("ci_low"), "ci_high": p1.get("ci_high"), "problems": s["problems"],
                         "passed": sum(b["passed"].values()), "tokens_per_second": g.get("tokens_per_second"),
                         "seconds_per_batch": g.get("seconds_per_batch_median"),
                         "seconds_per_forward_pass": g.get("seconds_per_forward_pass"),
                         "peak_memory_bytes": g.get("peak_memory_bytes"),
                         "peak_memory_kind": g.get("peak_memory_kind")})
        rows += [{**common, **r} for r in degradation_rows(rec, baselines)]
    return rows


def write_table(out_dir: str | Path) -> Path:
    import pandas as pd

    out = Path(out_dir)
    df = pd.DataFrame(result_rows(out))
    df.to_csv(out / "results.csv", index=False)
    df.to_parquet(out / "results.parquet", index=False)
    return out / "results.parquet"
