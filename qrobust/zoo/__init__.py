"""The built-in model pair (tiny-ar, tiny-dllm): corpus, training and model cards."""
from qrobust.zoo.corpus import build_corpus, read_split
from qrobust.zoo.train import ZooConfig, train_zoo

__all__ = ["build_corpus", "read_split", "ZooConfig", "train_zoo"]
