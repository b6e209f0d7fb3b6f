"""One attribution run: a model (full precision or quantized, through its dequantized weights),
a corpus and queries in; scores, analyses and the BM25 baseline out, in one directory."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qrobust.attribution.analysis import analyse
from qrobust.attribution.bm25 import bm25_scores
from qrobust.attribution.data import Document, Query, load_corpus, load_queries
from qrobust.attribution.gradients import GradientConfig, collect_features, estimate_normalizers, windows_for
from qrobust.errors import QrobustError

SCORES = "scores.npy"


@dataclass
class AttributionConfig:
    corpus: str = "builtin"
    queries: str = "humaneval,mbpp"
    limit: int | None = None  # corpus documents (an evenly spaced subset)
    query_limit: int | None = None  # first K problems of each benchmark
    top_k: int = 20
    bm25: bool = True
    gradients: GradientConfig = field(default_factory=GradientConfig)


def load_inputs(config: AttributionConfig) -> tuple[list[Document], list[Query]]:
    """Corpus and queries, checked before any model is loaded or quantized."""
    return load_corpus(config.corpus, config.limit), load_queries(config.queries, config.query_limit)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _fingerprint(config: AttributionConfig, model_label: str, docs: list[Document], queries: list[Query]) -> dict:
    """What a run depends on, as it reads back from attribution.json."""
    return json.loads(json.dumps({"model": model_label, "config": asdict(config), "documents": [d.id for d in docs],
                                  "queries": [q.id for q in queries]}))


def _stored_fingerprint(run_dir: str | Path) -> dict | None:
    """The fingerprint of a completed run in run_dir, else None."""
    meta_path = Path(run_dir) / "attribution.json"
    if not (meta_path.exists() and (Path(run_dir) / SCORES).exists()):
        return None
    return json.loads(meta_path.read_text()).get("fingerprint")


def finished(run_dir: str | Path, config: AttributionConfig) -> bool:
    """A run in run_dir completed with these settings (so its model need not be built again)."""
    stored = _stored_fingerprint(run_dir)
    return stored is not None and stored.get("config") == json.loads(json.dumps(asdict(config)))


def attribute(adapter, model_label: str, config: AttributionConfig, out_dir: str | Path,
              inputs: tuple[list[Document], list[Query]] | None = None, progress: bool = True) -> dict:
    """Write scores.npy ([queries, documents] cosine influence), influence/ and bm25/ analyses and
    attribution.json; a finished run with the same settings is reused, not recomputed."""
    from qrobust.quant import dequantize_modules

    docs, queries = inputs or load_inputs(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "attribution.json"
    fingerprint = _fingerprint(config, model_label, docs, queries)
    if _stored_fingerprint(out) == fingerprint:
        return json.loads(meta_path.read_text())
    _write_jsonl(out / "documents.jsonl", [{"id": d.id, **d.labels} for d in docs])
    _write_jsonl(out / "queries.jsonl", [{"id": q.id, "group": q.group} for q in queries])

    dequantize_modules(adapter.model, next(adapter.model.parameters()).dtype)
    gcfg = config.gradients
    t0 = time.perf_counter()
    texts = [d.text for d in docs]
    windows = windows_for(adapter, texts, gcfg)
    normalizers = estimate_normalizers(adapter, windows, gcfg) if gcfg.precondition else None
    normalizer_seconds = time.perf_counter() - t0
    doc_features = collect_features(adapter, texts, gcfg, normalizers, "corpus gradients", progress, windows)
    query_features = collect_features(adapter, [q.text for q in queries], gcfg, normalizers, "query gradients",
                                      progress)
    scores = (query_features.values @ doc_features.values.T).astype(np.float32)
    np.save(out / SCORES, scores)
    np.save(out / "document_features.npy", doc_features.values.astype(np.float16))
    summary = {"influence": analyse(scores, docs, queries, config.top_k, out / "influence",
                                    f"{model_label}: influence, top-{config.top_k}")}
    if config.bm25:
        lexical = bm25_scores([q.text for q in queries], [d.text for d in docs])
        (out / "bm25").mkdir(exist_ok=True)
        np.save(out / "bm25" / SCORES, lexical.astype(np.float32))
        summary["bm25"] = analyse(lexical, docs, queries, config.top_k, out / "bm25",
                                  f"BM25 baseline, top-{config.top_k}")
    meta = {
        "fingerprint": fingerprint, "model": model_label, "documents": len(docs), "queries": len(queries),
        "features_per_example": int(doc_features.values.shape[1]),
        "bytes_per_example": doc_features.bytes_per_item,
        "index_bytes": doc_features.bytes_per_item * len(docs),
        "seconds": {"normalizers": normalizer_seconds, "corpus": doc_features.seconds,
                    "queries": query_features.seconds},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "device": str(adapter.device),
                        "gpu": torch.cuda.get_device_name() if adapter.device.type == "cuda" else None},
        "summary": summary,
    }
    meta_path.write_text(json.dumps(meta, indent=2, default=float))
    return meta


def load_run(run_dir: str | Path) -> tuple[np.ndarray, list[dict], list[dict], dict]:
    """scores, document rows, query rows and metadata of a finished run."""
    run = Path(run_dir)
    missing = [n for n in (SCORES, "documents.jsonl", "queries.jsonl", "attribution.json") if not (run / n).exists()]
    if missing:
        raise QrobustError(f"{run} is not a finished attribution run ({', '.join(missing)} missing): "
                           "run `qrobust attribute --out DIR` first")

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]

    summary = json.loads((run / "attribution.json").read_text())
    return np.load(run / SCORES), rows("documents.jsonl"), rows("queries.jsonl"), summary
