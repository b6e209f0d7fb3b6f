"""models.nucleus's draw from 16-bit logits in two kernels instead of about fifty.

The torch form counts each row's tokens per logit value with a scatter-add and then runs its
cumulative sums and look-ups as separate kernels over [rows, 65,536] and [rows, vocabulary]
tensors, cumulative sums over a few long rows being slow: about 1 ms a step at 32 rows of
Qwen3's 151,936 tokens, a quarter of a sampled decoding step. Here:

- `_histogram_kernel` (a program per row and 4,096 tokens) adds each token to its value's count
  (integer atomics: the counts do not depend on the order) and keeps the row's best rank;
- `_draw_kernel` (a program per row) walks the 65,536 values in descending order three times, in
  blocks with running sums carried between them (the total weight; the nucleus's kept mass and its
  last value; the value where the kept mass reaches the quantile), then the vocabulary once for
  the token of that value at the drawn position among its ties (token-id order).

Later passes recompute a block's weights rather than store them: exp over 2,048 values is cheaper
than a round trip through memory.

The arithmetic is the torch form's, in float32; only the order of additions differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

VALUES = 1 << 16
HISTOGRAM_BLOCK = 4096  # tokens a histogram program counts
BINS_BLOCK = 2048  # values (and tokens) the draw program takes at once


@triton.jit
def _descending_rank(bits):
    """models.nucleus._descending_rank on int32 bit patterns (0 … 65,535)."""
    bits = tl.where(bits == 0x8000, 0, bits)
    ascending = tl.where(bits >= 0x8000, 0xFFFF - bits, bits | 0x8000)
    return 0xFFFF - ascending


@triton.jit
def _rank_value(rank, IS_BF16: tl.constexpr):
    """The float32 value of each rank (models.nucleus._rank_values)."""
    ascending = 0xFFFF - rank
    bits = tl.where(ascending >= 0x8000, ascending & 0x7FFF, 0xFFFF - ascending).to(tl.int16)
    if IS_BF16:
        return bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _histogram_kernel(bits_ptr, counts_ptr, best_ptr, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < V
    bits = tl.load(bits_ptr + row * stride + offs, mask=inside, other=0).to(tl.int32) & 0xFFFF
    rank = _descending_rank(bits)
    tl.atomic_add(counts_ptr + row * 65536 + rank, 1, mask=inside, sem="relaxed")
    tl.atomic_min(best_ptr + row, tl.min(tl.where(inside, rank, 65535), axis=0), sem="relaxed")


@triton.jit
def _bin_weights(counts_ptr, row, start, z_max, temperature, IS_BF16: tl.constexpr, BINS: tl.constexpr):
    """Counts, per-token weights exp(z − z_max) and bin indices of bins start … start + BINS − 1."""
    b = start + tl.arange(0, BINS)
    c = tl.load(counts_ptr + row * 65536 + b).to(tl.float32)
    z = tl.where(c > 0, _rank_value(b, IS_BF16), 0.0) / temperature  # values no token holds stay out
    w = tl.exp(tl.where(c > 0, z - z_max, float("-inf")))
    return c, w, b


@triton.jit
def _kept(c, p, before, top_p, HAS_TOP_P: tl.constexpr):
    """Tokens of each bin kept in the nucleus: the j-th (from 0) while before + j·p ≤ top_p."""
    if HAS_TOP_P:
        fits = tl.floor((top_p - before) / tl.maximum(p, 1.1754943508222875e-38)) + 1
        return tl.where(p > 0, tl.minimum(tl.maximum(fits, 0.0), c), tl.where(before <= top_p, c, 0.0))
    return c


@triton.jit
def _block_nucleus(c, w, total, carry, top_p, HAS_TOP_P: tl.constexpr):
    """A block of bins after `carry` of more probable mass: its tokens' probability per bin, the
    bins' mass, the tokens each keeps in the nucleus and their kept mass."""
    p = w / total
    mass = c * p
    kept = _kept(c, p, carry + tl.cumsum(mass, axis=0) - mass, top_p, HAS_TOP_P)
    return p, mass, kept, kept * p


@triton.jit
def _bin_at(b, bin, p, kept, km, kept_before):
    """Bin `bin` of a block: its tokens' probability, how many it keeps and where its kept mass
    starts (kept_before: the kept mass of the blocks before)."""
    at = b == bin
    return (tl.sum(tl.where(at, p, 0.0), axis=0), tl.sum(tl.where(at, kept, 0.0), axis=0),
            kept_before + tl.sum(tl.where(b < bin, km, 0.0), axis=0))


