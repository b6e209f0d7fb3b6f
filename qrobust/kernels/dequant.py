"""The packed weight for larger batches (prefill, diffusion steps), where the GEMV does not pay.

gptq_dequantize: Ŵᵀ [K, N] in the activation dtype, which then runs on the dense matmul.
gptq_matmul: the same product with the dequantization fused into a tensor-core matmul (to be
measured against dequantize-then-matmul before it replaces it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qrobust.kernels.launch import block_k
from qrobust.kernels.layouts import _check_layout, _weight_tile


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, qz_ptr, g_ptr, w_ptr, N, K,
                    BITS: tl.constexpr, LAYOUT: tl.constexpr, OFFSET: tl.constexpr, GS: tl.constexpr,
                    ACT_ORDER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = (n < N)[None, :]
    k = k0 + tl.arange(0, BLOCK_K)
    w = _weight_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, k0, n, nmask, N, BITS, LAYOUT, OFFSET, GS, ACT_ORDER, BLOCK_K,
                     BLOCK_N)
    tl.store(w_ptr + k[:, None] * N + n[None, :], w.to(w_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _matmul_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_y,
                   BITS: tl.constexpr, LAYOUT: tl.constexpr, OFFSET: tl.constexpr, GS: tl.constexpr,
                   ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """y = x Ŵᵀ on tensor cores, each weight tile dequantized in registers on its way to tl.dot."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=mmask[:, None], other=0.0)
        w = _weight_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, k0, n, nmask[None, :], N, BITS, LAYOUT, OFFSET, GS,
                         ACT_ORDER, BLOCK_K, BLOCK_N)
        acc += tl.dot(a, w.to(a.dtype))
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def gptq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                    bits: int, group_size: int, zero_offset: int, K: int, dtype: torch.dtype,
                    block_n: int = 64, block_depth: int = 64, layout: str = "gptq") -> torch.Tensor:
    """Ŵᵀ [K, N] in `dtype`, from qweight in `layout`."""
    N = qweight.shape[1]
    act_order = g_idx is not None
    _check_layout(bits, layout)
    bk = block_k(K, group_size, act_order, block_depth)
    w = torch.empty(K, N, device=qweight.device, dtype=dtype)
    grid = (K // bk, triton.cdiv(N, block_n))
    _dequant_kernel[grid](qweight, scales, qzeros, g_idx if act_order else scales, w, N, K, BITS=bits,
                          LAYOUT=layout, OFFSET=zero_offset, GS=group_size, ACT_ORDER=act_order, BLOCK_N=block_n,
                          BLOCK_K=bk)
    return w


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int, zero_offset: int,
                bias: torch.Tensor | None = None, block_n: int = 64, block_depth: int = 64,
                layout: str = "gptq") -> torch.Tensor:
    """x [M, K] times the packed weight with the dequantization fused into a tensor-core matmul,
    for batches too large for the GEMV (prefill, diffusion steps). Not yet the default anywhere:
    benchmarks/packed_gemv.py times it against dequantize-then-matmul."""
    M, K = x.shape
    N = qweight.shape[1]
    x = x.contiguous()
    act_order = g_idx is not None
    _check_layout(bits, layout)
    bk = block_k(K, group_size, act_order, block_depth)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _matmul_kernel[grid](x, qweight, scales, qzeros, g_idx if act_order else scales, bias if bias is not None else y,
                         y, M, N, K, x.stride(0), y.stride(0), BITS=bits, LAYOUT=layout, OFFSET=zero_offset,
                         GS=group_size, ACT_ORDER=act_order, HAS_BIAS=bias is not None, BLOCK_M=block_m,
                         BLOCK_N=block_n, BLOCK_K=bk)
    return y
