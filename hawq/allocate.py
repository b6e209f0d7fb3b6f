"""Bit allocation as an exact integer program, and the Pareto frontier over budgets.

Binary xₗ_b picks bit width b for layer l: minimise Σ Ωₗ(b)·xₗ_b subject to Σ_b xₗ_b = 1 and a
budget — average bits per weight, total bytes (codes, fp16 scales and packed zero points), or a
latency model Σ latₗ(b)·xₗ_b ≤ L. Options: the same bits for every layer of a block, and
fixed bits for chosen layers. Solved with scipy's MILP (HiGHS).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qrobust.errors import QrobustError


@dataclass(frozen=True)
class Budget:
    avg_bits: float | None = None
    total_bytes: float | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.avg_bits, self.total_bytes, self.latency)) != 1:
            raise QrobustError("give exactly one budget: --budget-bits, --budget-bytes or --budget-latency")

    def describe(self) -> dict:
        return {k: v for k, v in (("avg_bits", self.avg_bits), ("total_bytes", self.total_bytes),
                                  ("latency", self.latency)) if v is not None}


def layer_bytes(n_params: int, out_features: int, in_features: int, bits: int, group_size: int) -> float:
    groups = 1 if group_size == -1 else in_features // group_size
    return n_params * bits / 8 + groups * out_features * (2 + bits / 8)


@dataclass
class Allocation:
    bits: dict[str, int]
    objective: float
    avg_bits: float
    total_bytes: float


def allocate(costs: dict[str, dict[int, float]], n_params: dict[str, int], budget: Budget,
             sizes: dict[str, dict[int, float]] | None = None, latency: dict[str, dict[int, float]] | None = None,
             blocks: dict[str, int] | None = None, same_bits_per_block: bool = False,
             fixed: dict[str, int] | None = None) -> Allocation:
    names = list(costs)
    bits = sorted({b for c in costs.values() for b in c})
    idx = {(n, b): i for i, (n, b) in enumerate((n, b) for n in names for b in bits)}
    nvar = len(idx)
    c = np.zeros(nvar)
    for (n, b), i in idx.items():
        c[i] = costs[n].get(b, np.inf)
    c[~np.isfinite(c)] = 1e30
    rows, lo, hi = [], [], []

    def add(coeffs: dict[int, float], low: float, high: float) -> None:
        row = np.zeros(nvar)
        for i, v in coeffs.items():
            row[i] = v
        rows.append(row)
        lo.append(low)
        hi.append(high)

    for n in names:
        add({idx[n, b]: 1 for b in bits}, 1, 1)
    total = sum(n_params[n] for n in names)
    if budget.avg_bits is not None:
        add({idx[n, b]: n_params[n] * b for n in names for b in bits}, -np.inf, budget.avg_bits * total)
    elif budget.total_bytes is not None:
        if sizes is None:
            raise QrobustError("a byte budget needs per-layer sizes")
        add({idx[n, b]: sizes[n][b] for n in names for b in bits}, -np.inf, budget.total_bytes)
    else:
        if latency is None:
            raise QrobustError("a latency budget needs a latency table (--latency-table)")
        missing = [n for n in names if any(b not in latency.get(n, {}) for b in bits)]
        if missing:
            raise QrobustError(f"latency table lacks {missing[0]} at some bit width: measure every layer and width")
        add({idx[n, b]: latency[n][b] for n in names for b in bits}, -np.inf, budget.latency)
    if same_bits_per_block and blocks:
        by_block: dict[int, list[str]] = {}
        for n in names:
            by_block.setdefault(blocks[n], []).append(n)
        for members in by_block.values():
            for a, b2 in zip(members, members[1:]):
                for b in bits:
                    add({idx[a, b]: 1, idx[b2, b]: -1}, 0, 0)
    for n, b in (fixed or {}).items():
        if (n, b) not in idx:
            raise QrobustError(f"cannot fix {n} to {b} bits: not a layer or not a candidate width")
        add({idx[n, b]: 1}, 1, 1)
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(nvar),
               bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        raise QrobustError(f"budget {budget.describe()} is infeasible with bits {bits}: "
                           "raise the budget or add wider bit widths")
    chosen = {n: next(b for b in bits if res.x[idx[n, b]] > 0.5) for n in names}
    avg = sum(n_params[n] * chosen[n] for n in names) / total
    size = sum(sizes[n][chosen[n]] for n in names) if sizes else float("nan")
    return Allocation(chosen, float(sum(costs[n][chosen[n]] for n in names)), avg, size)


def pareto_frontier(costs, n_params, sizes, bits: list[int], step: float = 0.125, **kw) -> list[dict]:
    """Optimal allocations over a grid of average-bit budgets, plus every uniform config."""
    rows = []
    for target in np.arange(min(bits), max(bits) + 1e-9, step):
        a = allocate(costs, n_params, Budget(avg_bits=float(target)), sizes=sizes, **kw)
        rows.append({"kind": "hawq", "budget_avg_bits": float(target), "avg_bits": a.avg_bits,
                     "total_bytes": a.total_bytes, "sensitivity": a.objective})
    for b in bits:
        rows.append({"kind": "uniform", "budget_avg_bits": float(b), "avg_bits": float(b),
                     "total_bytes": sum(sizes[n][b] for n in costs), "sensitivity": sum(costs[n][b] for n in costs)})
    return rows
