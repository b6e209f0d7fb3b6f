"""What the fast diffusion sampler costs against the exact one on the built-in tiny-dllm, on CPU:
both evaluated through the harness exactly as `qrobust eval` does (same prompts, tokens and
blocks), then compared: pass@1, forward passes, generation time, and the fraction of response
token ids equal to the exact sampler's, position by position, as generated (before any cutting).

    python benchmarks/fast_sampler_cpu.py --limit 8 --max-new-tokens 128 --block-length 32 \\
        --thresholds 0.9,0.7,0.5 --out results/engine
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dllm")
    p.add_argument("--benchmarks", default="humaneval,mbpp")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--thresholds", default="0.9,0.7,0.5")
    p.add_argument("--out", default="results/engine")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
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


if __name__ == "__main__":
    main()
