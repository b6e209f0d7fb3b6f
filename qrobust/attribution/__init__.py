"""Training-data attribution (TrackStar-style, through Bergson) for full-precision and quantized models."""
from qrobust.attribution.analysis import analyse
from qrobust.attribution.bm25 import bm25_scores
from qrobust.attribution.compare import compare_attributions
from qrobust.attribution.data import Document, Query, load_corpus, load_queries, stdlib_labels
from qrobust.attribution.gradients import GradientConfig
from qrobust.attribution.run import AttributionConfig, attribute, load_inputs, load_run

__all__ = [
    "AttributionConfig", "Document", "GradientConfig", "Query", "analyse", "attribute", "bm25_scores",
    "compare_attributions", "load_corpus", "load_inputs", "load_queries", "load_run", "stdlib_labels",
]
