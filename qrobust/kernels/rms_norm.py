"""RMSNorm in one kernel: the seven element-wise and reduction kernels of the torch form
(models.transformer.RMSNorm: float, square, mean, add, rsqrt, multiply, round, scale) as one
pass over each row, with the same roundings: the row normalized in float32, rounded to the
input's dtype, then multiplied by the weight and rounded again. Batched decoding runs four
norms per block (input, post-attention, q and k), ~113 calls a step at the 1.7B shape, so their
launches and round trips through memory were a large part of a batched step.

add_rms_norm also adds the residual stream first (h = residual + x, rounded to the dtype as
torch's add rounds it) and returns h beside the norm: the residual adds before a block's two
norms were two more kernels per block, each reading and writing the stream once more."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qrobust.kernels.launch import launch_options

# Elements a program normalizes at once: whole rows, several when rows are short (q/k norms, 128).
ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, n_rows, n_cols, eps,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0)
    if PDL:  # the weight is a constant; the rows and what this kernel writes wait for the kernel before
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        h = (tl.load(res_ptr + offsets, mask=inside, other=0.0).to(tl.float32) + x.to(tl.float32))
        x = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offsets, x, mask=inside)
    x = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = (x * inv[:, None]).to(out_ptr.dtype.element_ty)
    out = w[None, :].to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=inside)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    rows = t.reshape(-1, n_cols)
    return rows if rows.is_contiguous() else rows.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, pdl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_cols = x.shape[-1]
    rows = _rows(x, n_cols)
    res = None if residual is None else _rows(residual, n_cols)
    out = torch.empty_like(rows)
    h = None if res is None else torch.empty_like(rows)
    block = triton.next_power_of_2(n_cols)
    per_program = max(1, ELEMENTS_PER_PROGRAM // block)
    grid = (triton.cdiv(rows.shape[0], per_program),)
    _rms_norm_kernel[grid](rows, rows if res is None else res, weight, out, out if h is None else h, rows.shape[0],
                           n_cols, eps, ROWS=per_program, BLOCK=block, HAS_RESIDUAL=res is not None, PDL=pdl,
                           num_warps=4 if block * per_program <= 2048 else 8, **launch_options(pdl))
    return out.view(x.shape), None if h is None else h.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False) -> torch.Tensor:
    """weight * (x / sqrt(mean(x²) + eps)) over the last dimension, in x's dtype (weight of the same
    dtype). `pdl`: launched as a programmatic dependent launch (kernels.launch.pdl_supported), the
    weight read before it waits for the kernel before it."""
    return _launch(x, None, weight, eps, pdl)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) for h = residual + x (same shapes and dtype), in one kernel; `pdl` as rms_norm's."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match "
                         f"x {tuple(x.shape)} {x.dtype}")
    return _launch(x, residual, weight, eps, pdl)
