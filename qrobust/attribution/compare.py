"""Do two models rely on the same training data? Per-query rank agreement and bin-share shifts
between two attribution runs over the same corpus and queries."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from harness.metrics import bootstrap_mean
from qrobust.attribution.analysis import top_k_indices
from qrobust.attribution.run import load_run
from qrobust.errors import QrobustError

KS = (5, 20)


def per_query_agreement(a: np.ndarray, b: np.ndarray, ks: tuple[int, ...] = KS) -> pd.DataFrame:
    """Spearman over all documents and top-k Jaccard, one row per query."""
    rows = []
    for qa, qb in zip(a, b):
        row = {"spearman": float(spearmanr(qa, qb).statistic) if qa.size > 1 else float("nan")}
        for k in ks:
            ta, tb = set(top_k_indices(qa[None], k)[0]), set(top_k_indices(qb[None], k)[0])
            row[f"jaccard@{k}"] = len(ta & tb) / len(ta | tb)
        row["top1_same"] = float(np.argmax(qa) == np.argmax(qb))
        rows.append(row)
    return pd.DataFrame(rows)


def bin_shift(run_a: Path, run_b: Path) -> pd.DataFrame:
    """Per bin: the paired change of top-k share (B − A) over queries, with a bootstrap CI."""
    a = pd.read_csv(run_a / "influence" / "bin_shares.csv")
    b = pd.read_csv(run_b / "influence" / "bin_shares.csv")
    both = a.merge(b, on=["query", "group", "bin"], how="outer", suffixes=("_a", "_b")).fillna(0.0)
    rows = []
    for name, part in both.groupby("bin", sort=True):
        est = bootstrap_mean((part["share_b"] - part["share_a"]).to_numpy())
        rows.append({"bin": name, "share_a": part["share_a"].mean(), "share_b": part["share_b"].mean(),
                     "shift": est.value, "ci_low": est.low, "ci_high": est.high})
    return pd.DataFrame(rows).sort_values("shift", key=np.abs, ascending=False, kind="stable")


def features_apart(run_a: Path, run_b: Path, meta_a: dict, meta_b: dict) -> str | None:
    """Why the two runs' gradient features do not share one space (other projection, dimension or
    preconditioning) or are not there; None when they can be compared."""
    ga, gb = (meta["fingerprint"]["config"]["gradients"] for meta in (meta_a, meta_b))
    if ga != gb:
        return f"the runs' gradient settings differ ({', '.join(sorted(k for k in ga if ga[k] != gb.get(k)))})"
    missing = [str(run / "document_features.npy") for run in (run_a, run_b) if not (run / "document_features.npy").exists()]
    return f"no {', '.join(missing)}" if missing else None


def gradient_alignment(run_a: Path, run_b: Path) -> np.ndarray:
    """Per-document cosine between the two models' gradient features (runs whose features_apart is None)."""
    fa, fb = (np.load(run / "document_features.npy").astype(np.float32) for run in (run_a, run_b))
    norms = np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1)
    return (fa * fb).sum(axis=1) / np.maximum(norms, 1e-30)


def _plot(agreement: pd.DataFrame, shift: pd.DataFrame, path: Path, title: str) -> None:
    from qrobust.plotting import pyplot, save

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.hist(agreement["spearman"].dropna(), bins=20, range=(-1, 1), color="tab:blue")
    left.set_xlabel("per-query Spearman (all documents)")
    left.set_ylabel("queries")
    top = shift.head(10).iloc[::-1]
    err = np.vstack([top["shift"] - top["ci_low"], top["ci_high"] - top["shift"]])
    right.barh(top["bin"], top["shift"], xerr=err, color="tab:orange")
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel("change of top-k share (B − A), 95% CI")
    right.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def _ids(items: list[dict]) -> list:
    return [item["id"] for item in items]


def compare_attributions(run_a: str | Path, run_b: str | Path, out: str | Path | None = None,
                         ks: tuple[int, ...] = KS) -> dict:
    """compare.json, per_query.csv, bins.csv and compare.png under out (default: RUN_B/compare-NAME_A)."""
    run_a, run_b = Path(run_a), Path(run_b)
    sa, docs_a, queries_a, meta_a = load_run(run_a)
    sb, docs_b, queries_b, meta_b = load_run(run_b)
    if _ids(docs_a) != _ids(docs_b) or _ids(queries_a) != _ids(queries_b):
        raise QrobustError(f"{run_a} and {run_b} scored different documents or queries: "
                           "run both with the same --corpus, --limit and --queries")
    ks = tuple(k for k in ks if k <= sa.shape[1]) or (sa.shape[1],)
    agreement = per_query_agreement(sa, sb, ks)
    agreement.insert(0, "query", [q["id"] for q in queries_a])
    agreement.insert(1, "group", [q["group"] for q in queries_a])
    shift = bin_shift(run_a, run_b)
    out = Path(out) if out else run_b / f"compare-{run_a.name}"
    out.mkdir(parents=True, exist_ok=True)
    agreement.to_csv(out / "per_query.csv", index=False)
    shift.to_csv(out / "bins.csv", index=False)
    metrics = {}
    for col in ["spearman", *(f"jaccard@{k}" for k in ks), "top1_same"]:
        est = bootstrap_mean(agreement[col].dropna().to_numpy())
        metrics[col] = {"value": est.value, "ci_low": est.low, "ci_high": est.high}
    apart = features_apart(run_a, run_b, meta_a, meta_b)
    if apart is None:
        est = bootstrap_mean(gradient_alignment(run_a, run_b))
        metrics["gradient_cosine"] = {"value": est.value, "ci_low": est.low, "ci_high": est.high}
    result = {"a": str(run_a), "b": str(run_b), "model_a": meta_a["model"], "model_b": meta_b["model"],
              "queries": len(queries_a), "documents": len(docs_a), "metrics": metrics,
              "gradient_cosine_left_out": apart,
              "largest_bin_shifts": shift.head(5).to_dict("records")}
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=float))
    _plot(agreement, shift, out / "compare.png", f"{meta_a['model']} (A) vs {meta_b['model']} (B)")
    return result
