"""GPTQ (Frantar et al., 2022): second-order, column-by-column weight quantization.

One object per linear layer: feed it the layer's inputs with add_batch, then call quantize.
Names follow the paper and the reference implementation (H, Hinv, blocksize, percdamp).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from qrobust.errors import QrobustError
from qrobust.quant.grid import QuantResult, QuantSpec, dequantize, find_params, quantize


class GPTQ:
    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Accumulate H = (2/N) Σ XXᵀ, N counted in sequences as in the reference."""
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        x = inp.reshape(-1, self.columns).t().float()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x @ x.t()

    def quantize(
        self,
        spec: QuantSpec,
        blocksize: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
        name: str = "layer",
    ) -> tuple[QuantResult, float]:
        """Quantize the layer's weight; returns the result and GPTQ's loss Σ (w−q)²/Hinv[i,i]² / 2."""
        result, row_losses = gptq_solve(self.layer.weight, self.H, spec, blocksize, percdamp, act_order,
                                        static_groups, name)
        return result, float(row_losses.sum())

    def free(self) -> None:
        self.H = None


def quantize_jointly(layers: list[GPTQ], spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                     act_order: bool = False, static_groups: bool = False, name: str = "layers") \
        -> list[tuple[QuantResult, float]]:
    """Layers that read the same input (q/k/v; gate/up) share one Hessian, and GPTQ treats rows
    independently given H: one solve over their stacked rows equals one solve per layer, with a
    single column loop instead of several."""
    W = torch.cat([g.layer.weight.detach() for g in layers], dim=0)
    result, row_losses = gptq_solve(W, layers[0].H, spec, blocksize, percdamp, act_order, static_groups, name)
    out, start = [], 0
    for g in layers:
        rows = slice(start, start + g.rows)
        part = QuantResult(q=result.q[rows], scales=result.scales[:, rows], zeros=result.zeros[:, rows],
                           g_idx=result.g_idx, spec=spec)
        out.append((part, float(row_losses[rows].sum())))
        start += g.rows
    return out


def gptq_solve(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128,
               percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
               name: str = "layer") -> tuple[QuantResult, torch.Tensor]:
    """The GPTQ column loop on one weight matrix [rows, columns]; returns the result and the
    loss of each row."""
    W = weight.detach().clone().float()
    H = H.clone()
    rows, columns = W.shape
    n_groups = spec.groups_for(columns, name)
    gs = columns // n_groups
    blocksize = _aligned_blocksize(blocksize, gs)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static_grids = None
    if static_groups:
        static_grids = [find_params(W[:, g * gs:(g + 1) * gs], spec) for g in range(n_groups)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv = _inverse_cholesky(H, percdamp, name)

    Q = torch.zeros_like(W)
    Losses = torch.zeros(rows, device=W.device)
    scales, zeros = [None] * n_groups, [None] * n_groups
    g_order = torch.empty(columns, dtype=torch.int32, device=W.device)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if static_grids is not None:
                g = int(perm[col]) // gs if perm is not None else col // gs
                scale, zero = static_grids[g]
            else:
                g = col // gs
                if col % gs == 0:
                    # Block size is aligned to the group size, so the group's columns are either
                    # in W1 (already updated by this block) or start at a block boundary of W.
                    scale, zero = find_params(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs], spec)
            scales[g], zeros[g] = scale, zero
            g_order[col] = g
            q = quantize(w, scale, zero, spec.maxq)
            wq = dequantize(q, scale, zero)
            Q1[:, i] = q
            Losses1[:, i] = (w - wq) ** 2 / d**2
            err1 = (w - wq) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    g_idx = g_order
    if perm is not None:
        invperm = torch.argsort(perm)
        Q, g_idx = Q[:, invperm], g_order[invperm]
    result = QuantResult(q=Q.to(torch.uint8), scales=torch.stack(scales), zeros=torch.stack(zeros), g_idx=g_idx,
                         spec=spec)
    return result, Losses


def output_error(weight: torch.Tensor, weight_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Mean per-sequence ‖WX − ŴX‖² from the accumulated H = (2/N) Σ XXᵀ."""
    D = weight.detach().float() - weight_hat.detach().float()
    return float(torch.sum((D @ H) * D) / 2)


def _aligned_blocksize(blocksize: int, group_size: int) -> int:
    """A block size for which every group starts at a block boundary or lies inside one block."""
    if group_size <= blocksize:
        return max(group_size, blocksize // group_size * group_size)
    return blocksize if group_size % blocksize == 0 else group_size


def _inverse_cholesky(H: torch.Tensor, percdamp: float, name: str, retries: int = 10) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹; raises λ like GPTQModel when H is not positive definite."""
    mean_diag = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    for attempt in range(retries):
        damp = (percdamp + 0.01 * attempt) * mean_diag
        Hd = H.clone()
        Hd[idx, idx] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise QrobustError(
        f"GPTQ could not invert the Hessian of {name} even with dampening {percdamp + 0.01 * (retries - 1):.2f}: "
        "use more or longer calibration sequences"
    )
