"""Token-level scores for lm-eval requests: exact log-probs (AR) and Monte-Carlo ELBOs (diffusion).

A request is (context tokens, continuation tokens). The AR score is Σ log p(x_i | x_<i) over the
continuation, computed as lm-eval's own `hf` model does (right-padded batches, the input cut to
the last max_length + 1 tokens). A masked-diffusion model has no exact conditional likelihood;
its score is a Monte-Carlo estimate of the ELBO of the continuation given the (never masked)
context: mask some continuation tokens, sum the log-probs of the masked ones, reweight. The
ELBO is a lower bound on log p(continuation | context), so diffusion scores are bounds, and
they are comparable across models only under the same masks: every request's masks come from a
seed derived from its tokens and the base seed, so a full-precision and a quantized model see
exactly the same corruptions.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from qrobust.errors import QrobustError
from qrobust.models.diffusion import align_logits

TokenPair = tuple[list[int], list[int]]
# (samples K, continuation length L, generator, eps) -> (mask [K, L] bool, weight [K])
Estimator = Callable[[int, int, torch.Generator, float], tuple[torch.Tensor, torch.Tensor]]


def _strata(k: int, generator: torch.Generator) -> torch.Tensor:
    """One uniform draw in each of k equal slices of (0, 1): stratified sampling of the noise level."""
    return (torch.arange(k, dtype=torch.float64) + torch.rand(k, generator=generator, dtype=torch.float64)) / k


def ratio_estimator(k: int, length: int, generator: torch.Generator, eps: float):
    """Dream/MDLM form: t ~ U(eps, 1) stratified, each token masked with probability t, weight 1/t."""
    t = eps + (1 - eps) * _strata(k, generator)
    mask = torch.rand(k, length, generator=generator, dtype=torch.float64) < t[:, None]
    return mask, 1.0 / t


def count_estimator(k: int, length: int, generator: torch.Generator, eps: float):
    """LLaDA form: a number of masked tokens l uniform on 1..L (stratified), l positions drawn
    uniformly, weight L / l. Lower variance than the ratio form on short continuations: no
    sample masks nothing."""
    n_masked = (_strata(k, generator) * length).ceil().clamp(1, length).long()
    order = torch.rand(k, length, generator=generator).argsort(dim=1)
    mask = order < n_masked[:, None]
    return mask, length / n_masked.double()


ESTIMATORS: dict[str, Estimator] = {"ratio": ratio_estimator, "count": count_estimator}


def request_seed(base_seed: int, context: Sequence[int], continuation: Sequence[int]) -> int:
    """A seed fixed by the request's tokens: the same masks for every model that shares the tokenizer."""
    text = f"{base_seed}|{','.join(map(str, context))}|{','.join(map(str, continuation))}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def fit_window(context: list[int], continuation: list[int], max_length: int) -> TokenPair:
    """Cut the context from the left so that context + continuation fits, keeping one context token."""
    continuation = continuation[-(max_length - 1):] if len(continuation) >= max_length else continuation
    keep = max(1, max_length - len(continuation))
    return context[-keep:], continuation


@torch.no_grad()
def ar_scores(logits_fn, pairs: list[TokenPair], max_length: int, batch_size: int, pad_id: int,
              device) -> list[tuple[float, bool]]:
    """Exact Σ log p and is_greedy per (context, continuation); longest first, in batches."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        inputs = [(pairs[i][0] + pairs[i][1])[-(max_length + 1):][:-1] for i in chunk]
        width = max(len(x) for x in inputs)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, :len(x)] = torch.tensor(x)
        logp = F.log_softmax(logits_fn(ids.to(device)).float(), dim=-1).cpu()
        for row, i in enumerate(chunk):
            cont = torch.tensor(pairs[i][1])
            end = len(inputs[row])
            scores = logp[row, end - len(cont):end]
            out[i] = (float(scores.gather(-1, cont[:, None]).sum()), bool((scores.argmax(-1) == cont).all()))
    return out  # type: ignore[return-value]


@dataclass
class DiffusionScorer:
    """Monte-Carlo ELBO of continuations given contexts under a masked-diffusion model.

    estimator: 'ratio' or 'count' (see ESTIMATORS); samples: masked copies per request;
    batch_size: copies per forward pass; eps: the smallest mask ratio of the 'ratio' form.
    is_greedy is whether, with the whole continuation masked, the argmax at every position is the
    continuation (what one-step greedy unmasking would produce).
    """

    logits_fn: Callable
    mask_token_id: int
    shift_logits: bool
    estimator: str = "count"
    samples: int = 32
    batch_size: int = 32
    eps: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise QrobustError(f"unknown diffusion estimator {self.estimator!r}: choose from {', '.join(ESTIMATORS)}")
        if self.samples < 1:
            raise QrobustError(f"mc_samples must be at least 1, got {self.samples}")

    def _log_probs(self, seq: torch.Tensor, masks: torch.Tensor, start: int, device) -> torch.Tensor:
        """[K, L] log-probs of the continuation tokens with masks[k] applied to copy k."""
        cont = seq[start:]
        rows = seq.repeat(masks.shape[0], 1)
        rows[:, start:] = torch.where(masks, torch.full_like(cont, self.mask_token_id), cont)
        logits = align_logits(self.logits_fn(rows.to(device), None), self.shift_logits)[:, start:].float()
        return F.log_softmax(logits, dim=-1).cpu().gather(-1, cont.expand(masks.shape[0], -1)[..., None])[..., 0]

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int], device, greedy: bool = True) \
            -> tuple[float, bool]:
        """(ELBO estimate, is_greedy); greedy=False skips the extra forward pass and returns False."""
        if not context:
            raise QrobustError("a diffusion score needs at least one context token (lm-eval adds one)")
        seq = torch.tensor(context + continuation)
        start, length = len(context), len(continuation)
        g = torch.Generator().manual_seed(request_seed(self.seed, context, continuation))
        masks, weights = ESTIMATORS[self.estimator](self.samples, length, g, self.eps)
        total = 0.0
        for lo in range(0, self.samples, self.batch_size):
            m = masks[lo:lo + self.batch_size]
            logp = self._log_probs(seq, m, start, device).double()
            total += float(((logp * m).sum(-1) * weights[lo:lo + self.batch_size]).sum())
        return total / self.samples, greedy and self._greedy(seq, start, device)

    def _greedy(self, seq: torch.Tensor, start: int, device) -> bool:
        rows = seq.clone()[None]
        rows[:, start:] = self.mask_token_id
        logits = align_logits(self.logits_fn(rows.to(device), None), self.shift_logits)[0, start:]
        logits[..., self.mask_token_id] = float("-inf")
        return bool((logits.argmax(-1).cpu() == seq[start:]).all())
