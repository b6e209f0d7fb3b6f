"""Gradient collection for attribution: windows one at a time against batches, same run.

Prints seconds per window for each batch size, the speed-up against batch 1, and the largest
feature difference (AR features do not depend on the batch). Usage:
python benchmarks/attribution_batching.py [--model tiny-ar] [--limit 40] [--batch-sizes 1,4,8] [--device cpu]
"""
from __future__ import annotations

import argparse

import numpy as np

from qrobust.attribution import GradientConfig, load_corpus
from qrobust.attribution.gradients import collect_features
from qrobust.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-ar")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    adapter = load_model(args.model, device=args.device)
    texts = [d.text for d in load_corpus("builtin", args.limit)]
    runs = {}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        runs[b] = collect_features(adapter, texts, GradientConfig(batch_size=b), None, progress=False)
    base = min(runs)
    for b, f in runs.items():
        diff = float(np.abs(f.values - runs[base].values).max())
        print(f"batch {b}: {f.seconds:.1f} s, {runs[base].seconds / f.seconds:.2f}x vs batch {base}, "
              f"max feature difference {diff:.1e}")


if __name__ == "__main__":
    main()
