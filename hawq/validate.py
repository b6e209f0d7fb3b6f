"""Does the allocator help? Validation loss of hawq plans vs uniform and random allocations.

For each model: one sensitivity analysis, then for every budget a plan (trace-weighted and
proxy), a random allocation with the same average bits (the same MILP with random costs), and
the uniform configs; each quantized with GPTQ and scored by the model's own loss on the
validation sample shipped with qrobust (AR: NLL; diffusion: negative ELBO), in nats/token.

    python -m hawq.validate --models tiny-ar,tiny-dllm --out results/hawq
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from hawq.allocate import Budget, allocate, pareto_frontier
from hawq.plan import PlanConfig, analyse, costs_of, sizes_of, solve, write_frontier
from hawq.sensitivity import ranking_agreement
from qrobust.calib import calibration_tokens
from qrobust.models import load_model
from qrobust.quant import QuantizeConfig, QuantSpec, quantize_model
from qrobust.zoo.card import read_val_sample
from qrobust.zoo.metrics import windows
from qrobust.zoo.train import tokenize_docs

BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5)


def val_loss(adapter, ids: torch.Tensor) -> float:
    return float(adapter.held_out_loss_rows(ids, samples=8, seed=0).mean())


def quantized_loss(base, bits: dict[str, int], group_size: int, calib: torch.Tensor, ids: torch.Tensor) -> float:
    adapter = copy.deepcopy(base)
    plan = {n: QuantSpec(b, group_size) for n, b in bits.items()}
    config = QuantizeConfig(bits=4, group_size=group_size, nsamples=calib.shape[0], seqlen=calib.shape[1], plan=plan)
    quantize_model(adapter, config, calib, progress=False)
    return val_loss(adapter, ids)


def validate_model(name: str, config: PlanConfig, nsamples: int, seqlen: int, budgets=BUDGETS,
                   random_seeds: int = 2, device: str = "cpu") -> tuple[list[dict], dict, list[dict]]:
    base = load_model(name, device=device)
    calib = calibration_tokens(base.tokenizer, "stdlib", nsamples, seqlen, seed=config.seed)
    ids = windows(tokenize_docs(base.tokenizer, read_val_sample()), seqlen).to(base.device)
    t0 = time.perf_counter()
    sens = analyse(base, calib, config)
    analysis_seconds = time.perf_counter() - t0
    n = {s.name: s.n_params for s in sens}
    rows = [{"model": name, "method": "fp16", "budget": 16.0, "avg_bits": 16.0, "val_loss": val_loss(base, ids)}]
    for b in (2, 3, 4):
        rows.append({"model": name, "method": "uniform", "budget": float(b), "avg_bits": float(b),
                     "val_loss": quantized_loss(base, {s.name: b for s in sens}, config.group_size, calib, ids)})
    proxy_config = replace(config, sensitivity="proxy")
    for budget in budgets:
        for method, cfg in (("hawq", config), ("hawq-proxy", proxy_config)):
            alloc = solve(sens, cfg, Budget(avg_bits=budget))
            rows.append({"model": name, "method": method, "budget": budget, "avg_bits": alloc.avg_bits,
                         "val_loss": quantized_loss(base, alloc.bits, config.group_size, calib, ids)})
        for seed in range(random_seeds):
            rng = random.Random(seed)
            costs = {s.name: {b: rng.random() for b in config.bits} for s in sens}
            alloc = allocate(costs, n, Budget(avg_bits=budget))
            rows.append({"model": name, "method": f"random-{seed}", "budget": budget, "avg_bits": alloc.avg_bits,
                         "val_loss": quantized_loss(base, alloc.bits, config.group_size, calib, ids)})
    frontier = pareto_frontier(costs_of(sens, config), n, sizes_of(sens, config), list(config.bits))
    info = {"agreement": ranking_agreement(sens, list(config.bits)), "analysis_seconds": analysis_seconds,
            "val_tokens": int(ids.numel()), "traces": {s.name: [s.trace, s.trace_stderr] for s in sens}}
    return rows, info, frontier


def plot(rows: list[dict], path: Path) -> None:
    from qrobust.plotting import pyplot, save

    plt = pyplot()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for method, style in (("uniform", "s--"), ("hawq", "o-"), ("hawq-proxy", "^-")):
            pts = sorted((r["avg_bits"], r["val_loss"]) for r in mine if r["method"] == method)
            ax.plot(*zip(*pts), style, label=method)
        rand = sorted((r["avg_bits"], r["val_loss"]) for r in mine if r["method"].startswith("random"))
        ax.plot(*zip(*rand), "x", color="gray", label="random allocation")
        fp = next(r["val_loss"] for r in mine if r["method"] == "fp16")
        ax.axhline(fp, color="k", lw=0.8, label="full precision")
        ax.set_xlabel("average bits per weight")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(model)
        ax.legend(fontsize=8)
    save(fig, path)


def uniform_at(rows: list[dict], avg_bits: float) -> float:
    """Loss of uniform quantization at avg_bits, linear between the measured integer widths."""
    pts = sorted((r["avg_bits"], r["val_loss"]) for r in rows if r["method"] == "uniform")
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        if b0 <= avg_bits <= b1:
            return l0 + (l1 - l0) * (avg_bits - b0) / (b1 - b0)
    raise ValueError(f"no uniform configs around {avg_bits} bits")


def summary(rows: list[dict]) -> tuple[list[dict], bool]:
    """Per model and budget: hawq against uniform (interpolated between integer widths) and random."""
    table, wins = [], True
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        for budget in sorted({r["budget"] for r in mine if r["method"] == "hawq"}):
            at = {r["method"]: r for r in mine if r["budget"] == budget}
            rand = [r["val_loss"] for m, r in at.items() if m.startswith("random")]
            hawq = at["hawq"]
            uniform = uniform_at(mine, hawq["avg_bits"])
            wins &= hawq["val_loss"] < uniform
            table.append({"model": model, "budget": budget, "avg_bits": round(hawq["avg_bits"], 4),
                          "hawq": round(hawq["val_loss"], 4), "hawq_proxy": round(at["hawq-proxy"]["val_loss"], 4),
                          "uniform": round(uniform, 4), "random_mean": round(sum(rand) / len(rand), 4),
                          "hawq_beats_uniform": hawq["val_loss"] < uniform})
    return table, wins


def write_summary(rows: list[dict], infos: dict, path: Path) -> bool:
    table, wins = summary(rows)
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
    lines += ["", "Spearman agreement of the trace-weighted and proxy rankings, per bit width:", ""]
    lines += [f"- {m}: " + ", ".join(f"{b} bits {v:.3f}" for b, v in info["agreement"].items())
              for m, info in infos.items()]
    lines += ["", f"hawq below uniform at every budget: {'yes' if wins else 'no'}", ""]
    path.write_text("\n".join(lines))
    return wins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-ar,tiny-dllm")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="results/hawq")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = PlanConfig(group_size=args.group_size, probes=args.probes)
    all_rows, infos = [], {}
    for name in args.models.split(","):
        rows, info, frontier = validate_model(name, config, args.nsamples, args.seqlen, device=args.device)
        all_rows += rows
        infos[name] = info
        write_frontier(frontier, info["agreement"], out / name, f"{name}: sensitivity vs size")
    with open(out / "validation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(all_rows[0]))
        w.writeheader()
        w.writerows(all_rows)
    (out / "validation_info.json").write_text(json.dumps(infos, indent=2))
    plot(all_rows, out / "validation.png")
    wins = write_summary(all_rows, infos, out / "summary.md")
    for r in all_rows:
        print(f"{r['model']:<10} {r['method']:<11} budget {r['budget']:>5} avg {r['avg_bits']:.3f} "
              f"loss {r['val_loss']:.4f}")
    print(f"hawq below uniform at every budget: {'yes' if wins else 'no'} (table: {out / 'summary.md'})")


if __name__ == "__main__":
    main()
