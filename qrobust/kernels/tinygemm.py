"""4-bit layers on PyTorch's int4 "tinygemm" kernel, the one torchao's int4 weight-only layout
runs: on an H100 it multiplies one row by a Qwen3-1.7B-shaped 4-bit weight 1.2–1.7× faster
than qrobust's Triton GEMV (benchmarks/packed_gemv.py), so inference uses it where it applies.

tinygemm computes ŵ = (q − 8)·s + m in bfloat16 with contiguous groups along the inputs; a GPTQ
layer's ŵ = s·(q − z) is the same with m = s·(8 − z). Act-order layers have their inputs
permuted so that groups become contiguous, and the input row is permuted the same way.

Repacking is for inference only: the layers hold tinygemm's layout instead of the GPTQ buffers,
so a repacked model is not saved (as with models.decode.fuse_projections).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 8  # the CUDA layout packs inputs in tiles of 8·16


@dataclass
class Int4Operands:
    codes: torch.Tensor  # [N, K] int32 in 0..15, inputs in the kernel's order
    scales_and_zeros: torch.Tensor  # [K / group, N, 2] bfloat16: s and m = s·(8 − z)
    perm: torch.Tensor | None  # the layer's input order for the kernel (act-order), or None
    group_size: int


def applies(layer: nn.Module) -> bool:
    """Whether a QuantLinear can run on tinygemm: 4 bits, a group size it supports, inputs in
    whole 128-input tiles, outputs in multiples of 8, groups of equal size."""
    from qrobust.quant.qlinear import QuantLinear

    if not isinstance(layer, QuantLinear) or layer.spec.bits != 4:
        return False
    gs = layer.spec.group_size
    K, N = layer.in_features, layer.out_features
    if gs not in GROUP_SIZES or K % (INNER_K_TILES * 16) or N % 8:
        return False
    sorted_groups = layer.g_idx.long().sort(stable=True).values
    return torch.equal(sorted_groups, torch.arange(K, device=sorted_groups.device) // gs)


def operands(layer: nn.Module) -> Int4Operands:
    """tinygemm's operands for a QuantLinear that `applies`."""
    gs = layer.spec.group_size
    g = layer.g_idx.long()
    in_order = torch.equal(g, torch.arange(layer.in_features, device=g.device) // gs)
    perm = None if in_order else g.argsort(stable=True)
    codes = layer.codes().to(torch.int32)
    if perm is not None:
        codes = codes[:, perm]
    s = layer.scales.float()  # [groups, N]
    m = s * (8 - layer.zero_points().float())
    return Int4Operands(codes, torch.stack([s, m], dim=-1).to(torch.bfloat16).contiguous(), perm, gs)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    if codes.is_cuda:
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(pairs, INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


class TinyGemmLinear(nn.Module):
    """A 4-bit linear layer in tinygemm's layout; inputs of any float dtype, outputs in the same."""

    def __init__(self, ops: Int4Operands, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, ops.group_size
        self.register_buffer("weight_int4", _pack(ops.codes))
        self.register_buffer("scales_and_zeros", ops.scales_and_zeros)
        self.register_buffer("perm", ops.perm)
        self.register_buffer("bias", bias)

    @classmethod
    def from_quant_linear(cls, layer: nn.Module) -> "TinyGemmLinear":
        return cls(operands(layer), layer.bias, layer.in_features, layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.perm is not None:
            rows = rows[:, self.perm]
        rows = rows.to(torch.bfloat16)
        if rows.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(rows, self.weight_int4, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight_int4, self.group_size,
                                                           self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


def repack_int4(model: nn.Module, exclude: Callable[[str], bool] | None = None) -> int:
    """For inference: every 4-bit QuantLinear that tinygemm can run becomes a TinyGemmLinear, but
    those whose names `exclude` picks. Returns how many were repacked."""
    from qrobust.quant.qlinear import set_module

    names = [n for n, m in model.named_modules() if applies(m) and not (exclude and exclude(n))]
    for name in names:
        set_module(model, name, TinyGemmLinear.from_quant_linear(model.get_submodule(name)))
    return len(names)
