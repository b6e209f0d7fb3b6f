"""Okapi BM25 over code tokens: the lexical baseline that influence scores must beat."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from qrobust.zoo.corpus import code_tokens


def bm25_scores(queries: list[str], docs: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """[queries, docs] BM25 scores; identifier, number and punctuation tokens, case kept."""
    doc_counts = [Counter(code_tokens(d)) for d in docs]
    lengths = np.array([sum(c.values()) for c in doc_counts], dtype=float)
    avg_len = lengths.mean() if len(lengths) else 0.0
    df = Counter(t for c in doc_counts for t in c)
    n = len(docs)
    idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
    norm = k1 * (1 - b + b * lengths / max(avg_len, 1e-9))
    scores = np.zeros((len(queries), n))
    for qi, q in enumerate(queries):
        for term in set(code_tokens(q)):
            if term not in idf:
                continue
            tf = np.array([c.get(term, 0) for c in doc_counts], dtype=float)
            scores[qi] += idf[term] * tf * (k1 + 1) / (tf + norm)
    return scores
