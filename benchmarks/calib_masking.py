"""Ablation: GPTQ calibration of a diffusion model on stratified masked inputs vs clean text.

Quantizes the model with GPTQ at each width and seed under both calibration maskings and scores
every config against full precision with qrobust.degradation (no generation). Writes
OUT/configs.csv (one row per masking × bits × seed × benchmark × metric) and OUT/paired.csv
(none − stratified per bits and benchmark: per-problem differences averaged over seeds, bootstrap
95% CI over problems).

    python benchmarks/calib_masking.py --model tiny-dllm --bits 2,3,4 --seeds 0,1,2 --out results/calib-masking
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harness.metrics import bootstrap_mean
from qrobust.calib import calibration_tokens
from qrobust.degradation import DegradationConfig, degradation, prepare
from qrobust.models import load_model
from qrobust.quant import QuantizeConfig, quantize_model

MASKINGS = ("stratified", "none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dllm")
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=None, help="first K problems of each benchmark")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--solution", type=int, default=128)
    p.add_argument("--merge", default=None, help="comma-separated OUT dirs of earlier runs (e.g. one per seed) to join")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        dirs = [Path(d) for d in args.merge.split(",")]
        pd.concat([pd.read_csv(d / "configs.csv") for d in dirs]).to_csv(out / "configs.csv", index=False)
        per_problem = {tuple(json.loads(k)): v for d in dirs
                       for k, v in json.loads((d / "per_problem.json").read_text()).items()}
        write_paired(per_problem, out)
        return
    base = load_model(args.model)
    dconf = DegradationConfig(limit=args.limit, context_tokens=args.context, solution_tokens=args.solution)
    prepared, cache = prepare(base, dconf), {}
    baseline = degradation(base, dconf, prepared=prepared, cache=cache)
    rows, per_problem = [], {}
    for seed in map(int, args.seeds.split(",")):
        calib = calibration_tokens(base.tokenizer, "stdlib", args.nsamples, args.seqlen, seed=seed)
        for bits in map(int, args.bits.split(",")):
            for masking in MASKINGS:
                q = copy.deepcopy(base)
                t0 = time.perf_counter()
                quantize_model(q, QuantizeConfig(bits=bits, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                                                 calib_masking=masking), calib, progress=False)
                t1 = time.perf_counter()
                result = degradation(q, dconf, base=base, prepared=prepared, cache=cache, baseline=baseline)
                t2 = time.perf_counter()
                for bench, d in result.items():
                    per_problem[(masking, bits, seed, bench)] = d["per_problem"]
                    rows += [{"masking": masking, "bits": bits, "seed": seed, "benchmark": bench, "metric": m,
                              "problems": d["problems"], **e, "quantize_seconds": t1 - t0, "metrics_seconds": t2 - t1}
                             for m, e in d["metrics"].items()]
                print(masking, bits, seed, {b: round(d["metrics"]["kl"]["value"], 4) for b, d in result.items()},
                      f"quantize {t1 - t0:.1f} s, metrics {t2 - t1:.1f} s", flush=True)
    pd.DataFrame(rows).to_csv(out / "configs.csv", index=False)
    (out / "per_problem.json").write_text(json.dumps({json.dumps(k): v for k, v in per_problem.items()}))
    (out / "config.json").write_text(json.dumps(vars(args), indent=1))
    write_paired(per_problem, out)


def write_paired(per_problem: dict, out: Path) -> None:
    paired = []
    for bits in sorted({k[1] for k in per_problem}):
        for bench in sorted({k[3] for k in per_problem}):
            seeds = sorted({k[2] for k in per_problem if k[1] == bits and k[3] == bench})
            for field in ("kl", "top1_agreement", "loss"):
                diff = np.mean([np.array(per_problem[("none", bits, s, bench)][field])
                                - np.array(per_problem[("stratified", bits, s, bench)][field]) for s in seeds], axis=0)
                strat = np.mean([per_problem[("stratified", bits, s, bench)][field] for s in seeds])
                none = np.mean([per_problem[("none", bits, s, bench)][field] for s in seeds])
                e = bootstrap_mean(diff)
                paired.append({"bits": bits, "benchmark": bench,
                               "metric": "solution_nelbo" if field == "loss" else field,
                               "stratified": strat, "none": none, "none_minus_stratified": e.value, "ci_low": e.low,
                               "ci_high": e.high, "seeds": len(seeds), "problems": len(diff)})
    pd.DataFrame(paired).to_csv(out / "paired.csv", index=False)
    print(pd.DataFrame(paired).to_string(index=False))


if __name__ == "__main__":
    main()
