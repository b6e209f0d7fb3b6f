"""Programs per second of the sandbox on the benchmarks' reference solutions.

Prints, measured in the same run: a plain subprocess per program (solution and tests in one
interpreter, no isolation: the baseline); the sandbox running each problem as `qrobust eval`
does (isolated: tests and solution in separate processes, unless its tests need the solution's
objects) with 1 and with N workers; and, with --in-process, the sandbox running every problem
as one program (the way all of them ran before isolated runs existed). Besides programs/s, each
line gives the CPU milliseconds per program of everything the runs started (user + system, from
the reaped children's rusage): on a shared machine this moves far less with the load than
programs/s does.
Usage: PYTHONPATH=. python benchmarks/sandbox_throughput.py [--workers 2] [--limit 200] [--in-process]
"""
from __future__ import annotations

import argparse
import resource
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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rate(fn, progs, workers: int) -> tuple[float, float, int]:
    """programs/s, CPU ms per program, programs passed."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    with ThreadPoolExecutor(workers) as pool:
        ok = sum(map(bool, pool.map(fn, progs)))
    return len(progs) / (time.perf_counter() - t0), 1000 * (_children_cpu() - cpu0) / len(progs), ok


def show(label: str, result: tuple[float, float, int], ratio: str = "") -> None:
    per_s, cpu_ms, ok = result
    print(f"{label:<28}: {per_s:6.1f} programs/s {cpu_ms:6.1f} CPU ms/program  ({ok} passed)  {ratio}".rstrip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--in-process", action="store_true", help="also run every problem as one program in the sandbox")
    args = ap.parse_args()
    whole, runs = zip(*programs(args.limit))
    sandbox = Sandbox(Limits(timeout=10))
    isolated = sum(isinstance(r, IsolatedProgram) for r in runs)
    print(f"programs: {len(runs)} ({isolated} isolated, {len(runs) - isolated} in-process)  "
          f"sandbox: {sandbox.isolation}")

    def run(program) -> bool:
        return sandbox.run(program).passed

    base, one, many = rate(plain, whole, 1), rate(run, runs, 1), rate(run, runs, args.workers)
    show("plain subprocess, 1 worker", base)
    show("sandbox, 1 worker", one, f"ratio vs plain {one[0] / base[0]:.2f}")
    show(f"sandbox, {args.workers} workers", many, f"ratio vs 1 worker {many[0] / one[0]:.2f}")
    if args.in_process:
        old = rate(run, whole, 1)
        show("sandbox in-process, 1 worker", old, f"isolated / in-process {one[0] / old[0]:.2f}")

if __name__ == "__main__":
    main()
