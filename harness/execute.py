"""Run solutions against their tests in the sandbox, in parallel, and score them."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from harness.metrics import bootstrap_mean, per_problem_pass_at_k
from harness.sandbox import IsolatedProgram, Limits, Sandbox
from harness.split import SplitTests
from harness.tasks import Problem, Task
from harness.errors import HarnessError


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise HarnessError(f"{path}:{i} is not valid JSON: fix or regenerate the file") from None
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write atomically, so an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def normalise_task_id(task: Task, task_id) -> str:
    if task.name == "mbpp" and not str(task_id).startswith("mbpp/"):
        return f"mbpp/{task_id}"
    return str(task_id)


def runnable(task: Task, problem: Problem, solution: str, split: SplitTests) -> str | IsolatedProgram:
    """What the sandbox runs for one solution: an isolated run, unless the problem's tests need
    the solution's own objects (then solution and tests as one program)."""
    return IsolatedProgram(solution, split.code, split.calls) if split.isolated else task.program(problem, solution)


def execute_samples(samples: list[dict], task: Task, problems: list[Problem], workers: int = 2,
                    limits: Limits = Limits(), style: str | None = None, progress: bool = True,
                    sandbox: Sandbox | None = None) -> list[dict]:
    """One result row per sample. A sample has `solution` (a module) or `completion`.

    Each runs isolated (tests and solution in separate processes) unless its problem's tests
    need the solution's own objects (harness/split.py): those rows say `isolation: in-process`
    and why, in `isolation_reason`."""
    by_id = {p.task_id: p for p in problems}
    splits: dict[str, SplitTests] = {}
    style = task.check_style(style or task.default_style)
    jobs = []
    for i, s in enumerate(samples):
        tid = normalise_task_id(task, s.get("task_id"))
        if tid not in by_id:
            raise HarnessError(f"sample {i} has task_id {s.get('task_id')!r}, which is not in {task.name}: "
                               "check --benchmark")
        solution = s["solution"] if "solution" in s else task.solution(by_id[tid], s.get("completion", ""), style)
        if tid not in splits:
            splits[tid] = task.isolated_tests(by_id[tid])
        split = splits[tid]
        jobs.append((tid, s.get("sample_idx", 0), runnable(task, by_id[tid], solution, split), split.fallback))
    sandbox = sandbox or Sandbox(limits)

    def run(job):
        tid, idx, program, fallback = job
        r = sandbox.run(program)
        row = {"task_id": tid, "sample_idx": idx, "status": r.status, "passed": r.passed,
               "reason": r.reason, "seconds": round(r.seconds, 4), "sandbox": sandbox.isolation,
               "isolation": "in-process" if fallback else "isolated"}
        return row | ({"isolation_reason": fallback} if fallback else {})

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(run, jobs), total=len(jobs), desc=f"execute {task.name}",
                            disable=not progress))
    return results


def score(results: list[dict], ks: tuple[int, ...] = (1, 10, 100)) -> dict:
    """pass@k with bootstrap CIs over problems, and counts per status and per isolation
    (isolated / in-process: how far each verdict can be trusted)."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    statuses: dict[str, int] = defaultdict(int)
    isolation: dict[str, int] = defaultdict(int)
    for r in results:
        per_task[r["task_id"]].append(bool(r["passed"]))
        statuses[r["status"]] += 1
        isolation[r.get("isolation", "unknown")] += 1
    counts = [(len(v), sum(v)) for v in per_task.values()]
    n_min = min((n for n, _ in counts), default=0)
    summary = {"problems": len(per_task), "samples": len(results), "statuses": dict(statuses),
               "isolation": dict(isolation), "sandbox": sorted({r.get("sandbox", "") for r in results})}
    for k in ks:
        if k <= n_min:
            summary[f"pass@{k}"] = bootstrap_mean(per_problem_pass_at_k(counts, k)).as_dict()
    return summary


def per_problem_pass_at_1(results: list[dict]) -> dict[str, float]:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task_id"]].append(bool(r["passed"]))
    return {t: sum(v) / len(v) for t, v in per_task.items()}


def compare_runs(dir_a: str | Path, dir_b: str | Path) -> dict[str, dict]:
    """Paired comparison, per benchmark, of two eval runs on the problems both ran (B − A)."""
    from harness.metrics import paired_comparison

    out = {}
    for bench_a in sorted(p for p in Path(dir_a).iterdir() if (p / "results.jsonl").exists()):
        path_b = Path(dir_b) / bench_a.name / "results.jsonl"
        if not path_b.exists():
            continue
        a = per_problem_pass_at_1(read_jsonl(bench_a / "results.jsonl"))
        b = per_problem_pass_at_1(read_jsonl(path_b))
        common = sorted(set(a) & set(b))
        if not common:
            continue
        cmp = paired_comparison([a[t] for t in common], [b[t] for t in common])
        out[bench_a.name] = {"problems": len(common), "pass@1_a": sum(a[t] for t in common) / len(common),
                             "pass@1_b": sum(b[t] for t in common) / len(common), **cmp.as_dict()}
    if not out:
        raise HarnessError(f"{dir_a} and {dir_b} share no benchmark results: point both at `qrobust eval --out` dirs")
    return out
