"""The packed products as torch custom ops, each with the fake that gives its output's shape:
qrobust::gptq_gemv, qrobust::gptq_gemv_split_sums, qrobust::gptq_gemv_add_norm and
qrobust::gptq_dequantize.
"""
from __future__ import annotations

import torch

from qrobust.kernels.dequant import gptq_dequantize
from qrobust.kernels.gemv import AddNorm, gptq_gemv, gptq_gemv_add_norm, gptq_gemv_split_sums


# The products as torch custom ops: torch.compile treats each as one opaque call (rather than
# tracing into the launcher and analysing the Triton kernel at every call site, which made
# compiling a 1.7B model take minutes), and CUDA graphs capture them as they are.
@torch.library.custom_op("qrobust::gptq_gemv", mutates_args=())
def gemv_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
            g_idx: torch.Tensor | None, bias: torch.Tensor | None, locks: torch.Tensor | None, bits: int,
            group_size: int, zero_offset: int, block_n: int, block_depth: int, splits: int,
            num_warps: int, swiglu: bool = False, pdl: bool = False, half2: bool = False,
            layout: str = "gptq") -> torch.Tensor:
    """gptq_gemv. `locks` is not listed as mutated: every call leaves it as it found it."""
    return gptq_gemv(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, bias=bias, block_n=block_n,
                     block_depth=block_depth, splits=splits, num_warps=num_warps, locks=locks, swiglu=swiglu, pdl=pdl,
                     half2=half2, layout=layout)


@gemv_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bias, locks, bits, group_size, zero_offset, block_n, block_depth, splits,
      num_warps, swiglu=False, pdl=False, half2=False, layout="gptq"):
    return x.new_empty(x.shape[0], qweight.shape[1] // 2 if swiglu else qweight.shape[1])


@torch.library.custom_op("qrobust::gptq_gemv_split_sums", mutates_args=())
def gemv_split_sums_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor | None, bits: int, group_size: int, zero_offset: int, block_n: int,
                       block_depth: int, splits: int, num_warps: int, pdl: bool = False,
                       half2: bool = False, layout: str = "gptq") -> torch.Tensor:
    """gptq_gemv_split_sums."""
    return gptq_gemv_split_sums(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, block_n=block_n,
                                block_depth=block_depth, splits=splits, num_warps=num_warps, pdl=pdl, half2=half2,
                                layout=layout)


@gemv_split_sums_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, block_n, block_depth, splits, num_warps,
      pdl=False, half2=False, layout="gptq"):
    return x.new_empty(splits, x.shape[0], qweight.shape[1], dtype=torch.float32)


@torch.library.custom_op("qrobust::gptq_gemv_add_norm", mutates_args=())
def gemv_add_norm_op(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                     bias: torch.Tensor | None, locks: torch.Tensor | None, bits: int, group_size: int,
                     zero_offset: int, block_n: int, block_depth: int, splits: int, num_warps: int,
                     swiglu: bool = False, pdl: bool = False, half2: bool = False,
                     layout: str = "gptq") -> tuple[torch.Tensor, torch.Tensor]:
    """gptq_gemv_add_norm: (the product, h)."""
    return gptq_gemv_add_norm(x, AddNorm(residual, norm_weight, eps), qweight, scales, qzeros, g_idx, bits,
                              group_size, zero_offset, bias=bias, block_n=block_n, block_depth=block_depth,
                              splits=splits, num_warps=num_warps, locks=locks, swiglu=swiglu, pdl=pdl, half2=half2,
                              layout=layout)


@gemv_add_norm_op.register_fake
def _(x, residual, norm_weight, eps, qweight, scales, qzeros, g_idx, bias, locks, bits, group_size, zero_offset,
      block_n, block_depth, splits, num_warps, swiglu=False, pdl=False, half2=False, layout="gptq"):
    stream = x if residual is None else residual  # [M, K] in the activations' dtype; x may be split sums
    return stream.new_empty(stream.shape[0], qweight.shape[1] // 2 if swiglu else qweight.shape[1]), \
        torch.empty_like(stream)


@torch.library.custom_op("qrobust::gptq_dequantize", mutates_args=())
def dequantize_op(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                  bits: int, group_size: int, zero_offset: int, K: int, dtype: torch.dtype,
                  layout: str = "gptq") -> torch.Tensor:
    return gptq_dequantize(qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, K, dtype, layout=layout)


@dequantize_op.register_fake
def _(qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, K, dtype, layout="gptq"):
    return qweight.new_empty(K, qweight.shape[1], dtype=dtype)
