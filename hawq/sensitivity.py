"""Per-layer, per-bit-width sensitivities.

HAWQ-v2: Ωₗ(b) = Tr(Hₗ)/nₗ · ‖Q_b(Wₗ) − Wₗ‖², with Q_b the quantizer actually deployed — here
GPTQ at b bits and the group size, calibrated on the layer's full-precision inputs — not plain
rounding. The cheap proxy needs no second derivatives: GPTQ's own layer objective
½·tr((W − Ŵ) H (W − Ŵ)ᵀ) with H = 2XXᵀ/N from the same calibration inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy.stats import spearmanr

from hawq.trace import TraceEstimate
from qrobust.quant.gptq import GPTQ, output_error
from qrobust.quant.grid import QuantSpec, rtn


@dataclass
class LayerSensitivity:
    name: str
    block: int
    n_params: int
    out_features: int
    in_features: int
    trace: float | None
    trace_stderr: float | None
    weight_error: dict[int, float] = field(default_factory=dict)  # ‖Q_b(W) − W‖² per bits
    proxy: dict[int, float] = field(default_factory=dict)  # GPTQ layer objective per bits

    def omega(self, bits: int) -> float:
        """HAWQ-v2 sensitivity (needs the trace). The loss is not convex, and a trace estimate
        can come out negative (noise, or a saddle direction); such a layer counts as insensitive."""
        return max(self.trace, 0.0) / self.n_params * self.weight_error[bits]


@torch.no_grad()
def layer_hessians(adapter, calib: torch.Tensor, names: list[str]) -> dict[str, GPTQ]:
    """H = 2XXᵀ/N of every layer from full-precision activations (one pass, hooks)."""
    gptq = {n: GPTQ(adapter.model.get_submodule(n)) for n in names}
    hooks = [adapter.model.get_submodule(n).register_forward_hook(
        lambda m, inp, out, n=n: gptq[n].add_batch(inp[0].detach())) for n in names]
    try:
        for i in range(calib.shape[0]):
            adapter.logits(adapter.calibration_inputs(calib[i:i + 1], seed=i).to(adapter.device))
    finally:
        for h in hooks:
            h.remove()
    return gptq


def measure_sensitivities(adapter, calib: torch.Tensor, bits: list[int], group_size: int,
                          traces: dict[str, TraceEstimate] | None, quantizer: str = "gptq",
                          sym: bool = True) -> list[LayerSensitivity]:
    names = adapter.linear_layer_names()
    block_of = {n: b.index for b in adapter.quantizable_layers() for n in b.names}
    gptq = layer_hessians(adapter, calib, names)
    out = []
    for n in names:
        layer = adapter.model.get_submodule(n)
        W = layer.weight.detach()
        t = traces.get(n) if traces else None
        s = LayerSensitivity(n, block_of[n], W.numel(), W.shape[0], W.shape[1],
                             t.mean if t else None, t.stderr if t else None)
        for b in bits:
            spec = QuantSpec(b, group_size, sym)
            result = gptq[n].quantize(spec, name=n)[0] if quantizer == "gptq" else rtn(W, spec, n)
            W_hat = result.dequantize().to(W.device)
            s.weight_error[b] = float(((W.float() - W_hat) ** 2).sum())
            s.proxy[b] = output_error(W, W_hat, gptq[n].H)
        out.append(s)
        gptq[n].free()
    return out


def ranking_agreement(sens: list[LayerSensitivity], bits: list[int]) -> dict[int, float]:
    """Spearman correlation, per bit width, between HAWQ Ω and the GPTQ proxy across layers."""
    return {b: float(spearmanr([s.omega(b) for s in sens], [s.proxy[b] for s in sens]).statistic) for b in bits}
