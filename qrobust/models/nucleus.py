"""A draw from the top-p nucleus of 16-bit logits without sorting the vocabulary.

The AR engine samples every decoding step inside a CUDA graph, so the draw cannot ask the host
anything (how wide a row's nucleus is, say). Sorting each row's whole distribution needs no host,
but a [batch, 151,936] sort per step is one of the largest costs of a sampled step.

bf16 and fp16 logits take at most 65,536 values, and tokens of equal logits have equal
probabilities. So a row's distribution in descending order is that of its values: one count per
value (a scatter-add of ones, integer and hence deterministic) stands in for the sort, and every
cumulative sum runs over 65,536 bins instead of the vocabulary. Only the drawn token is looked up
among the tokens of its value, in token-id order: the order a stable descending sort gives ties.

The draw is the one `models.diffusion.nucleus_draw` makes from the sorted distribution: keep a token
while the mass before it is at most top_p, and take the first whose cumulative mass reaches the
quantile `uniform` of the kept mass. The two can disagree only where float32 rounding of the two
ways' cumulative sums falls on different sides of top_p or of the quantile; over a nucleus of
100k tokens the sort's sums drift by a token now and then where these stay on a float64 sort's.

On CUDA the draw runs as two Triton kernels (kernels.nucleus); these torch ops are the CPU path
and the reference.
"""
from __future__ import annotations

import torch

from qrobust.kernels import kernels_enabled
from qrobust.models.diffusion import nucleus_draw

VALUES = 1 << 16  # the values a 16-bit float takes


def histogram_draw_applies(logits: torch.Tensor) -> bool:
    """Whether histogram_draw takes these logits: 16-bit floats."""
    return logits.dtype in (torch.bfloat16, torch.float16)


def _descending_rank(logits: torch.Tensor) -> torch.Tensor:
    """Each logit's rank among the 65,536 values of its dtype, 0 for the largest: the bit pattern
    turned so that integer order is float order (negative floats' patterns reversed), −0 as +0."""
    bits = logits.view(torch.int16).to(torch.int32) & 0xFFFF
    bits = torch.where(bits == 0x8000, 0, bits)
    ascending = torch.where(bits >= 0x8000, 0xFFFF - bits, bits | 0x8000)
    return 0xFFFF - ascending


def _rank_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The value [65,536] (float32) of each rank: _descending_rank's inverse."""
    ascending = 0xFFFF - torch.arange(VALUES, dtype=torch.int32, device=device)
    bits = torch.where(ascending >= 0x8000, ascending & 0x7FFF, 0xFFFF - ascending)
    return bits.to(torch.int16).view(dtype).float()


def histogram_draw(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Tokens [N, 1] drawn at quantile uniform [N] from the nucleus (top_p) of softmax(logits [N, V]
    / temperature), logits bf16 or fp16, temperature > 0. No host sync (CUDA-graph safe). Where
    the Triton kernels run by default, in two kernels (kernels.nucleus); else these torch ops."""
    if kernels_enabled(logits.device):
        from qrobust.kernels.nucleus import nucleus_draw_kernel

        return nucleus_draw_kernel(logits, temperature, top_p, uniform)
    return histogram_draw_torch(logits, temperature, top_p, uniform)


def histogram_draw_torch(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """histogram_draw in torch ops: a scatter-add of ones, then cumulative sums over the values."""
    N = logits.shape[0]
    rank = _descending_rank(logits)
    counts = torch.zeros(N, VALUES, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(1, rank.long(), torch.ones_like(rank))
    present = counts > 0
    bins = torch.arange(VALUES, device=logits.device)
    z = _rank_values(logits.dtype, logits.device) / temperature  # as softmax(logits.float() / temperature)
    first = present.int().argmax(-1, keepdim=True)  # the largest logit's bin
    weight = torch.where(present, torch.exp(z[None] - z[first]), 0.0)
    p = weight / (counts * weight).sum(-1, keepdim=True)  # a token's probability, per bin
    mass = counts * p
    if top_p < 1.0:
        before = mass.cumsum(-1) - mass  # the mass of every more probable token
        # the j-th token of a bin (from 0) is kept while before + j·p ≤ top_p
        fits = torch.floor((top_p - before) / p.clamp_min(torch.finfo(p.dtype).tiny)) + 1
        kept = torch.where(p > 0, fits.clamp(min=0).minimum(counts.float()), torch.where(before <= top_p, counts, 0))
        mass = kept * p
    else:
        kept = counts.float()
    cumulative = mass.cumsum(-1)
    target = uniform[:, None] * cumulative[:, -1:]
    last = torch.where(mass > 0, bins, -1).amax(-1, keepdim=True)  # rounding never reaches past it
    chosen = (cumulative < target).sum(-1, keepdim=True).clamp(max=last).maximum(first)
    # within the chosen bin: the first token whose cumulative mass reaches the target
    p_chosen = p.gather(-1, chosen)
    start = cumulative.gather(-1, chosen) - mass.gather(-1, chosen)
    j = torch.ceil((target - start) / p_chosen.clamp_min(torch.finfo(p.dtype).tiny)) - 1
    j = j.clamp(min=0).minimum(kept.gather(-1, chosen) - 1)
    # its token: the (j + 1)-th of that value in token-id order
    seen = (rank == chosen).cumsum(-1, dtype=torch.int32)
    return (seen <= j).sum(-1, keepdim=True)


def sorted_draw(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """histogram_draw's tokens for logits of any float dtype, through a stable sort of each row's
    whole distribution (ties in token-id order). No host sync."""
    sorted_p, order = torch.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True, stable=True)
    return nucleus_draw(sorted_p, order, top_p, uniform)[0]


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Tokens [N, 1]: histogram_draw for 16-bit logits, else sorted_draw."""
    draw = histogram_draw if histogram_draw_applies(logits) else sorted_draw
    return draw(logits, temperature, top_p, uniform)
