"""What the GPU-only benchmark scripts share (imported from the script's own folder, which Python
puts first on the path): the check for a CUDA device, the median time of a call (alone, or
replayed in a CUDA graph), and the JSON file of their rows."""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Callable, Iterable

import torch

from qrobust.models.decode import sync


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: needs a CUDA device")


def median_seconds(fn: Callable[[], object], device: str | torch.device, repeats: int) -> float:
    """Seconds per call of fn, the median of `repeats` timed calls after a warm-up."""
    device = torch.device(device)
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graph_time(fn: Callable[[], object], calls: int = 20, repeats: int = 5) -> float:
    """Seconds per call of fn, replayed as a CUDA graph of `calls` calls (median of repeats)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def write_rows(path: str | None, rows: list[dict], **fields) -> None:
    """`fields`, the torch version, the GPU's name and `rows` as JSON at `path` (nothing without one)."""
    if path:
        with open(path, "w") as f:
            json.dump({**fields, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f,
                      indent=2)


def probe_arguments(description: str, bits: str, rows: str, splits: str = "1,2,4,8", flags: tuple[str, ...] = (),
                    **more_lists: str) -> argparse.Namespace:
    """The kernel probes' command line: --out (default $OUT), --bits, --rows, --splits and any
    more_lists (name=default; each comma-separated, parsed into tuples of ints), --compile-only and
    any `flags` (switches, off by default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    lists = {"bits": bits, "rows": rows, "splits": splits, **more_lists}
    for name, default in lists.items():
        parser.add_argument("--" + name.replace("_", "-"), default=default)
    parser.add_argument("--compile-only", action="store_true", help="print what it compiles to for sm_90 (no GPU)")
    for flag in flags:
        parser.add_argument("--" + flag.replace("_", "-"), action="store_true")
    args = parser.parse_args()
    for name in lists:
        setattr(args, name, tuple(int(v) for v in getattr(args, name).split(",")))
    return args


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_probe(args: argparse.Namespace, name: str, measure: Callable[..., Iterable[dict]]) -> None:
    """A kernel probe's GPU part: the rows of measure(bits, rows, splits) → $OUT/<name>.json, also
    those measured before a `timeout` (SIGTERM) or an error stopped it."""
    require_cuda(name + ".py")
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for row in measure(args.bits, args.rows, args.splits):
            rows.append(row)
    finally:
        write_rows(os.path.join(args.out, name + ".json"), rows, part=name)
