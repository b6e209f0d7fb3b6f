"""What a score matrix says: top documents per query, influence per label bin, the contrast between
two query groups, and per-source metrics. Works the same for influence and for BM25 scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from harness.metrics import bootstrap_mean
from qrobust.attribution.data import Document, Query

BIN_FIELDS = ("topic", "kind")  # the built-in corpus's labels; other corpora use their first two label fields


def label_fields(docs: list[Document]) -> list[str]:
    """Label fields present on every document, built-in ones first, 'source' kept for source metrics."""
    common = set.intersection(*(set(d.labels) for d in docs)) if docs else set()
    fields = [f for f in BIN_FIELDS if f in common] + sorted(common - set(BIN_FIELDS) - {"source"})
    return fields[:2]


def bin_of(doc: Document, fields: list[str]) -> str:
    return " | ".join(doc.labels[f] for f in fields) if fields else "all"


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """[queries, k] document indices, best first; ties broken by document order (stable)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def top_documents(scores: np.ndarray, docs: list[Document], queries: list[Query], k: int) -> pd.DataFrame:
    rows = []
    for qi, idx in enumerate(top_k_indices(scores, k)):
        for rank, di in enumerate(idx, 1):
            rows.append({"query": queries[qi].id, "group": queries[qi].group, "rank": rank, "doc": docs[di].id,
                         "score": float(scores[qi, di]), **docs[di].labels})
    return pd.DataFrame(rows)


def bin_shares(scores: np.ndarray, docs: list[Document], queries: list[Query], k: int,
               fields: list[str]) -> pd.DataFrame:
    """Per query and bin: the share of the query's top-k documents that fall in the bin."""
    bins = [bin_of(d, fields) for d in docs]
    names = sorted(set(bins))
    rows = []
    for qi, idx in enumerate(top_k_indices(scores, k)):
        counts = pd.Series([bins[i] for i in idx]).value_counts()
        for name in names:
            rows.append({"query": queries[qi].id, "group": queries[qi].group, "bin": name,
                         "share": float(counts.get(name, 0)) / len(idx)})
    return pd.DataFrame(rows)


def bin_table(shares: pd.DataFrame, docs: list[Document], fields: list[str]) -> pd.DataFrame:
    """Mean top-k share per bin with a bootstrap CI over queries, the bin's share of the corpus,
    and enrichment (share / corpus share: above 1, the bin is over-represented among top documents)."""
    corpus = pd.Series([bin_of(d, fields) for d in docs]).value_counts(normalize=True)
    rows = []
    for name, part in shares.groupby("bin", sort=True):
        est = bootstrap_mean(part["share"].to_numpy())
        rows.append({"bin": name, "share": est.value, "ci_low": est.low, "ci_high": est.high,
                     "corpus_share": float(corpus.get(name, 0.0)),
                     "enrichment": est.value / corpus.get(name, np.nan)})
    return pd.DataFrame(rows).sort_values("share", ascending=False, kind="stable")


def group_contrast(shares: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """The 2×2 of the first two query groups × the two bins that separate them most: shares and the
    interaction (A_x − A_y) − (B_x − B_y), with a bootstrap CI resampling queries within each group.
    The bins are chosen on the same data, so read the CI as descriptive."""
    groups = list(dict.fromkeys(shares["group"]))
    if len(groups) < 2:
        return None
    a, b = groups[:2]
    wide = shares.pivot_table(index=["group", "query"], columns="bin", values="share")
    A, B = wide.loc[a], wide.loc[b]
    diff = A.mean() - B.mean()
    x, y = diff.idxmax(), diff.idxmin()
    if x == y:
        return None

    def interaction(ai: np.ndarray, bi: np.ndarray) -> float:
        gap_a = (A[x].to_numpy()[ai] - A[y].to_numpy()[ai]).mean()
        return float(gap_a - (B[x].to_numpy()[bi] - B[y].to_numpy()[bi]).mean())

    rng = np.random.default_rng(seed)
    boot = [interaction(rng.integers(0, len(A), len(A)), rng.integers(0, len(B), len(B))) for _ in range(n_boot)]
    return {
        "groups": [a, b], "bins": [x, y],
        "shares": {g: {x: float(t[x].mean()), y: float(t[y].mean())} for g, t in ((a, A), (b, B))},
        "interaction": interaction(np.arange(len(A)), np.arange(len(B))),
        "ci_low": float(np.quantile(boot, 0.025)), "ci_high": float(np.quantile(boot, 0.975)),
        "queries": {a: len(A), b: len(B)},
    }


def source_metrics(scores: np.ndarray, docs: list[Document]) -> dict | None:
    """Where documents carry a 'source' label with two or more values: mean (over queries) of the
    highest score within each source, the ratio of the first two, and each source's share of top-1 wins."""
    sources = [d.labels.get("source") for d in docs]
    names = sorted({s for s in sources if s is not None})
    if len(names) < 2 or None in sources:
        return None
    sources_arr = np.array(sources)
    top1 = sources_arr[np.argmax(scores, axis=1)]
    per_source = {}
    for name in names:
        best = scores[:, sources_arr == name].max(axis=1)
        est = bootstrap_mean(best)
        per_source[name] = {"mean_max": est.value, "ci_low": est.low, "ci_high": est.high,
                            "top1_share": float((top1 == name).mean()), "documents": int((sources_arr == name).sum())}
    first, second = names[:2]
    return {"sources": per_source, "ratio": {"of": [first, second],
                                             "value": per_source[first]["mean_max"] / per_source[second]["mean_max"]}}


def heatmap(table: pd.DataFrame, fields: list[str], path: Path, title: str) -> None:
    from qrobust.plotting import pyplot, save

    plt = pyplot()
    parts = table["bin"].str.split(" | ", regex=False)
    rows = sorted({p[0] for p in parts})
    cols = sorted({p[-1] for p in parts}) if len(fields) > 1 else ["all"]
    grid = np.full((len(rows), len(cols)), np.nan)
    for p, value in zip(parts, table["enrichment"]):
        grid[rows.index(p[0]), cols.index(p[-1]) if len(fields) > 1 else 0] = value
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.0 + 0.4 * len(rows)))
    image = ax.imshow(np.log2(np.clip(grid, 0.25, 4)), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(fields[1] if len(fields) > 1 else "")
    ax.set_ylabel(fields[0] if fields else "")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="log2 enrichment among top-k")
    save(fig, path)


def analyse(scores: np.ndarray, docs: list[Document], queries: list[Query], k: int, out: Path,
            title: str) -> dict:
    """Write top_k.csv, bin_shares.csv, bins.csv, bins.png; return the summary (contrast, sources)."""
    out.mkdir(parents=True, exist_ok=True)
    k = min(k, len(docs))
    fields = label_fields(docs)
    top_documents(scores, docs, queries, k).to_csv(out / "top_k.csv", index=False)
    shares = bin_shares(scores, docs, queries, k, fields)
    shares.to_csv(out / "bin_shares.csv", index=False)
    table = bin_table(shares, docs, fields)
    table.to_csv(out / "bins.csv", index=False)
    heatmap(table, fields, out / "bins.png", title)
    summary = {"top_k": k, "bin_fields": fields, "top_bins": table.head(5).to_dict("records"),
               "contrast": group_contrast(shares), "sources": source_metrics(scores, docs)}
    (out / "analysis.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