@triton.jit
def _draw_kernel(bits_ptr, counts_ptr, best_ptr, u_ptr, out_ptr, V, stride, temperature, top_p,
                 IS_BF16: tl.constexpr, HAS_TOP_P: tl.constexpr, BINS: tl.constexpr):
    row = tl.program_id(0)
    best = tl.load(best_ptr + row)
    z_max = _rank_value(best, IS_BF16) / temperature
    # the total weight
    total = 0.0
    for start in range(0, 65536, BINS):
        c, w, b = _bin_weights(counts_ptr, row, start, z_max, temperature, IS_BF16, BINS)
        total += tl.sum(c * w, axis=0)
    # the nucleus's kept mass, and its last bin with mass (rounding never draws past it): where the
    # bin's kept mass starts, its tokens' probability and how many it keeps
    carry = 0.0
    kept_mass = 0.0
    chosen = best
    p_c = 0.0
    kept_c = 1.0
    start_c = 0.0
    for start in range(0, 65536, BINS):
        c, w, b = _bin_weights(counts_ptr, row, start, z_max, temperature, IS_BF16, BINS)
        if tl.max(c, axis=0) > 0:  # most blocks of values hold no token: nothing to add
            p, mass, kept, km = _block_nucleus(c, w, total, carry, top_p, HAS_TOP_P)
            last_here = tl.max(tl.where(km > 0, b, -1), axis=0)
            if last_here >= 0:
                chosen = last_here
                p_c, kept_c, start_c = _bin_at(b, last_here, p, kept, km, kept_mass)
            kept_mass += tl.sum(km, axis=0)
            carry += tl.sum(mass, axis=0)
    target = tl.load(u_ptr + row) * kept_mass
    # the first kept bin whose cumulative kept mass reaches the target, if rounding leaves one
    carry = 0.0
    carry_kept = 0.0
    found = 0
    for start in range(0, 65536, BINS):
        c, w, b = _bin_weights(counts_ptr, row, start, z_max, temperature, IS_BF16, BINS)
        if (found == 0) & (tl.max(c, axis=0) > 0):
            p, mass, kept, km = _block_nucleus(c, w, total, carry, top_p, HAS_TOP_P)
            reached = (carry_kept + tl.cumsum(km, axis=0) >= target) & (km > 0)
            first_here = tl.min(tl.where(reached, b, 65536), axis=0)
            if first_here < 65536:
                chosen = first_here
                p_c, kept_c, start_c = _bin_at(b, first_here, p, kept, km, carry_kept)
                found = 1
            carry += tl.sum(mass, axis=0)
            carry_kept += tl.sum(km, axis=0)
    j = tl.ceil((target - start_c) / tl.maximum(p_c, 1.1754943508222875e-38)) - 1
    j = tl.minimum(tl.maximum(j, 0.0), kept_c - 1).to(tl.int32)
    # its token: the (j + 1)-th of that value in token-id order
    seen = 0
    token = V
    for start in range(0, V, BINS):
        offs = start + tl.arange(0, BINS)
        inside = offs < V
        bits = tl.load(bits_ptr + row * stride + offs, mask=inside, other=0).to(tl.int32) & 0xFFFF
        eq = ((_descending_rank(bits) == chosen) & inside).to(tl.int32)
        here = tl.sum(eq, axis=0)
        if (token == V) & (seen + here > j):  # the block that holds it
            count = seen + tl.cumsum(eq, axis=0)
            token = tl.min(tl.where((eq > 0) & (count == j + 1), offs, V), axis=0)
        seen += here
    tl.store(out_ptr + row, token.to(tl.int64))


def nucleus_draw_kernel(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """models.nucleus.histogram_draw's tokens [N, 1] (int64) for bf16 or fp16 logits [N, V], temperature > 0."""
    if logits.dtype not in (torch.bfloat16, torch.float16) or logits.dim() != 2:
        raise ValueError(f"nucleus_draw_kernel takes [N, V] bf16 or fp16 logits, got {tuple(logits.shape)} "
                         f"{logits.dtype}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    bits = logits.view(torch.int16)
    counts = torch.zeros(N, VALUES, dtype=torch.int32, device=logits.device)
    best = torch.full((N,), VALUES - 1, dtype=torch.int32, device=logits.device)
    _histogram_kernel[(N, triton.cdiv(V, HISTOGRAM_BLOCK))](bits, counts, best, V, bits.stride(0),
                                                            BLOCK=HISTOGRAM_BLOCK, num_warps=8)
    out = torch.empty(N, 1, dtype=torch.int64, device=logits.device)
    _draw_kernel[(N,)](bits, counts, best, uniform.float().contiguous(), out, V, bits.stride(0), float(temperature),
                       float(top_p), IS_BF16=logits.dtype == torch.bfloat16, HAS_TOP_P=top_p < 1.0, BINS=BINS_BLOCK,
                       num_warps=8)
    return out
