"""The evaluation pipeline: generate → sanitize → execute → score, with a file between steps.

out/<benchmark>/samples.jsonl    raw completions with timing (resumed if complete)
out/<benchmark>/sanitized.jsonl  one clean solution module per sample
out/<benchmark>/results.jsonl    sandbox outcome per sample
out/<benchmark>/summary.json     pass@k with CIs, latency, memory
out/summary.json                 every benchmark together
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.execute import execute_samples, read_jsonl, score, write_jsonl
from harness.measure import PeakMemory
from harness.sandbox import Limits
from harness.sanitize import names_used, sanitize
from harness.tasks import Problem, Task, get_task


@dataclass
class EvalConfig:
    benchmarks: tuple[str, ...] = ("humaneval", "mbpp")
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    limit: int | None = None
    style: str | None = None  # None: each task's default; "instruct" for chat models
    batch_size: int = 8
    workers: int = 2
    timeout: float = 10.0
    seed: int = 0
    min_new_tokens: int = 0  # = max_new_tokens: every generation runs to full length (benchmarks)


def generate_samples(adapter, task: Task, problems: list[Problem], config: EvalConfig, style: str,
                     progress: bool = True) -> tuple[list[dict], dict]:
    """Completions for every problem × sample, and the generation measurements."""
    from tqdm.auto import tqdm

    chat = adapter.apply_chat_template if style == "instruct" else None
    prompts = [task.prompt(p, style, chat) for p in problems]
    stop = task.stop(style)
    rows = []
    with PeakMemory(adapter.device) as mem:
        t0 = time.perf_counter()
        quiet = not progress or config.n_samples == 1
        for s in tqdm(range(config.n_samples), desc=f"generate {task.name}", disable=quiet):
            forced = {"min_new_tokens": config.min_new_tokens} if config.min_new_tokens else {}
            gens = adapter.generate(prompts, config.max_new_tokens, stop, config.temperature, config.top_p,
                                    seed=config.seed + s, batch_size=config.batch_size, **forced)
            for p, g in zip(problems, gens):
                rows.append({"task_id": p.task_id, "sample_idx": s, "completion": g.text,
                             "num_tokens": g.num_tokens, "seconds": g.seconds,
                             "forward_passes": g.forward_passes, "batch_size": g.batch_size})
        wall = time.perf_counter() - t0
    return rows, generation_stats(rows, wall, mem)


def generation_stats(rows: list[dict], wall: float, mem: PeakMemory) -> dict:
    batches = {}
    for r in rows:  # one entry per batch: seconds and passes are per batch
        batches[(r["sample_idx"], r["seconds"])] = (r["seconds"], r["forward_passes"])
    secs = np.array([b[0] for b in batches.values()])
    passes = np.array([b[1] for b in batches.values()])
    tokens = sum(r["num_tokens"] for r in rows)
    return {
        "wall_seconds": wall, "tokens": tokens, "tokens_per_second": tokens / wall if wall else None,
        "seconds_per_batch_median": float(np.median(secs)) if secs.size else None,
        "seconds_per_forward_pass": float(secs.sum() / passes.sum()) if passes.sum() else None,
        "peak_memory_bytes": mem.peak_bytes, "peak_memory_kind": mem.kind,
    }


def reference_samples(problems: list[Problem]) -> list[dict]:
    return [{"task_id": p.task_id, "sample_idx": 0, "solution": p.reference} for p in problems]


def sanitize_samples(samples: list[dict], task: Task, problems: list[Problem], style: str) -> list[dict]:
    by_id = {p.task_id: p for p in problems}
    out = []
    for s in samples:
        p = by_id[s["task_id"]]
        raw = s["solution"] if "solution" in s else task.solution(p, s["completion"], style)
        out.append({"task_id": s["task_id"], "sample_idx": s["sample_idx"],
                    "solution": sanitize(raw, p.entry_point, also_needed=names_used(p.setup + "\n" + p.tests))})
    return out


def evaluate_benchmark(adapter, name: str, config: EvalConfig, out_dir: Path, progress: bool = True) -> dict:
    """adapter None means: score the benchmark's own reference solutions."""
    task = get_task(name)
    style = task.check_style(config.style or task.default_style)
    problems = task.problems(config.limit)
    bench_dir = out_dir / name
    bench_dir.mkdir(parents=True, exist_ok=True)
    samples_path = bench_dir / "samples.jsonl"
    generation = {}
    if adapter is None:
        samples = reference_samples(problems)
        write_jsonl(samples_path, samples)
    elif samples_path.exists() and len(read_jsonl(samples_path)) == len(problems) * config.n_samples:
        samples = read_jsonl(samples_path)  # resumed: generation is the expensive step
        generation = json.loads((bench_dir / "summary.json").read_text()).get("generation", {}) \
            if (bench_dir / "summary.json").exists() else {}
    else:
        samples, generation = generate_samples(adapter, task, problems, config, style, progress)
        write_jsonl(samples_path, samples)
    sanitized = sanitize_samples(samples, task, problems, style)
    write_jsonl(bench_dir / "sanitized.jsonl", sanitized)
    results = execute_samples(sanitized, task, problems, config.workers, Limits(timeout=config.timeout),
                              style, progress)
    write_jsonl(bench_dir / "results.jsonl", results)
    summary = {"benchmark": name, "style": style, "n_samples": config.n_samples,
               "temperature": config.temperature, **score(results), "generation": generation}
    (bench_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# Settings that change how a run's results are executed, not what was generated: a run resumed
# with other values of these keeps its samples.
EXECUTION_ONLY = ("benchmarks", "workers", "timeout")


def claim_run_dir(out: Path, model_name: str, config: EvalConfig) -> None:
    """Record in out/run.json what generates this run's samples, or, where an earlier run left
    one, refuse settings other than its own: its samples would be resumed under the wrong label."""
    identity = {"model": model_name,
                "config": {k: v for k, v in config.__dict__.items() if k not in EXECUTION_ONLY}}
    path = out / "run.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            raise HarnessError(f"{path} is damaged: delete it, or use a new --out") from None
        if stored != identity:
            diff = [k for k in identity["config"] if stored.get("config", {}).get(k) != identity["config"][k]]
            what = "model " + repr(stored.get("model")) if stored.get("model") != model_name else ", ".join(diff)
            raise HarnessError(f"{out} holds a run with another {what}: use a new --out, or the same settings "
                               "to resume it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=2))


def evaluate(adapter, config: EvalConfig, out_dir: str | Path, model_name: str, progress: bool = True) -> dict:
    out = Path(out_dir)
    claim_run_dir(out, model_name, config)
    summaries = {b: evaluate_benchmark(adapter, b, config, out, progress) for b in config.benchmarks}
    total = {"model": model_name, "config": config.__dict__ | {"benchmarks": list(config.benchmarks)},
             "benchmarks": summaries}
    (out / "summary.json").write_text(json.dumps(total, indent=2, default=str))
    return total


def summary_table(total: dict) -> str:
    lines = [f"{'benchmark':<10} {'problems':>8} {'samples':>8} {'pass@1':>7} {'95% CI':>15} {'tok/s':>8} "
             f"{'peak MiB':>9}"]
    for name, s in total["benchmarks"].items():
        p1 = s.get("pass@1", {})
        g = s.get("generation") or {}
        tps = f"{g['tokens_per_second']:.1f}" if g.get("tokens_per_second") else "-"
        mem = f"{g['peak_memory_bytes'] / 2**20:.0f}" if g.get("peak_memory_bytes") else "-"
        ci = f"[{p1.get('ci_low', float('nan')):.3f}, {p1.get('ci_high', float('nan')):.3f}]"
        lines.append(f"{name:<10} {s['problems']:>8} {s['samples']:>8} {p1.get('value', float('nan')):>7.3f} "
                     f"{ci:>15} {tps:>8} {mem:>9}")
    return "\n".join(lines)
