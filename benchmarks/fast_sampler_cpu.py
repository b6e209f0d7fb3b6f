"""What the fast diffusion sampler costs against the exact one on the built-in tiny-dllm, on CPU.

Part `generate`: both samplers evaluated through the harness exactly as `qrobust eval` does (same
prompts, tokens and blocks), then compared: pass@1, forward passes, generation time, and the fraction
of response token ids equal to the exact sampler's, position by position, as generated (before any
cutting); writes fast_sampler.json. Part `cost`: what the approximate cache costs the predictions of
the benchmarks' reference solutions, teacher-forced (qrobust.sampler_cost: cross-entropy under both
forwards, KL, top-1 agreement, with CIs over problems), per block length; writes fast_sampler_cost.json.

    python benchmarks/fast_sampler_cpu.py --limit 8 --max-new-tokens 128 --block-length 32 \\
        --thresholds 0.9,0.7,0.5 --out results/engine
    python benchmarks/fast_sampler_cpu.py --parts cost --cost-blocks 32,8 --out results/engine
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from harness import EvalConfig, evaluate
from qrobust.models import SamplerConfig, load_model
from qrobust.models.engine import DiffusionEngine
from qrobust.sampler_cost import SamplerCostConfig, sampler_cost


def run(sampler: SamplerConfig, args, out: Path) -> dict:
    adapter = load_model(args.model, sampler=sampler)
    calls = []
    generate = DiffusionEngine.generate

    def recording(self, *a, **k):  # the raw response ids of every batch, for the agreement
        ids, passes = generate(self, *a, **k)
        calls.append({"passes": passes, "ids": ids.tolist()})
        return ids, passes

    DiffusionEngine.generate = recording
    config = EvalConfig(benchmarks=tuple(args.benchmarks.split(",")), n_samples=1, temperature=0.0,
                        max_new_tokens=args.max_new_tokens, limit=args.limit, batch_size=args.batch_size)
    try:
        t0 = time.perf_counter()
        total = evaluate(adapter, config, out, args.model, progress=False)
        wall = time.perf_counter() - t0
    finally:
        DiffusionEngine.generate = generate
    return {"total": total, "wall_s": wall, "passes": sum(c["passes"] for c in calls),
            "ids": [ids for c in calls for ids in c["ids"]]}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(max(len(ra), len(rb)) for ra, rb in zip(a, b)))


def generate_part(args, out: Path) -> None:
    samplers = {"exact": SamplerConfig(block_length=args.block_length)}
    samplers.update({f"fast@{t}": SamplerConfig(block_length=args.block_length, mode="fast", threshold=float(t))
                     for t in args.thresholds.split(",")})
    runs = {name: run(s, args, out / "runs" / name.replace("@", "_")) for name, s in samplers.items()}
    rows = []
    for name, r in runs.items():
        row = {"sampler": name, "forward_passes": r["passes"], "wall_s": round(r["wall_s"], 2),
               "token_agreement_with_exact": round(agreement(r["ids"], runs["exact"]["ids"]), 4)}
        for bench, res in r["total"]["benchmarks"].items():
            row[f"{bench}_pass@1"] = res["pass@1"]["value"]
            row[f"{bench}_generate_s"] = round(res["generation"]["wall_seconds"], 2)
        rows.append(row)
        print(row, flush=True)
    (out / "fast_sampler.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def cost_part(args, out: Path) -> None:
    adapter = load_model(args.model)
    limit = None if args.cost_limit == "all" else int(args.cost_limit)
    records = {}
    for block in map(int, args.cost_blocks.split(",")):
        config = SamplerCostConfig(benchmarks=tuple(args.benchmarks.split(",")), limit=limit, block_length=block,
                                   batch_size=args.batch_size)
        t0 = time.perf_counter()
        result = sampler_cost(adapter, config)
        records[block] = {"seconds": round(time.perf_counter() - t0, 1), "config": config.__dict__, "benchmarks": {
            name: {k: v for k, v in r.items() if k != "task_ids"} for name, r in result.items()}}
        for name, r in result.items():
            print(f"block {block} {name}: {r['problems']} problems, ce {r['ce_exact']['value']:.4f} -> "
                  f"{r['ce_fast']['value']:.4f} ({100 * r['ce_relative']:+.2f}%), kl {r['kl']['value']:.4f}, "
                  f"top-1 {r['top1_agreement']['value']:.4f}", flush=True)
        (out / "fast_sampler_cost.json").write_text(json.dumps({"model": args.model, "blocks": records}, indent=2))


PARTS = {"generate": generate_part, "cost": cost_part}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="generate,cost", help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--model", default="tiny-dllm")
    p.add_argument("--benchmarks", default="humaneval,mbpp")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--thresholds", default="0.9,0.7,0.5")
    p.add_argument("--cost-blocks", default="32", help="block lengths of the cost part")
    p.add_argument("--cost-limit", default="all", help="problems per benchmark in the cost part (a number or all)")
    p.add_argument("--out", default="results/engine")
    args = p.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}: use {', '.join(PARTS)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        PARTS[part](args, out)


if __name__ == "__main__":
    main()
