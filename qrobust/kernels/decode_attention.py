"""Attention of one new token per sequence over a static KV cache (batch-1 decoding), in one kernel.

At batch 1 a layer's attention moves little memory, yet the torch path launches several kernels
for it: the grouped keys and values repeated for every query head, the mask, and SDPA over the
cache's whole static length. This kernel reads each KV head's keys and values once for all the
query heads that share it (grouped-query attention), stops at the current position (a long
static cache costs nothing past it) and keeps a running softmax as FlashAttention does, its
products on tensor cores (a group's query heads padded to 16 rows). The cache is split along
its length over several programs per KV head (flash-decoding), and the program that finishes
last for a head merges their partial softmaxes, so a long context keeps the GPU busy without a
second kernel; while the position is still within the first split, that split alone answers.
Given the new token's projections as they leave the q/k/v product (NewToken), it also applies
the per-head RMSNorm and the rotary embedding and writes the new key and value into the caches,
which otherwise take three element-wise kernels per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qrobust.kernels.launch import last_to_arrive, launch_options

LOG2E = 1.4426950408889634
MAX_SPLITS = 16  # programs per KV head along the cache
MIN_SPLIT_BLOCKS = 4  # key blocks per program at least


@triton.jit
def _merge_splits(pm_ptr, pl_ptr, pacc_ptr, y_ptr, slot, y_rows, d, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                  REP: tl.constexpr, REP_P2: tl.constexpr, D: tl.constexpr):
    """y for one KV head's query heads from its splits' partial softmaxes (running maximum m, sum
    l, unnormalized output acc), read past L1 (.cg): other programs wrote them."""
    s = tl.arange(0, SPLITS_P2)[:, None]
    r = tl.arange(0, REP_P2)[None, :]
    ok = (s < SPLITS) & (r < REP)
    at = (slot * SPLITS + s) * REP_P2 + r  # [splits, rows]
    m = tl.load(pm_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
    l_ = tl.load(pl_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
    m, l_ = tl.where(r < REP, m, 0.0), tl.where(r < REP, l_, 1.0)  # padding rows: finite, then not stored
    acc = tl.load(pacc_ptr + at[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0,
                  cache_modifier=".cg")
    w = tl.exp2(m - tl.max(m, axis=0)[None, :])  # splits past the position hold m = −∞: weight 0
    y = tl.sum(w[:, :, None] * acc, axis=0) / tl.sum(w * l_, axis=0)[:, None]
    rr = tl.arange(0, REP_P2)[:, None]
    tl.store(y_ptr + y_rows + d[None, :], y.to(y_ptr.dtype.element_ty), mask=rr < REP)


@triton.jit
def _norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, eps, d, D: tl.constexpr):
    """RMSNorm (weight w, float32 statistics) then the rotary embedding (rotate-half form, cos and
    sin of the position) of the rows x_ptr [R, 1] + d, in float32: each row is read twice, as it
    is and rotated by half its length, which keeps the rotation out of registers."""
    half = (d + D // 2) % D
    x = tl.load(x_ptr + d[None, :]).to(tl.float32)
    x_half = tl.load(x_ptr + half[None, :]).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    sign = tl.where(d < D // 2, -1.0, 1.0)[None, :]
    w = tl.load(w_ptr + d).to(tl.float32)[None, :]
    w_half = tl.load(w_ptr + half).to(tl.float32)[None, :]
    cos = tl.load(cos_ptr + d).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + d).to(tl.float32)[None, :]
    return x * rstd * w * cos + sign * x_half * rstd * w_half * sin


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, y_ptr, pm_ptr, pl_ptr, pacc_ptr, lock_ptr, qk_scale,
                             split_len, stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_yb, stride_yh,
                             kn_ptr, vn_ptr, stride_nb, qw_ptr, kw_ptr, cos_ptr, sin_ptr, stride_cb, eps, start_ptr,
                             HAS_START: tl.constexpr, REP: tl.constexpr, REP_P2: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                             BLOCK_L: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                             PRECISION: tl.constexpr, PDL: tl.constexpr, PROLOGUE: tl.constexpr):
    """Query heads h·REP … h·REP + REP − 1 of sequence b against KV head h, keys from this
    split's [split·split_len, (split + 1)·split_len) up to the position. The heads are the rows of
    a [ROWS, D] tile padded with zeros to the 16 rows a tensor-core product needs, so scores and
    outputs are two tl.dot per block of keys, and Triton pipelines the loads that feed them.
    PROLOGUE: q holds the query heads before their RMSNorm and rotary embedding, kn and vn the
    new token's key and value heads [B, 1, H_kv·D] (row stride stride_nb) before theirs; the
    kernel applies them (weights qw, kw, cos and sin of each sequence's position, rows
    stride_cb apart, 0 for one position) and the program whose split holds the position writes
    the new key and value into the caches first.
    HAS_START: sequence b's keys begin at slot start[b] (a left-padded batch: models.engine).
    PDL (programmatic dependent launch): everything it reads comes from the kernels before it, so
    it waits for them first, then lets the next kernel start (which reads its own weights while
    this one runs)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    rmask = (r < REP)[:, None]
    heads = (h * REP + r)[:, None]
    length = tl.load(pos_ptr) + 1
    first = tl.load(start_ptr + b).to(tl.int32) if HAS_START else 0
    kv = b * stride_kb + h * stride_kh
    if PROLOGUE:
        cos_ptr += b * stride_cb
        sin_ptr += b * stride_cb
        # every split computes the new key, so that its reads go out with q's, not after the position's
        new = b * stride_nb + h * D
        k_new = _norm_rope(kn_ptr + new + tl.zeros([1, 1], tl.int32), kw_ptr, cos_ptr, sin_ptr, eps, d, D)
        v_new = tl.load(vn_ptr + new + d[None, :])
        q_rows = q_ptr + b * stride_qb + tl.minimum(heads, h * REP + REP - 1) * stride_qh  # padding: repeats
        q = tl.where(rmask, _norm_rope(q_rows, qw_ptr, cos_ptr, sin_ptr, eps, d, D), 0.0).to(k_ptr.dtype.element_ty)
        if (length - 1) // split_len == split:  # the new key and value go into the caches, then are read back
            at = kv + (length - 1) * stride_kl + d[None, :]
            tl.store(k_ptr + at, k_new.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + at, v_new)
            tl.debug_barrier()
    else:
        q = tl.load(q_ptr + b * stride_qb + heads * stride_qh + d[None, :], mask=rmask, other=0.0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    # from the block that holds the first key: a split wholly before it runs no block (m = −∞, weight 0)
    for start in range(tl.maximum(split * split_len, first // BLOCK_L * BLOCK_L),
                       tl.minimum(length, (split + 1) * split_len), BLOCK_L):
        pos = start + tl.arange(0, BLOCK_L)
        valid = (pos < length) & (pos >= first)
        offs = kv + pos[:, None] * stride_kl + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [ROWS, BLOCK_L], base 2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    y_heads = y_ptr + b * stride_yb + heads * stride_yh + d[None, :]
    if SPLITS == 1:
        tl.store(y_heads, (acc / l_i[:, None]).to(y_ptr.dtype.element_ty), mask=rmask)
    elif length <= split_len:  # the first split holds every key so far: it writes y alone, the others idle
        if split == 0:
            tl.store(y_heads, (acc / l_i[:, None]).to(y_ptr.dtype.element_ty), mask=rmask)
    else:
        slot = b * tl.num_programs(1) + h
        at = (slot * SPLITS + split) * REP_P2 + r
        keep = r < REP
        tl.store(pm_ptr + at, m_i, mask=keep)
        tl.store(pl_ptr + at, l_i, mask=keep)
        tl.store(pacc_ptr + at[:, None] * D + d[None, :], acc, mask=keep[:, None])
        if last_to_arrive(lock_ptr + slot, SPLITS):
            y_rows = b * stride_yb + (h * REP + tl.arange(0, REP_P2))[:, None] * stride_yh
            _merge_splits(pm_ptr, pl_ptr, pacc_ptr, y_ptr, slot, y_rows, d, SPLITS, SPLITS_P2, REP, REP_P2, D)
            tl.atomic_xchg(lock_ptr + slot, 0)


def attention_splits(cache_len: int, block_l: int) -> tuple[int, int]:
    """(programs per KV head, cache positions each): at most MAX_SPLITS, each a whole number of
    key blocks and at least MIN_SPLIT_BLOCKS of them. Merging splits costs about as much as a
    few blocks (benchmarks/decode_attention.py), so a short cache stays in one program."""
    blocks = triton.cdiv(cache_len, block_l)
    per_split = max(MIN_SPLIT_BLOCKS, triton.cdiv(blocks, MAX_SPLITS))
    return triton.cdiv(blocks, per_split), per_split * block_l


@dataclass(frozen=True)
class NewToken:
    """What decoding's attention does to the new token's projections before attending (the
    kernel's prologue): RMSNorm over each head (weights q_weight, k_weight; eps) and the rotary
    embedding (cos and sin of the position, [D], or of each sequence's, [B, D]); then the key and
    value go into the caches."""
    k: torch.Tensor  # [B, 1, H_kv·D], before its norm and rotation
    v: torch.Tensor  # [B, 1, H_kv·D]
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    cos: torch.Tensor
    sin: torch.Tensor


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     locks: torch.Tensor | None = None, block_l: int = 64, splits: int | None = None,
                     num_warps: int = 4, num_stages: int = 3, pdl: bool = False,
                     new: NewToken | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q [B, H, 1, D] over the cached keys and values [B, H_kv, L, D] at
    positions 0 … positions[0] (the new token's position, whose key the cache already holds),
    with the usual 1/√D scaling; H must be a multiple of H_kv and D a power of two. Returns
    [B, H, 1, D] in q's dtype. The cache is split over `splits` programs per KV head (default:
    attention_splits); several need `locks`, B·H_kv int32 zeros that every call leaves at zero.
    `pdl` launches it as a programmatic dependent launch (kernels.launch.pdl_supported).
    With `new`, q is the query heads [B, 1, H·D] before their norm and rotation, and the kernel
    also normalizes, rotates and caches the new key and value (NewToken): one kernel for what
    the model otherwise does in several. `start` [B]: sequence b attends to positions start[b] …
    positions[0] only (left padding before them)."""
    if new is not None:
        q = q.unflatten(-1, (-1, k_cache.shape[-1])).transpose(1, 2)  # [B, H, 1, D], heads D apart
    B, H, T, D = q.shape
    Bk, H_kv, L, Dk = k_cache.shape
    if T != 1 or (Bk, Dk) != (B, D) or v_cache.shape != k_cache.shape or H % H_kv or D & (D - 1):
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and caches {tuple(k_cache.shape)} do not fit "
                         "(one query token, H a multiple of H_kv, head size a power of two)")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() or k_cache.dtype != q.dtype:
        raise ValueError("decode_attention: the caches must share q's dtype and a layout with contiguous heads")
    if new is not None and (q.stride(-1) != 1 or q.stride(1) != D or new.k.shape != (B, 1, H_kv * D)
                            or new.v.stride() != new.k.stride() or new.k.stride(-1) != 1):
        raise ValueError("decode_attention: the new token's q, k and v must be rows of contiguous heads, "
                         f"k and v of shape {(B, 1, H_kv * D)}")
    if new is not None and not (new.cos.shape == new.sin.shape and new.cos.shape[-1] == D
                                and new.cos.reshape(-1, D).shape[0] in (1, B) and new.cos.stride(-1) == 1):
        raise ValueError(f"decode_attention: cos and sin must be [{D}] or [{B}, {D}], got {tuple(new.cos.shape)}")
    if start is not None and start.shape != (B,):
        raise ValueError(f"decode_attention: start must be [{B}], got {tuple(start.shape)}")
    if splits is None:
        splits, split_len = attention_splits(L, block_l) if locks is not None else (1, L)
    else:
        split_len = triton.cdiv(triton.cdiv(L, splits), block_l) * block_l
    if splits > 1 and (locks is None or locks.numel() < B * H_kv):
        raise ValueError(f"decode_attention: {splits} splits need {B * H_kv} locks")
    if new is None:
        q = q.contiguous()
    y = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    rep = H // H_kv
    rep_p2 = triton.next_power_of_2(rep)
    slots = B * H_kv * splits * rep_p2 if splits > 1 else 1
    pm, pl = (torch.empty(slots, device=q.device, dtype=torch.float32) for _ in range(2))
    pacc = torch.empty(slots * D if splits > 1 else 1, device=q.device, dtype=torch.float32)
    if new is not None:
        cos, sin = new.cos.reshape(-1, D), new.sin.reshape(-1, D)
        prologue = (new.k, new.v, new.k.stride(0), new.q_weight, new.k_weight, cos, sin,
                    cos.stride(0) if cos.shape[0] > 1 else 0, new.eps)
    else:
        prologue = (pm, pm, 0, pm, pm, pm, pm, 0, 0.0)
    _decode_attention_kernel[(B, H_kv, splits)](
        q, k_cache, v_cache, positions, y, pm, pl, pacc, locks if splits > 1 else pm, D ** -0.5 * LOG2E, split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), y.stride(0), y.stride(1),
        *prologue, start if start is not None else pm, HAS_START=start is not None, REP=rep, REP_P2=rep_p2,
        ROWS=max(16, rep_p2), D=D, BLOCK_L=block_l, SPLITS=splits,
        SPLITS_P2=triton.next_power_of_2(splits), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PDL=pdl, PROLOGUE=new is not None, num_warps=num_warps, num_stages=num_stages, **launch_options(pdl))
    return y


@torch.library.custom_op("qrobust::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, positions: torch.Tensor, locks: torch.Tensor | None,
                        q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                        sin: torch.Tensor, pdl: bool = False, start: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step's attention from the new token's projections q [B, 1, H·D], k and v
    [B, 1, H_kv·D] (decode_attention with NewToken), as one opaque call for torch.compile and
    CUDA graphs; writes the new key and value into the caches. `locks` is not listed as mutated:
    every call leaves it as it found it."""
    return decode_attention(q, k_cache, v_cache, positions, locks, pdl=pdl,
                            new=NewToken(k, v, q_weight, k_weight, eps, cos, sin), start=start)


@decode_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, positions, locks, q_weight, k_weight, eps, cos, sin, pdl=False, start=None):
    B, D = q.shape[0], k_cache.shape[-1]
    return q.new_empty(B, q.shape[-1] // D, 1, D)
