"""Scoring: the unbiased pass@k estimator, bootstrap intervals, and paired comparisons."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): 1 − C(n−c, k)/C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def per_problem_pass_at_k(counts: list[tuple[int, int]], k: int) -> np.ndarray:
    """pass@k of each problem from its (n samples, c correct)."""
    return np.array([pass_at_k(n, c, k) for n, c in counts])


@dataclass
class Estimate:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def bootstrap_mean(values: np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Mean over problems with a percentile bootstrap interval (problems resampled)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_boot, values.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(values.mean()), float(low), float(high))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (A only) and c (B only)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class PairedComparison:
    difference: Estimate  # mean of (B − A) over problems
    only_a: int
    only_b: int
    p_value: float  # exact McNemar on per-problem pass/fail (pass@1 with one sample)

    def as_dict(self) -> dict:
        return {**{f"diff_{k}": v for k, v in self.difference.as_dict().items()},
                "only_a": self.only_a, "only_b": self.only_b, "p_value": self.p_value}


def paired_comparison(a: np.ndarray, b: np.ndarray, seed: int = 0) -> PairedComparison:
    """Compare two runs on the same problems: per-problem scores in [0, 1], same order."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError("paired comparison needs the same problems in both runs")
    diff = bootstrap_mean(b - a, seed=seed)
    pa, pb = a >= 0.5, b >= 0.5
    only_a, only_b = int(np.sum(pa & ~pb)), int(np.sum(~pa & pb))
    return PairedComparison(diff, only_a, only_b, mcnemar_exact(only_a, only_b))


def bootstrap_pooled_quantile(per_problem: list[np.ndarray], q: float, n_boot: int = 1000, alpha: float = 0.05,
                              seed: int = 0) -> Estimate:
    """The q-quantile of values pooled over problems (e.g. every token's KL), with a percentile
    bootstrap that resamples whole problems: a problem drawn twice counts all its values twice."""
    sizes = np.array([len(v) for v in per_problem])
    if sizes.sum() == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    values = np.concatenate([np.asarray(v, float) for v in per_problem])
    owner = np.repeat(np.arange(len(per_problem)), sizes)
    order = np.argsort(values, kind="stable")
    values, owner = values[order], owner[order]
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(per_problem), np.full(len(per_problem), 1 / len(per_problem)), size=n_boot)

    def weighted_quantile(weights: np.ndarray) -> float:
        cum = np.cumsum(weights)
        return float(values[min(np.searchsorted(cum, q * cum[-1]), len(values) - 1)])

    boots = [weighted_quantile(w[owner]) for w in draws if w[owner].sum() > 0]
    return Estimate(float(np.quantile(values, q)), float(np.quantile(boots, alpha / 2)),
                    float(np.quantile(boots, 1 - alpha / 2)))
