"""Do the influence scores mean something? A retraining test on the built-in AR model.

Attribute the query group (default: HumanEval) to the built-in model's own training corpus, find
the bin with the largest share of the group's top-k documents, and retrain the model from
scratch (same config, seed and tokenizer, fewer steps) three ways: on the whole corpus, without
that bin, and without random documents of the same total size (several draws). If the scores
mean something, the group's loss rises more without the top bin than without random data.

    python -m qrobust.attribution.validate --corpus .corpus --device cuda --out results/attribution
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from qrobust.attribution.data import Document, load_corpus, load_queries
from qrobust.attribution.run import AttributionConfig, attribute
from qrobust.attribution.gradients import GradientConfig
from qrobust.models import load_model
from qrobust.zoo.corpus import Document as CorpusDocument
from qrobust.zoo.train import ZooConfig, environment, tokenize_docs, train_one


def text_loss(model, tokenizer, texts: list[str], device: str, max_tokens: int) -> float:
    """Mean next-token NLL per token over the texts (each cut to the model's context)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in tokenizer(texts)["input_ids"]:
            x = torch.tensor([ids[:max_tokens]], device=device)
            logits = model(x)[:, :-1].float()
            total += float(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum"))
            count += x.shape[1] - 1
    return total / count


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
    means = shares[shares.group == group].groupby("bin").share.mean().sort_values(ascending=False, kind="stable")
    if means.empty:
        raise SystemExit(f"no queries in group {group!r}: pick one of {sorted(set(shares.group))}")
    return str(means.index[0]), float(means.iloc[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-ar")
    ap.add_argument("--corpus", default=".corpus", help="the `qrobust zoo corpus` the model was trained on")
    ap.add_argument("--group", default="humaneval", help="the query group whose top bin is removed")
    ap.add_argument("--queries", default="humaneval,mbpp")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None, help="corpus documents (attributed and trained on)")
    ap.add_argument("--query-limit", type=int, default=None, help="first K problems of each benchmark")
    ap.add_argument("--steps", type=int, default=1500, help="training steps of each retrained model")
    ap.add_argument("--random-draws", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="results/attribution")
    args = ap.parse_args()

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_model(args.model, device=args.device, dtype=torch.float32)  # fp16 backward would underflow
    tokenizer = base.tokenizer
    aconf = AttributionConfig(corpus=args.corpus, queries=args.queries, top_k=args.top_k, limit=args.limit,
                              query_limit=args.query_limit,
                              gradients=GradientConfig(projection_dim=64, max_tokens=1024))  # p=16 is mostly noise here
    t0 = time.perf_counter()
    meta = attribute(base, f"{args.model} full precision", aconf, out / "run")
    attribution_seconds = time.perf_counter() - t0

    chosen, chosen_share = top_bin(pd.read_csv(out / "run" / "influence" / "bin_shares.csv"), args.group)
    docs = load_corpus(args.corpus, args.limit)
    bins = [f"{d.labels['topic']} | {d.labels['kind']}" for d in docs]
    counts = token_counts(tokenizer, docs)
    removed_top = {i for i, b in enumerate(bins) if b == chosen}
    removed_tokens = int(counts[list(removed_top)].sum())
    queries = load_queries(args.queries, args.query_limit)
    groups = sorted({q.group for q in queries})

    cfg = replace(ZooConfig(), steps=args.steps, warmup=min(200, args.steps // 10))
    context = cfg.seq_len
    variants = [("full corpus", set()), (f"without top bin ({chosen})", removed_top)]
    for draw in range(args.random_draws):
        variants.append((f"without random documents (draw {draw})",
                         random_removal(counts, removed_tokens, random.Random(1000 + draw))))
    rows = []
    for name, removed in variants:
        kept = [CorpusDocument(d.id, d.text) for i, d in enumerate(docs) if i not in removed]
        train_tokens = tokenize_docs(tokenizer, kept)
        model, log, seconds = train_one("ar", cfg, tokenizer, train_tokens, args.device, progress=False)
        row = {"variant": name, "documents_removed": len(removed), "tokens_removed": int(counts[list(removed)].sum()),
               "train_tokens": int(train_tokens.numel()), "final_train_loss": log[-1]["loss"], "train_seconds": seconds}
        for group in groups:
            texts = [q.text for q in queries if q.group == group]
            row[f"loss_{group}"] = text_loss(model, tokenizer, texts, args.device, context)
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    for group in groups:
        table[f"rise_{group}"] = table[f"loss_{group}"] - table[f"loss_{group}"].iloc[0]
    table.to_csv(out / "validation.csv", index=False)
    random_rise = table[f"rise_{args.group}"].iloc[2:]
    result = {
        "model": args.model, "group": args.group, "top_bin": chosen, "top_bin_share": chosen_share,
        "top_bin_corpus_share": float(np.mean([b == chosen for b in bins])),
        "rise_without_top_bin": float(table[f"rise_{args.group}"].iloc[1]),
        "rise_without_random_mean": float(random_rise.mean()),
        "passed": bool(table[f"rise_{args.group}"].iloc[1] > random_rise.max()),
        "steps": args.steps, "attribution_seconds": attribution_seconds,
        "bytes_per_example": meta["bytes_per_example"], "documents": meta["documents"], "queries": meta["queries"],
        "environment": environment(args.device),
        "command": "python -m qrobust.attribution.validate " + " ".join(sys.argv[1:]),
    }
    (out / "validation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
