"""Layers that share their input (q/k/v, gate/up): one Hessian accumulation and one GPTQ solve
per group, against one per layer (`--no-fuse`).

Same random model, calibration and settings in one run; prints the Hessian and solve stages'
seconds and their ratios. Usage: python benchmarks/gptq_fused_solve.py [--shape qwen3-0.6b] [--layers 2] [--device cpu]
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
    stages = {}
    for fuse in (False, True):
        run = bench_quantize(replace(base, fuse_shared=fuse), tempfile.mkdtemp())["runs"][0]
        stages[fuse] = run["stages"]
        print(f"fuse_shared={fuse}: total {run['seconds']:.2f} s, hessian {stages[fuse]['hessian']:.2f} s, "
              f"solve {stages[fuse]['solve']:.2f} s")
    for stage in ("hessian", "solve"):
        print(f"{stage} speed-up from sharing: {stages[False][stage] / stages[True][stage]:.2f}x")


if __name__ == "__main__":
    main()
