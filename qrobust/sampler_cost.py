"""What the fast diffusion sampler's approximate cache costs a model, on the benchmarks' own text.

Token agreement between the fast and the exact sampler mixes two things: how much the stale cache
changes a prediction, and how far one changed token moves the rest of the generation. This study
measures the first alone. Each problem's reference solution (the same prompt and solution as the
degradation metrics, `degradation.problem_tokens`) is revealed block by block in a fixed random order
per problem (seeded by its task id), one token per step, and at every step the still-masked positions
are predicted by both forwards of the same sequence (`models.fast_dllm.cache_cost`):

- `ce_exact`, `ce_fast`: mean cross-entropy of the true tokens (nats per predicted position), and
  `ce_delta` = ce_fast − ce_exact, paired by problem; `ce_relative` = that over ce_exact;
- `kl`: KL(exact ‖ fast) per predicted position; `top1_agreement`: both argmaxes equal;
- `kl_by_revealed`: KL by the share of the block revealed since its refresh, in quarters (pooled
  positions): the approximation grows with the tokens committed since the cache was written.

Every figure has a percentile bootstrap 95% CI over problems (harness.metrics.bootstrap_mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.metrics import bootstrap_mean
from qrobust.degradation import DegradationConfig, per_problem_sum, problem_seed, problem_tokens
from qrobust.errors import QrobustError
from qrobust.models.fast_dllm import CacheCost, cache_cost

QUARTERS = ("0-25%", "25-50%", "50-75%", "75-100%")


@dataclass(frozen=True)
class SamplerCostConfig:
    benchmarks: tuple[str, ...] = ("humaneval", "mbpp")
    limit: int | None = None  # first K problems of each benchmark
    block_length: int = 32  # the fast sampler's block
    context_tokens: int | None = 64  # the prompt's last N tokens (None: all that fit)
    solution_tokens: int | None = 64  # the solution's first N tokens (None: all that fit)
    batch_size: int = 8
    seed: int = 0  # the reveal orders' seed, with each task id

    def __post_init__(self) -> None:
        if self.block_length < 1 or self.batch_size < 1:
            raise QrobustError(f"block length and batch size must be at least 1, got {self.block_length} "
                               f"and {self.batch_size}")


def _batch(problems, adapter, seed: int) -> tuple[torch.Tensor, ...]:
    """Left-padded prompts, right-padded solutions with their valid positions, and reveal orders."""
    P = max(len(p[1]) for p in problems)
    S = max(len(p[2]) for p in problems)
    pad = adapter.tokenizer.pad_token_id or 0
    ids = torch.full((len(problems), P), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    solution = torch.full((len(problems), S), adapter.mask_token_id, dtype=torch.long)
    valid = torch.zeros(len(problems), S, dtype=torch.bool)
    order = torch.empty(len(problems), S)
    for i, (task_id, prompt, sol) in enumerate(problems):
        ids[i, P - len(prompt):], attn[i, P - len(prompt):] = torch.tensor(prompt), 1
        solution[i, :len(sol)], valid[i, :len(sol)] = torch.tensor(sol), True
        order[i] = torch.rand(S, generator=torch.Generator().manual_seed(problem_seed(task_id, "reveal", seed)))
    return ids, attn, solution, valid, order


def _per_problem(values: torch.Tensor, rows: torch.Tensor, n: int) -> np.ndarray:
    """The mean of each problem's positions."""
    owners = rows.numpy()
    return per_problem_sum(values.double().numpy(), owners, n) / np.maximum(per_problem_sum(np.ones(len(owners)),
                                                                                            owners, n), 1)


def summarize(cost: CacheCost, n: int, block_length: int) -> dict:
    """The record of one benchmark from its positions (rows numbered 0 … n − 1 by problem)."""
    ce_exact = _per_problem(cost.ce_exact, cost.row, n)
    ce_fast = _per_problem(cost.ce_fast, cost.row, n)
    record = {"problems": n, "positions": int(cost.row.numel()),
              "ce_exact": bootstrap_mean(ce_exact).as_dict(), "ce_fast": bootstrap_mean(ce_fast).as_dict(),
              "ce_delta": bootstrap_mean(ce_fast - ce_exact).as_dict(),
              "kl": bootstrap_mean(_per_problem(cost.kl.clamp_min(0), cost.row, n)).as_dict(),
              "top1_agreement": bootstrap_mean(_per_problem(cost.top1_agree.double(), cost.row, n)).as_dict()}
    record["ce_relative"] = record["ce_delta"]["value"] / max(record["ce_exact"]["value"], 1e-12)
    quarter = (cost.revealed.double() * 4 / block_length).long().clamp(max=3)
    record["kl_by_revealed"] = {name: float(cost.kl[quarter == q].clamp_min(0).mean()) if bool((quarter == q).any())
                                else float("nan") for q, name in enumerate(QUARTERS)}
    return record


def sampler_cost(adapter, config: SamplerCostConfig) -> dict[str, dict]:
    """Per benchmark, what the fast sampler's cache costs `adapter`'s predictions (module docstring)."""
    if adapter.kind != "diffusion" or not adapter.native:
        raise QrobustError(f"{adapter.name}: the fast sampler's cost is measured on native diffusion models only")
    out = {}
    tokens = DegradationConfig(limit=config.limit, context_tokens=config.context_tokens,
                               solution_tokens=config.solution_tokens)
    for name in config.benchmarks:
        problems = problem_tokens(adapter, name, tokens)
        order = sorted(range(len(problems)), key=lambda i: -len(problems[i][1]) - len(problems[i][2]))
        parts = []
        for start in range(0, len(order), config.batch_size):
            chunk = order[start:start + config.batch_size]
            ids, attn, solution, valid, reveal = (t.to(adapter.device) for t in
                                                  _batch([problems[i] for i in chunk], adapter, config.seed))
            cost = cache_cost(adapter.model, ids, attn, solution, valid, reveal, adapter.mask_token_id,
                              adapter.shift_logits, config.block_length)
            cost.row = torch.tensor(chunk)[cost.row]  # batch rows to problem indices
            parts.append(cost)
        merged = CacheCost(**{f: torch.cat([getattr(c, f) for c in parts]) for f in CacheCost.__dataclass_fields__})
        out[name] = summarize(merged, len(problems), config.block_length) | {
            "task_ids": [p[0] for p in problems]}
    return out
