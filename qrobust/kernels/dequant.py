"""The packed weight for larger batches (prefill, diffusion steps), where the GEMV does not pay.

gptq_dequantize: Ŵᵀ [K, N] in the activation dtype, which then runs on the dense matmul.
gptq_matmul: the same product with the dequantization fused into a tensor-core matmul
(kernels.packed_matmul's kernel with one K-split; to be measured against dequantize-then-matmul
before it replaces it).
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


def gptq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                    bits: int, group_size: int, zero_offset: int, K: int, dtype: torch.dtype,
                    block_n: int = 64, block_depth: int = 64, layout: str = "gptq") -> torch.Tensor:
    """Ŵᵀ [K, N] in `dtype`, from qweight in `layout` (also kernels.fragments')."""
    if layout == "fragments":
        from qrobust.kernels.fragments import dequantize_fragments

        return dequantize_fragments(qweight, scales, qzeros, zero_offset, K, dtype, bits)
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
    from qrobust.kernels.packed_matmul import MatmulTiling, packed_matmul  # its split-K kernel, unsplit

    M, K = x.shape
    _check_layout(bits, layout)
    tiling = MatmulTiling(block_m=16 if M <= 16 else 32 if M <= 32 else 64, block_n=block_n,
                          block_k=block_k(K, group_size, g_idx is not None, block_depth), split_k=1, num_warps=4,
                          num_stages=3)
    return packed_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, bias, layout, tiling)
