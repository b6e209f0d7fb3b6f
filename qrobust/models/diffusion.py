"""Masked diffusion over tokens: corruption, the training loss (an ELBO), and the sampler.

The forward process replaces each token independently with the mask token with probability t.
The loss is the cross-entropy on masked positions weighted 1/t and divided by batch × length,
as in CoDA/SMDM/LLaDA; its expectation over t ~ U(eps, 1) bounds the per-token NLL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def mask_tokens(
    input_ids: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    maskable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each maskable token of row b with probability t[b]; returns (noisy ids, mask)."""
    u = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    masked = u < t.to(input_ids.device)[:, None]
    if maskable is not None:
        masked &= maskable
    return torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids), masked


def stratified_mask_ratios(n: int, eps: float = 1e-3) -> torch.Tensor:
    """n mask ratios spread evenly over (eps, 1): one per calibration or evaluation sequence."""
    return eps + (1 - eps) * (torch.arange(n, dtype=torch.float32) + 0.5) / n


def align_logits(logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """Logits indexed by the position they predict. With shift, position i is read at i-1."""
    if not shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def masked_diffusion_loss(
    logits_fn: Logits,
    input_ids: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    shift: bool,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Σ_masked CE / t, divided by B × L (the number of real tokens) unless reduction is 'sum'
    (the batch's sum) or 'row' (each sequence's sum, [B])."""
    maskable = attention_mask.bool() if attention_mask is not None else None
    if shift:  # the first token has no logits predicting it, so it stays visible
        first = torch.zeros_like(input_ids, dtype=torch.bool)
        first[:, 0] = True
        maskable = ~first if maskable is None else maskable & ~first
    noisy, masked = mask_tokens(input_ids, t, mask_token_id, generator, maskable)
    logits = align_logits(logits_fn(noisy, attention_mask), shift).float()
    ce = F.cross_entropy(logits.transpose(1, 2), input_ids, reduction="none")
    ce = ce.masked_fill(~masked, 0) / t.to(ce.device)[:, None]
    if reduction == "sum":
        return ce.sum()
    if reduction == "row":
        return ce.sum(dim=1)
    n_tokens = attention_mask.sum() if attention_mask is not None else input_ids.numel()
    return ce.sum() / n_tokens


@dataclass
class SamplerConfig:
    """Iterative unmasking, as in Dream/CoDA (one block) or LLaDA (semi-autoregressive blocks).

    steps: denoising steps over the whole response; block_length: None for one block;
    alg: how confident a masked position is — 'confidence' (max prob), 'margin' (top1 − top2),
    'entropy' (negative entropy) or 'random'; temperature 0 is greedy; top_p nucleus filter.
    mode: 'exact' recomputes the whole sequence at every step and commits steps' schedule;
    'fast' (models.fast_dllm, after Fast-dLLM) decodes block by block over an approximate KV
    cache refreshed when a block completes, committing at each step every masked position of
    the block whose token probability exceeds `threshold` (at least the most confident one).
    """

    steps: int | None = None  # default: one token per step
    block_length: int | None = None
    alg: str = "entropy"
    temperature: float = 0.0
    top_p: float = 1.0
    mode: str = "exact"
    threshold: float = 0.9

    def __post_init__(self) -> None:
        if self.alg not in ("confidence", "margin", "entropy", "random"):
            raise ValueError(f"unknown unmasking rule {self.alg!r}")
        if self.mode not in ("exact", "fast"):
            raise ValueError(f"unknown sampler mode {self.mode!r}: use exact or fast")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """Token choice and the probability distribution it was drawn from, for [N, V] logits."""
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(logits.float(), dim=-1)
    if temperature <= 0:
        return probs.argmax(-1), probs
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    return tokens, probs


def _confidence(probs: torch.Tensor, tokens: torch.Tensor, alg: str, generator) -> torch.Tensor:
    if alg == "confidence":
        return probs.gather(-1, tokens[:, None]).squeeze(-1)
    if alg == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-10))).sum(-1)
    return torch.rand(tokens.shape, generator=generator, device="cpu").to(probs.device)


def _commit_schedule(n_masked: int, steps: int) -> list[int]:
    """How many tokens to commit at each of `steps` steps: as even as possible, all by the end."""
    base, extra = divmod(n_masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


@torch.no_grad()
def diffusion_generate(
    logits_fn: Logits,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    mask_token_id: int,
    shift: bool,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Fill max_new_tokens masks after left-padded prompts; returns (response ids, forward passes)."""
    B, P = input_ids.shape
    device = input_ids.device
    x = torch.cat([input_ids, torch.full((B, max_new_tokens), mask_token_id, device=device)], dim=1)
    attn = torch.cat([attention_mask, torch.ones(B, max_new_tokens, dtype=attention_mask.dtype, device=device)], 1)
    block = config.block_length or max_new_tokens
    n_blocks = -(-max_new_tokens // block)
    total_steps = config.steps or max_new_tokens
    steps_per_block = max(1, total_steps // n_blocks)
    passes = 0
    for b in range(n_blocks):
        lo, hi = P + b * block, min(P + (b + 1) * block, P + max_new_tokens)
        schedule = _commit_schedule(hi - lo, min(steps_per_block, hi - lo))
        for k in schedule:
            logits = align_logits(logits_fn(x, attn), shift)
            logits[..., mask_token_id] = float("-inf")  # a committed token is never the mask
            passes += 1
            if on_step is not None:
                on_step()
            commit_top(x, logits, lo, hi, k, mask_token_id, config, generator)
    return x[:, P:], passes


def block_choices(x: torch.Tensor, block_logits: torch.Tensor, lo: int, hi: int, mask_token_id: int,
                  config: SamplerConfig, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For positions lo … hi − 1 of every row at once: (masked [B, T], proposed tokens [B, T],
    their probabilities [B, T], confidence [B, T] with −inf where not masked). block_logits
    [B, T, V] are those positions' aligned logits (align_logits)."""
    B, T = x.shape[0], hi - lo
    masked = x[:, lo:hi] == mask_token_id
    tokens, probs = _sample(block_logits.reshape(B * T, -1), config.temperature, config.top_p, generator)
    conf = _confidence(probs, tokens, config.alg, generator).view(B, T)
    chosen_p = probs.gather(-1, tokens[:, None]).view(B, T)
    return masked, tokens.view(B, T), chosen_p, conf.masked_fill(~masked, float("-inf"))


def commit_top(x: torch.Tensor, logits: torch.Tensor, lo: int, hi: int, k: int, mask_token_id: int,
               config: SamplerConfig, generator) -> None:
    """Commit, in every row, its k most confident masked positions of lo … hi − 1 (all it has if fewer)."""
    masked, tokens, _, conf = block_choices(x, logits[:, lo:hi], lo, hi, mask_token_id, config, generator)
    chosen = conf.topk(min(k, hi - lo), dim=-1).indices
    take = torch.zeros_like(masked).scatter_(1, chosen, True) & masked
    x[:, lo:hi] = torch.where(take, tokens, x[:, lo:hi])
