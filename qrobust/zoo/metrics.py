"""Likelihood metrics shared by training, model cards and sweeps (nats per token)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from qrobust.models.diffusion import masked_diffusion_loss

Logits = Callable[..., torch.Tensor]


def windows(tokens: torch.Tensor, seq_len: int, n: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seq_len] from a 1-D token stream."""
    count = tokens.numel() // seq_len if n is None else min(n, tokens.numel() // seq_len)
    return tokens[:count * seq_len].view(count, seq_len).long()


@torch.no_grad()
def ar_nll_rows(logits_fn: Logits, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Exact next-token NLL per predicted token of each window [N], the windows run in batches."""
    rows = []
    for b in ids.split(batch_size):
        logits = logits_fn(b)[:, :-1].float()
        rows.append(F.cross_entropy(logits.transpose(1, 2), b[:, 1:], reduction="none").mean(dim=1).cpu())
    return torch.cat(rows)


def ar_nll(logits_fn: Logits, ids: torch.Tensor, batch_size: int = 16) -> float:
    """Exact next-token NLL per predicted token (equal-length windows: the mean of the rows')."""
    return float(ar_nll_rows(logits_fn, ids, batch_size).mean())


@torch.no_grad()
def diffusion_nelbo_rows(logits_fn: Logits, ids: torch.Tensor, mask_token_id: int, shift: bool = True,
                         samples: int = 8, seed: int = 0, batch_size: int = 16) -> torch.Tensor:
    """Monte-Carlo negative ELBO per token of each window [N]: `samples` mask ratios stratified
    over (0, 1), each batch with its own seeded mask. An upper bound on the NLL per token."""
    total = torch.zeros(ids.shape[0], dtype=torch.float64)
    for k in range(samples):
        t = (k + 0.5) / samples
        total += torch.cat([masked_diffusion_loss(logits_fn, b, torch.full((b.shape[0],), t), mask_token_id, shift,
                                                  torch.Generator().manual_seed(seed + 1000 * k + j),
                                                  reduction="row").double().cpu()
                            for j, b in enumerate(ids.split(batch_size))])
    return (total / (samples * ids.shape[1])).float()


def diffusion_nelbo(logits_fn: Logits, ids: torch.Tensor, mask_token_id: int, shift: bool = True,
                    samples: int = 8, seed: int = 0, batch_size: int = 16) -> float:
    """The windows' negative ELBO per token (equal-length windows: the mean of the rows')."""
    return float(diffusion_nelbo_rows(logits_fn, ids, mask_token_id, shift, samples, seed, batch_size).mean())


def unigram_nll(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int) -> float:
    """NLL per token of a unigram model fit on the training tokens (add-one smoothing)."""
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1
    logp = torch.log(counts / counts.sum())
    return float(-logp[val_tokens.long()].mean())
