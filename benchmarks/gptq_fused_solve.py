"""One GPTQ solve for layers that share their input (q/k/v, gate/up) against one solve per layer.

Same random model, calibration and settings in one run; prints each stage's seconds and the
ratio. Usage: python benchmarks/gptq_fused_solve.py [--shape qwen3-0.6b] [--layers 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

from qrobust.bench import QuantBench, bench_quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    base = QuantBench(shape=args.shape, layers=args.layers, nsamples=args.nsamples, seqlen=args.seqlen,
                      vocab_size=4096, device=args.device)
    solve = {}
    for fuse in (False, True):
        run = bench_quantize(replace(base, fuse_shared=fuse), tempfile.mkdtemp())["runs"][0]
        solve[fuse] = run["stages"]["solve"]
        print(f"fuse_shared={fuse}: total {run['seconds']:.2f} s, solve {solve[fuse]:.2f} s")
    print(f"solve speed-up from joint solves: {solve[False] / solve[True]:.2f}x")


if __name__ == "__main__":
    main()
