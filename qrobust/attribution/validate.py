"""Do the influence scores mean something? A retraining test on the built-in AR model.

Attribute the query group (default: HumanEval) to the built-in model's own training corpus, find
the bin with the largest share of the group's top-k documents, and retrain the model from
scratch (same config, seed and tokenizer, fewer steps) three ways: on the whole corpus, without
that bin, and without random documents of the same total size (several draws). If the scores
mean something, the group's loss rises more without the top bin than without random data.

The same test for a quantized target (GPTQ, --gptq-bits): its attribution picks its own top bin,
and each retrained model is quantized the same way before its loss is measured. Where both
targets pick one bin, the retrainings are shared. validation.csv and validation.json are
rewritten after each retraining, so a run cut short keeps what finished.

    python -m qrobust.attribution.validate --corpus .corpus --device cuda --out results/attribution
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.metrics import bootstrap_mean
from qrobust.attribution.data import Document, Query, load_corpus, load_queries
from qrobust.attribution.gradients import GradientConfig
from qrobust.attribution.run import AttributionConfig, attribute
from qrobust.errors import QrobustError
from qrobust.models import load_model
from qrobust.models.files import save_native
from qrobust.zoo.corpus import Document as CorpusDocument
from qrobust.zoo.train import ZooConfig, environment, tokenize_docs, train_one

FULL_PRECISION = "fp"


@dataclass(frozen=True)
class Variant:
    """One retraining: the corpus without `removed`, testing `target`'s top bin (kind 'top bin'),
    its random control (kind 'random', matched to that bin's tokens), or neither ('full')."""
    name: str
    kind: str
    targets: tuple[str, ...]
    removed: frozenset[int]


def query_losses(adapter, texts: list[str], max_tokens: int) -> np.ndarray:
    """Mean next-token NLL per token of each text (cut to the model's context)."""
    out = []
    with torch.no_grad():
        for ids in adapter.tokenizer(texts)["input_ids"]:
            x = torch.tensor([ids[:max_tokens]], device=adapter.device)
            out.append(float(adapter.loss(x)))
    return np.array(out)


def token_counts(tokenizer, docs: list[Document]) -> np.ndarray:
    return np.array([len(ids) for ids in tokenizer([d.text for d in docs])["input_ids"]])


def random_removal(counts: np.ndarray, target: int, rng: random.Random) -> set[int]:
    """Random documents whose tokens add up to about target."""
    order = list(range(len(counts)))
    rng.shuffle(order)
    chosen, total = set(), 0
    for i in order:
        if total >= target:
            break
        chosen.add(i)
        total += int(counts[i])
    return chosen


def top_bin(shares: pd.DataFrame, group: str) -> tuple[str, float]:
    """The bin holding the largest mean share of the group's top-k documents, and that share."""
    means = bin_means(shares, group)
    return str(means.index[0]), float(means.iloc[0])


def bin_means(shares: pd.DataFrame, group: str) -> pd.Series:
    """Mean top-k share of each bin over the group's queries, largest first."""
    means = shares[shares.group == group].groupby("bin").share.mean().sort_values(ascending=False, kind="stable")
    if means.empty:
        raise QrobustError(f"no queries in group {group!r}: pick one of {sorted(set(shares.group))}")
    return means


def plan_variants(top_bins: dict[str, set[int]], counts: np.ndarray, draws: int) -> list[Variant]:
    """Full corpus, then for each target its top bin and random draws matched to that bin's
    tokens; targets whose top bins coincide share them. Ordered so that the smallest complete
    test of every target (full, top bin, two draws) comes first, should the run be cut short."""
    groups: dict[frozenset[int], list[str]] = {}
    for target, removed in top_bins.items():
        groups.setdefault(frozenset(removed), []).append(target)
    variants = [Variant("full corpus", "full", tuple(top_bins), frozenset())]
    per_group = []
    for g, (removed, targets) in enumerate(groups.items()):
        label = "+".join(targets)
        tokens = int(counts[list(removed)].sum())
        rows = [Variant(f"without {label} top bin", "top bin", tuple(targets), removed)]
        rows += [Variant(f"without random documents ({label}, draw {d})", "random", tuple(targets),
                         frozenset(random_removal(counts, tokens, random.Random(1000 + 100 * g + d))))
                 for d in range(draws)]
        per_group.append(rows)
    first = [v for rows in per_group for v in rows[:3]]
    rest = [v for rows in per_group for v in rows[3:]]
    return variants + first + rest


def rise(per_query: dict[str, np.ndarray], variant: str, full: str) -> dict:
    """Mean per-query loss rise over the full-corpus model, with a bootstrap CI over queries."""
    est = bootstrap_mean(per_query[variant] - per_query[full])
    return {"mean": est.value, "ci": [est.low, est.high]}


def summarize(variants: list[Variant], done: dict[str, dict], top_bins: dict[str, dict], group: str) -> dict:
    """Per target: the top bin's rise against the random draws' rises, from what has finished."""
    out = {}
    full = variants[0].name
    for target, info in top_bins.items():
        key = f"{target}:{group}"
        if full not in done:
            break
        per_query = {name: np.array(row["per_query"][key]) for name, row in done.items() if key in row["per_query"]}
        tested = [v for v in variants if target in v.targets and v.name in per_query]
        top = next((v for v in tested if v.kind == "top bin"), None)
        randoms = [rise(per_query, v.name, full)["mean"] for v in tested if v.kind == "random"]
        entry = {**info, "random_rises": randoms, "random_draws": len(randoms)}
        if top is not None:
            top_rise = rise(per_query, top.name, full)
            entry.update(rise_without_top_bin=top_rise["mean"], rise_without_top_bin_ci=top_rise["ci"])
            if randoms:
                spread = float(np.std(randoms, ddof=1)) if len(randoms) > 1 else None
                entry.update(rise_without_random_mean=float(np.mean(randoms)), rise_without_random_std=spread,
                             passed=bool(top_rise["mean"] > max(randoms)),
                             z_over_random=(top_rise["mean"] - float(np.mean(randoms))) / spread if spread else None)
        out[target] = entry
    return out


def target_names(gptq_bits: int, only_quantized: bool) -> list[str]:
    """The models whose top bins are tested: full precision and, with bits, its GPTQ copy."""
    names = [] if only_quantized else [FULL_PRECISION]
    return names + ([f"gptq{gptq_bits}"] if gptq_bits else [])


def quantized_copy(adapter, bits: int, calib: torch.Tensor):
    """A GPTQ copy of the adapter (group size 128, symmetric), quantized in place on its device."""
    from qrobust.quant import QuantizeConfig, quantize_model

    config = QuantizeConfig(bits=bits, group_size=128, nsamples=calib.shape[0], seqlen=calib.shape[1])
    target = copy.deepcopy(adapter)
    quantize_model(target, config, calib, progress=False)
    return target


def as_adapter(model, tokenizer, device: str, scratch: Path):
    """A retrained native model as the adapter load_model gives for the shipped one."""
    path = save_native(model.float(), tokenizer, scratch)
    return load_model(str(path), device=device, dtype=torch.float32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-ar")
    ap.add_argument("--corpus", default=".corpus", help="the `qrobust zoo corpus` the model was trained on")
    ap.add_argument("--group", default="humaneval", help="the query group whose top bin is removed")
    ap.add_argument("--queries", default="humaneval,mbpp")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None, help="corpus documents (attributed and trained on)")
    ap.add_argument("--query-limit", type=int, default=None, help="first K problems of each benchmark")
    ap.add_argument("--projection-dim", type=int, default=64, help="p (p=16 is mostly noise here)")
    ap.add_argument("--attribution-batch-size", type=int, default=8, help="windows per backward (AR: same features)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps of each retrained model")
    ap.add_argument("--train-batch-size", type=int, default=ZooConfig.batch_size, help="windows per training step")
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--gptq-bits", type=int, default=4, help="quantized target's bits; 0: full precision only")
    ap.add_argument("--calib-samples", type=int, default=64, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--only-quantized", action="store_true",
                    help="attribute and test the GPTQ target alone (the full-precision test needs the other half "
                         "of the retrainings; both models' losses are still measured for every retraining)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="results/attribution")
    args = ap.parse_args(argv)
    if args.random_draws < 1 or args.steps < 1 or args.top_k < 1:
        raise QrobustError("--random-draws, --steps and --top-k must be at least 1")
    if args.only_quantized and not args.gptq_bits:
        raise QrobustError("--only-quantized needs a quantized target: give --gptq-bits 2, 3, 4 or 8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_model(args.model, device=args.device, dtype=torch.float32)  # fp16 backward would underflow
    tokenizer = base.tokenizer
    aconf = AttributionConfig(corpus=args.corpus, queries=args.queries, top_k=args.top_k, limit=args.limit,
                              query_limit=args.query_limit,
                              gradients=GradientConfig(projection_dim=args.projection_dim, max_tokens=1024,
                                                       batch_size=args.attribution_batch_size))
    docs: list[Document] = load_corpus(args.corpus, args.limit)
    queries: list[Query] = load_queries(args.queries, args.query_limit)
    bins = [f"{d.labels['topic']} | {d.labels['kind']}" for d in docs]
    counts = token_counts(tokenizer, docs)
    cfg = replace(ZooConfig(), steps=args.steps, warmup=min(200, args.steps // 10), batch_size=args.train_batch_size)

    calib = None
    targets = {FULL_PRECISION: base}
    if args.gptq_bits:
        from qrobust.calib import calibration_tokens

        calib = calibration_tokens(tokenizer, "stdlib", args.calib_samples, cfg.seq_len, seed=0)
        targets[f"gptq{args.gptq_bits}"] = quantized_copy(base, args.gptq_bits, calib)
    targets = {name: targets[name] for name in target_names(args.gptq_bits, args.only_quantized)}
    top_bins, removals = {}, {}
    for target, adapter in targets.items():
        t0 = time.perf_counter()
        label = f"{args.model} {'full precision' if target == FULL_PRECISION else target}"
        meta = attribute(adapter, label, aconf, out / f"run-{target}", inputs=(docs, queries), progress=False)
        means = bin_means(pd.read_csv(out / f"run-{target}" / "influence" / "bin_shares.csv"), args.group)
        chosen = str(means.index[0])
        removals[target] = {i for i, b in enumerate(bins) if b == chosen}
        top_bins[target] = {
            "top_bin": chosen, "top_bin_share": float(means.iloc[0]), "next_bins": means.iloc[1:4].to_dict(),
            "top_bin_corpus_share": float(np.mean([b == chosen for b in bins])),
            "top_bin_tokens": int(counts[list(removals[target])].sum()), "corpus_tokens": int(counts.sum()),
            "attribution_seconds": sum(meta["seconds"].values()), "wall_seconds": time.perf_counter() - t0,
            "bytes_per_example": meta["bytes_per_example"]}
        print(json.dumps({target: top_bins[target]}), flush=True)
    del targets

    variants = plan_variants(removals, counts, args.random_draws)
    groups = sorted({q.group for q in queries})
    texts = {g: [q.text for q in queries if q.group == g] for g in groups}
    done: dict[str, dict] = {}
    result = {"model": args.model, "group": args.group, "steps": args.steps, "train_batch_size": cfg.batch_size,
              "projection_dim": args.projection_dim, "top_k": args.top_k, "documents": len(docs),
              "queries": len(queries), "gptq_bits": args.gptq_bits, "tested_targets": list(top_bins),
              "environment": environment(args.device),
              "command": "python -m qrobust.attribution.validate " + " ".join(sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in variants:
            kept = [CorpusDocument(d.id, d.text) for i, d in enumerate(docs) if i not in variant.removed]
            model, log, seconds = train_one("ar", cfg, tokenizer, tokenize_docs(tokenizer, kept), args.device,
                                            progress=False)
            adapter = as_adapter(model, tokenizer, args.device, Path(scratch) / "model")
            measured = {FULL_PRECISION: adapter}
            if calib is not None:
                measured[f"gptq{args.gptq_bits}"] = quantized_copy(adapter, args.gptq_bits, calib)
            per_query = {f"{t}:{g}": query_losses(m, texts[g], cfg.seq_len).tolist()
                         for t, m in measured.items() for g in groups}
            row = {"variant": variant.name, "kind": variant.kind, "targets": "+".join(variant.targets),
                   "documents_removed": len(variant.removed),
                   "tokens_removed": int(counts[list(variant.removed)].sum()),
                   "final_train_loss": log[-1]["loss"], "train_seconds": seconds,
                   **{f"loss_{k.replace(':', '_')}": float(np.mean(v)) for k, v in per_query.items()}}
            done[variant.name] = {**row, "per_query": per_query}
            print(json.dumps(row), flush=True)
            table = pd.DataFrame([{k: v for k, v in r.items() if k != "per_query"} for r in done.values()])
            table.to_csv(out / "validation.csv", index=False)
            result.update(variants_done=len(done), variants_planned=len(variants),
                          targets=summarize(variants, done, top_bins, args.group),
                          seconds=time.perf_counter() - t_start)
            (out / "validation.json").write_text(json.dumps(result, indent=2))
            (out / "per_query.json").write_text(json.dumps({name: r["per_query"] for name, r in done.items()}))
    print(json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QrobustError as e:
        print(f"qrobust: {e}", file=sys.stderr)
        sys.exit(2)
