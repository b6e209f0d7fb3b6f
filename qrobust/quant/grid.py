"""Uniform integer quantization grids: the quantizer that GPTQ and RTN share.

A grid maps a weight x to an integer code q = clamp(round(x / scale) + zero, 0, 2^b - 1) and
back to x̂ = scale · (q − zero). Scales are rounded to float16 here, the dtype they are stored
in, so that the error GPTQ compensates is the error of the checkpoint that is written.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qrobust.errors import QrobustError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How one linear layer is quantized. group_size -1 means one group per output row."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QrobustError(
                f"unsupported bit width {self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size != -1 and self.group_size <= 0:
            raise QrobustError(f"group size must be positive or -1 (per channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups_for(self, in_features: int, layer_name: str = "layer") -> int:
        """Number of groups along the input dimension; refuses sizes that do not divide it."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise QrobustError(
                f"group size {self.group_size} does not divide {layer_name}'s {in_features} input "
                f"features: pick a divisor (e.g. 32, 64, 128) or -1 for per-channel"
            )
        return in_features // self.group_size


def find_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of a min-max grid over w [rows, cols]; the range always holds 0."""
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1.0, 1.0
    scale = ((xmax - xmin) / spec.maxq).half().float().clamp(min=2.0**-24)
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of x under a grid; scale/zero broadcast against x."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


@dataclass
class QuantResult:
    """A quantized weight matrix in the layout GPTQ checkpoints use (before bit packing).

    q: integer codes [rows, cols]; scales, zeros: [n_groups, rows]; g_idx: [cols], the group
    of each input column (not monotone under act-order).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return dequantize(self.q.float(), self.scales[g].t().float(), self.zeros[g].t().float())


def rtn(weight: torch.Tensor, spec: QuantSpec, layer_name: str = "layer") -> QuantResult:
    """Round-to-nearest, group by group: the baseline every calibrated method must beat."""
    w = weight.detach().float()
    rows, cols = w.shape
    n_groups = spec.groups_for(cols, layer_name)
    gs = cols // n_groups
    grouped = w.reshape(rows, n_groups, gs).transpose(0, 1).reshape(n_groups * rows, gs)
    scale, zero = find_params(grouped, spec)
    q = quantize(grouped, scale[:, None], zero[:, None], spec.maxq)
    q = q.reshape(n_groups, rows, gs).transpose(0, 1).reshape(rows, cols)
    g_idx = torch.arange(cols, device=w.device, dtype=torch.int32) // gs
    return QuantResult(
        q=q.to(torch.uint8),
        scales=scale.reshape(n_groups, rows),
        zeros=zero.reshape(n_groups, rows),
        g_idx=g_idx,
        spec=spec,
    )
