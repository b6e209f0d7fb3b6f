"""Programs per second of the sandbox on the benchmarks' reference solutions.

Prints, measured in the same run: a plain subprocess per program (solution and tests in one
interpreter, no isolation: the baseline), the full sandbox with 1 worker, and the sandbox with
N workers; and the ratios between them. The sandbox runs each problem as `qrobust eval` does:
isolated (tests and solution in separate processes) unless its tests need the solution's objects.
Usage: PYTHONPATH=. python benchmarks/sandbox_throughput.py [--workers 2] [--limit 200]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from harness import IsolatedProgram, Limits, Sandbox, get_task
from harness.execute import runnable


def programs(limit: int) -> list[tuple[str, str | IsolatedProgram]]:
    """(whole program, what the sandbox runs) for each reference solution."""
    out = []
    for name in ("humaneval", "mbpp"):
        task = get_task(name)
        out += [(task.program(p, p.reference), runnable(task, p, p.reference, task.isolated_tests(p)))
                for p in task.problems()]
    return out[:limit]


def plain(program: str) -> bool:
    return subprocess.run([sys.executable, "-I", "-"], input=program.encode(), capture_output=True,
                          timeout=10).returncode == 0


def rate(fn, progs, workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        ok = sum(map(bool, pool.map(fn, progs)))
    return len(progs) / (time.perf_counter() - t0), ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args()
    whole, runs = zip(*programs(args.limit))
    sandbox = Sandbox(Limits(timeout=10))
    base, ok0 = rate(plain, whole, 1)
    one, ok1 = rate(lambda p: sandbox.run(p).passed, runs, 1)
    many, ok2 = rate(lambda p: sandbox.run(p).passed, runs, args.workers)
    isolated = sum(isinstance(r, IsolatedProgram) for r in runs)
    print(f"programs: {len(runs)} ({isolated} isolated, {len(runs) - isolated} in-process)  "
          f"sandbox: {sandbox.isolation}")
    print(f"plain subprocess, 1 worker : {base:6.1f} programs/s  ({ok0} passed)")
    print(f"sandbox, 1 worker          : {one:6.1f} programs/s  ({ok1} passed)  ratio vs plain {one / base:.2f}")
    print(f"sandbox, {args.workers} workers         : {many:6.1f} programs/s  ({ok2} passed)  "
          f"ratio vs 1 worker {many / one:.2f}")


if __name__ == "__main__":
    main()
