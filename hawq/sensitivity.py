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
from qrobust.quant.gptq import GPTQ, output_error, quantize_jointly
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


def input_groups(adapter) -> list[list[str]]:
    """Layers that read the same input (q/k/v; gate/up) in one group, every other layer alone."""
    return [g for b in adapter.quantizable_layers() for g in b.groups]


@torch.no_grad()
def layer_hessians(adapter, calib: torch.Tensor, groups: list[list[str]], batch_size: int = 8) -> dict[str, GPTQ]:
    """H = 2XXᵀ/N of every layer from full-precision activations (one pass, hooks). The layers of a
    group share one H, accumulated once (from its first layer's input). The model's calibration
    inputs are made from the whole set at once, as GPTQ's driver makes them (a diffusion model's
    mask ratios stratified over all sequences), and run in batches."""
    gptq = {}
    for g in groups:
        for n in g:
            gptq[n] = GPTQ(adapter.model.get_submodule(n))
            if n != g[0]:  # as quant.driver does for its fused groups
                gptq[n].H = gptq[g[0]].H
    hooks = [adapter.model.get_submodule(g[0]).register_forward_hook(
        lambda m, inp, out, n=g[0]: gptq[n].add_batch(inp[0].detach())) for g in groups]
    inputs = adapter.calibration_inputs(calib, seed=0)
    try:
        for batch in inputs.split(batch_size):
            adapter.logits(batch.to(adapter.device))
    finally:
        for h in hooks:
            h.remove()
    return gptq


def measure_sensitivities(adapter, calib: torch.Tensor, bits: list[int], group_size: int,
                          traces: dict[str, TraceEstimate] | None, quantizer: str = "gptq",
                          sym: bool = True) -> list[LayerSensitivity]:
    """Per layer and width: ‖Q_b(W) − W‖² and the GPTQ proxy. Layers sharing an input are solved
    together (quantize_jointly: one column loop over their stacked rows, the same result)."""
    groups = input_groups(adapter)
    block_of = {n: b.index for b in adapter.quantizable_layers() for n in b.names}
    gptq = layer_hessians(adapter, calib, groups)
    by_name = {}
    for group in groups:
        weights = {n: adapter.model.get_submodule(n).weight.detach() for n in group}
        for n, W in weights.items():
            t = traces.get(n) if traces else None
            by_name[n] = LayerSensitivity(n, block_of[n], W.numel(), W.shape[0], W.shape[1],
                                          t.mean if t else None, t.stderr if t else None)
        for b in bits:
            spec = QuantSpec(b, group_size, sym)
            if quantizer == "gptq":
                results = [r for r, _ in quantize_jointly([gptq[n] for n in group], spec, name=group[0])]
            else:
                results = [rtn(W, spec, n) for n, W in weights.items()]
            for (n, W), result in zip(weights.items(), results):
                W_hat = result.dequantize().to(W.device)
                by_name[n].weight_error[b] = float(((W.float() - W_hat) ** 2).sum())
                by_name[n].proxy[b] = output_error(W, W_hat, gptq[group[0]].H)
        for n in group:
            gptq[n].free()
    return [by_name[n] for n in adapter.linear_layer_names()]


def ranking_agreement(sens: list[LayerSensitivity], bits: list[int]) -> dict[int, float]:
    """Spearman correlation, per bit width, between HAWQ Ω and the GPTQ proxy across layers."""
    return {b: float(spearmanr([s.omega(b) for s in sens], [s.proxy[b] for s in sens]).statistic) for b in bits}
