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


# Rows of logits turned into probabilities at once: bounds the float32 copy ([rows, vocabulary]).
CHOOSE_CHUNK_ROWS = 2048
# The nucleus is looked for among each row's most probable tokens first; only rows whose nucleus is
# larger than this fall back to a full sort (random-weight models do, trained ones at low temperature rarely).
NUCLEUS_CANDIDATES = 64


@dataclass
class Choice:
    """What a sampler step needs of each position: the proposed token, its probability under the
    distribution it was drawn from (after temperature and top-p), and the unmasking rule's confidence."""

    tokens: torch.Tensor  # [N]
    prob: torch.Tensor  # [N]
    confidence: torch.Tensor  # [N]


def _quantile_index(q: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row of the distribution q [N, V] (in any order), the index [N, 1] where its cumulative
    mass first reaches uniform [N]: a draw from q."""
    return (q.cumsum(-1) < uniform[:, None]).sum(-1, keepdim=True).clamp(max=q.shape[-1] - 1)


def nucleus_draw(sorted_p: torch.Tensor, order: torch.Tensor, top_p: float,
                 uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A draw from the nucleus, given a prefix of each row's probabilities sorted in descending order
    that holds it (sorted_p, and the token ids `order`): keep a token while the mass before it is at
    most top_p, renormalize, take the token at quantile uniform [N]. Returns the tokens [N, 1], the
    renormalized distribution q and the index drawn in it [N, 1]. No host sync (CUDA-graph safe)."""
    kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0) if top_p < 1.0 else sorted_p
    q = kept / kept.sum(-1, keepdim=True)
    # where rounding leaves the cumulative mass short of the quantile, the least probable kept token
    below = _quantile_index(q, uniform).minimum((q > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, below), q, below


def _from_sorted(sorted_p: torch.Tensor, order: torch.Tensor, top_p: float, uniform: torch.Tensor, alg: str,
                 random_conf: torch.Tensor) -> Choice:
    """The choice (nucleus_draw) with its probability and the unmasking rule's confidence."""
    tokens, q, below = nucleus_draw(sorted_p, order, top_p, uniform)
    prob = q.gather(-1, below).squeeze(-1)
    return Choice(tokens.squeeze(-1), prob, _confidence(q, prob, alg, random_conf))


def _confidence(q: torch.Tensor, prob: torch.Tensor, alg: str, random_conf: torch.Tensor) -> torch.Tensor:
    """The rule's confidence from each row's distribution q (any order) and the chosen token's probability."""
    if alg == "confidence":
        return prob
    if alg == "margin":
        top2 = q.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        return (q * torch.log(q.clamp_min(1e-10))).sum(-1)
    return random_conf


def _choose_chunk(logits: torch.Tensor, config: SamplerConfig, uniform: torch.Tensor,
                  random_conf: torch.Tensor) -> Choice:
    if config.temperature <= 0:
        probs = torch.softmax(logits.float(), dim=-1)
        prob, tokens = probs.max(-1)
        return Choice(tokens, prob, _confidence(probs, prob, config.alg, random_conf))
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p >= 1.0:  # no nucleus: draw from the whole distribution in vocabulary order
        below = _quantile_index(probs, uniform)
        prob = probs.gather(-1, below).squeeze(-1)
        return Choice(below.squeeze(-1), prob, _confidence(probs, prob, config.alg, random_conf))
    top_p, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    choice = _from_sorted(top_p, order, config.top_p, uniform, config.alg, random_conf)
    # A row's nucleus lies among its candidates when their mass exceeds top_p: the next token is then dropped.
    wide = (top_p.sum(-1) <= config.top_p).nonzero().squeeze(-1)
    if len(wide) and top_p.shape[-1] < probs.shape[-1]:
        sorted_p, full_order = probs[wide].sort(dim=-1, descending=True)
        redo = _from_sorted(sorted_p, full_order, config.top_p, uniform[wide], config.alg, random_conf[wide])
        for name in ("tokens", "prob", "confidence"):
            getattr(choice, name)[wide] = getattr(redo, name)
    return choice


def choose(logits: torch.Tensor, config: SamplerConfig, generator: torch.Generator | None) -> Choice:
    """Tokens for logits [N, V]: the argmax at temperature 0, else a draw from the nucleus (top_p) of
    softmax(logits / temperature) at a uniform quantile drawn on the CPU (so a seed gives the same
    draws on every device, and no [N, V] tensor leaves the device). Rows go in chunks of
    CHOOSE_CHUNK_ROWS so that the float32 probabilities stay bounded."""
    N = logits.shape[0]
    uniform = torch.rand(N, generator=generator).to(logits.device)
    random_conf = torch.rand(N, generator=generator).to(logits.device) if config.alg == "random" else uniform
    parts = [_choose_chunk(logits[i:i + CHOOSE_CHUNK_ROWS], config, uniform[i:i + CHOOSE_CHUNK_ROWS],
                           random_conf[i:i + CHOOSE_CHUNK_ROWS]) for i in range(0, max(N, 1), CHOOSE_CHUNK_ROWS)]
    if len(parts) == 1:
        return parts[0]
    return Choice(*(torch.cat([getattr(c, name) for c in parts]) for name in ("tokens", "prob", "confidence")))


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
            logits = positions_logits(logits_fn(x, attn), x.shape[1], lo, hi, shift)
            logits[..., mask_token_id] = float("-inf")  # a committed token is never the mask
            passes += 1
            if on_step is not None:
                on_step()
            commit_top(x, logits, lo, hi, k, mask_token_id, config, generator)
    return x[:, P:], passes


def positions_logits(logits: torch.Tensor, length: int, lo: int, hi: int, shift: bool) -> torch.Tensor:
    """The aligned logits (align_logits) of positions lo … hi − 1, from the logits of the last
    logits.shape[1] positions of a sequence of `length` (a logits function may skip the prompt's)."""
    offset = length - logits.shape[1]
    if offset == 0:
        return align_logits(logits, shift)[:, lo:hi]
    s = 1 if shift else 0
    if lo - s < offset:
        raise ValueError(f"positions {lo}…{hi - 1} need logits from {lo - s}, the function gives them from {offset}")
    return logits[:, lo - s - offset:hi - s - offset]


def block_choices(x: torch.Tensor, block_logits: torch.Tensor, lo: int, hi: int, mask_token_id: int,
                  config: SamplerConfig, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For positions lo … hi − 1 of every row at once: (masked [B, T], proposed tokens [B, T],
    their probabilities [B, T], confidence [B, T] with −inf where not masked). block_logits
    [B, T, V] are those positions' aligned logits (align_logits). Only masked positions are
    looked at; elsewhere the token stays what it is."""
    masked = x[:, lo:hi] == mask_token_id
    rows = block_logits[masked]  # [n masked, V]
    choice = choose(rows, config, generator)
    tokens = x[:, lo:hi].masked_scatter(masked, choice.tokens)
    prob = torch.zeros(masked.shape, device=x.device).masked_scatter(masked, choice.prob.float())
    conf = torch.full(masked.shape, float("-inf"), device=x.device).masked_scatter(masked, choice.confidence.float())
    return masked, tokens, prob, conf


def commit_top(x: torch.Tensor, block_logits: torch.Tensor, lo: int, hi: int, k: int, mask_token_id: int,
               config: SamplerConfig, generator) -> None:
    """Commit, in every row, its k most confident masked positions of lo … hi − 1 (all it has if
    fewer); block_logits [B, hi − lo, V] are those positions' (positions_logits)."""
    masked, tokens, _, conf = block_choices(x, block_logits, lo, hi, mask_token_id, config, generator)
    chosen = conf.topk(min(k, hi - lo), dim=-1).indices
    take = torch.zeros_like(masked).scatter_(1, chosen, True) & masked
    x[:, lo:hi] = torch.where(take, tokens, x[:, lo:hi])
