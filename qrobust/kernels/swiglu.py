"""silu(gate)·up of a fused gate/up layer's interleaved outputs (g₀, u₀, g₁, u₁, …) in one kernel.

The torch form (quant.qlinear.interleaved_swiglu) is two kernels, the activation over the strided
gate half and the product, with a rounded intermediate between them: at batch 32 of the 1.7B
shape they took ~290 µs of a ~4 ms decoding step. Here each program reads pairs of adjacent
outputs once and rounds as the torch form does: silu in float32 rounded to the dtype, then the
product rounded again."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # outputs (pairs) per program


@triton.jit
def _swiglu_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = at < n
    pair = 2 * at[:, None] + tl.arange(0, 2)[None, :]  # each pair read as one vector, then split
    gate, up = tl.split(tl.load(y_ptr + pair, mask=inside[:, None], other=0.0))
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + at, (act.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=inside)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """[..., 2·I] interleaved (gate, up) pairs → silu(gate)·up [..., I], in y's dtype."""
    if y.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension ({y.shape[-1]}) must hold (gate, up) pairs")
    y = y if y.is_contiguous() else y.contiguous()
    out = torch.empty(*y.shape[:-1], y.shape[-1] // 2, device=y.device, dtype=y.dtype)
    n = out.numel()
    _swiglu_kernel[(triton.cdiv(n, BLOCK),)](y, out, n, BLOCK=BLOCK, num_warps=4)
    return out
