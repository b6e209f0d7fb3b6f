"""GPTQ's inner loop over the columns of one block, as one Triton kernel.

Given H⁻¹'s Cholesky factor, GPTQ's updates inside a block never mix rows: each row quantizes
its column i, spreads the error over its columns i+1… and moves on. So one program owns a
tile of rows and walks the block's columns in registers, where the torch loop launches about
ten kernels per column; the update of the rest of the matrix stays one matmul per block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gptq_block_kernel(W_ptr, Hinv_ptr, Q_ptr, Err_ptr, Loss_ptr, Scale_ptr, Zero_ptr,
                       rows, count, stride_w, stride_h, maxq,
                       B: tl.constexpr, GS: tl.constexpr, SYM: tl.constexpr, PARAMS_GIVEN: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, B)
    rmask = r < rows
    W = tl.load(W_ptr + r[:, None] * stride_w + c[None, :], mask=rmask[:, None] & (c[None, :] < count), other=0.0)
    loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    maxq_f = maxq.to(tl.float32)
    # Rounding: adding and subtracting 1.5·2²³ rounds a float32 of magnitude < 2²² to the nearest
    # integer, ties to even, as torch.round does; clamping to ±4096 first changes no code.
    for g0 in range(0, count, GS):
        if PARAMS_GIVEN:
            scale = tl.load(Scale_ptr + r, mask=rmask, other=1.0)
            zero = tl.load(Zero_ptr + r, mask=rmask, other=0.0)
        else:
            # find_params on the group's columns as they are now, after the updates so far
            in_group = ((c >= g0) & (c < g0 + GS))[None, :]
            xmin = tl.minimum(tl.min(tl.where(in_group, W, float("inf")), axis=1), 0.0)
            xmax = tl.maximum(tl.max(tl.where(in_group, W, float("-inf")), axis=1), 0.0)
            if SYM:
                xmax = tl.maximum(-xmin, xmax)
                xmin = -xmax
            empty = (xmin == 0.0) & (xmax == 0.0)
            xmin = tl.where(empty, -1.0, xmin)
            xmax = tl.where(empty, 1.0, xmax)
            scale = tl.div_rn(xmax - xmin, maxq_f).to(tl.float16).to(tl.float32)
            scale = tl.maximum(scale, 5.960464477539063e-08)  # 2⁻²⁴
            if SYM:
                zero = tl.zeros([BLOCK_R], dtype=tl.float32) + (maxq_f + 1.0) / 2.0
            else:
                v = tl.minimum(tl.maximum(tl.div_rn(-xmin, scale), -4096.0), 4096.0)
                zero = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, 0.0), maxq_f)
            tl.store(Scale_ptr + (g0 // GS) * rows + r, scale, mask=rmask)
            tl.store(Zero_ptr + (g0 // GS) * rows + r, zero, mask=rmask)
        for i in range(g0, g0 + GS):
            live = i < count  # padding columns (i ≥ count) hold zeros and change nothing
            w = tl.sum(tl.where((c == i)[None, :], W, 0.0), axis=1)
            d = tl.load(Hinv_ptr + i * stride_h + i, mask=live, other=1.0)
            h = tl.load(Hinv_ptr + i * stride_h + c, mask=(c < count) & live, other=0.0)
            v = tl.minimum(tl.maximum(tl.div_rn(w, scale), -4096.0), 4096.0)
            q = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0 + zero, 0.0), maxq_f)
            diff = w - scale * (q - zero)
            err = tl.div_rn(diff, d)
            loss += tl.div_rn(diff * diff, d * d)
            W -= err[:, None] * h[None, :]
            tl.store(Q_ptr + r * count + i, q, mask=rmask & live)
            tl.store(Err_ptr + r * count + i, err, mask=rmask & live)
    tl.store(Loss_ptr + r, loss, mask=rmask)


def gptq_block(W1: torch.Tensor, Hinv1: torch.Tensor, maxq: int, sym: bool, group_size: int | None,
               scale: torch.Tensor | None = None, zero: torch.Tensor | None = None, block_rows: int = 16) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of GPTQ columns. W1 [rows, count] and Hinv1 [count, count] may be strided views
    (unit stride along columns); W1 is read, not written.

    group_size: groups start every group_size columns of the block and get fresh grids from the
    columns' current values; None: the whole block uses the given per-row `scale`/`zero`.
    Returns Q1 (codes as float), Err1, the per-row sum of (w − ŵ)²/d², and the scales and zeros
    of the groups that start in the block ([n, rows]; n = 0 when the grid was given).
    """
    rows, count = W1.shape
    if W1.stride(1) != 1 or Hinv1.stride(1) != 1:
        raise ValueError("gptq_block needs unit column stride")
    B = triton.next_power_of_2(count)
    given = group_size is None
    GS = B if given else group_size
    if not given and count % group_size:
        raise ValueError(f"block of {count} columns is not a whole number of {group_size}-column groups")
    n_groups = 0 if given else count // group_size
    Q1 = torch.empty(rows, count, device=W1.device, dtype=torch.float32)
    Err1 = torch.empty_like(Q1)
    losses = torch.empty(rows, device=W1.device, dtype=torch.float32)
    scales = torch.empty(n_groups, rows, device=W1.device, dtype=torch.float32)
    zeros = torch.empty_like(scales)
    if given:
        scale_arg, zero_arg = scale.contiguous().float(), zero.contiguous().float()
    else:
        scale_arg, zero_arg = scales, zeros
    grid = (triton.cdiv(rows, block_rows),)
    _gptq_block_kernel[grid](W1, Hinv1, Q1, Err1, losses, scale_arg, zero_arg, rows, count, W1.stride(0),
                             Hinv1.stride(0), maxq, B=B, GS=GS, SYM=sym, PARAMS_GIVEN=given, BLOCK_R=block_rows)
    return Q1, Err1, losses, scales, zeros
