"""GPTQ (Frantar et al., 2022): second-order, column-by-column weight quantization.

One object per linear layer: feed it the layer's inputs with add_batch, then call quantize.
Names follow the paper and the reference implementation (H, Hinv, blocksize, percdamp).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from qrobust.errors import QrobustError
from qrobust.kernels import kernels_enabled
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
        x = inp.reshape(-1, self.columns)
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            # Half-precision products are exact in float32, so multiplying the inputs as they are
            # on tensor cores, accumulating in float32, matches a float32 matmul at a fraction of its time.
            try:
                self.H.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=2 / self.nsamples)
                return
            except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
                pass
        x = math.sqrt(2 / self.nsamples) * x.t().float()
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
               name: str = "layer", use_kernel: bool | None = None) -> tuple[QuantResult, torch.Tensor]:
    """The GPTQ column loop on one weight matrix [rows, columns]; returns the result and the
    loss of each row. use_kernel: run each block's columns in one Triton kernel (default: on
    CUDA when Triton is installed); static groups always take the torch loop."""
    W = weight.detach().clone().float()
    H = H.clone()
    rows, columns = W.shape
    n_groups = spec.groups_for(columns, name)
    gs = columns // n_groups
    blocksize = _aligned_blocksize(blocksize, gs)
    if use_kernel is None:
        use_kernel = kernels_enabled(W.device)
    use_kernel = use_kernel and not static_groups

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

    Hinv = _inverse_cholesky(H, percdamp, name).contiguous()

    Q = torch.zeros_like(W)
    Losses = torch.zeros(rows, device=W.device)
    grids: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scale, zero) of each group, in column order
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        if use_kernel:
            Q1, Err1, block_loss = _block_triton(W, Hinv, i1, i2, gs, spec, grids)
        else:
            Q1, Err1, block_loss = _block_torch(W, Hinv, i1, i2, gs, spec, grids, static_grids, perm)
        Q[:, i1:i2] = Q1
        Losses += block_loss / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if static_grids is not None:
        grids = static_grids
        g_order = (perm if perm is not None else torch.arange(columns, device=W.device)) // gs
    else:
        g_order = torch.arange(columns, device=W.device) // gs
    g_idx = g_order.to(torch.int32)
    if perm is not None:
        invperm = torch.argsort(perm)
        Q, g_idx = Q[:, invperm], g_idx[invperm]
    result = QuantResult(q=Q.to(torch.uint8), scales=torch.stack([s for s, _ in grids]),
                         zeros=torch.stack([z for _, z in grids]), g_idx=g_idx, spec=spec)
    return result, Losses


def _group_grid(W: torch.Tensor, W1: torch.Tensor, i: int, col: int, i2: int, gs: int, spec: QuantSpec):
    """The grid of the group starting at column `col` (offset i in the block): the block's columns
    are already updated in W1; a group longer than the block continues in W (block size is aligned
    to the group size, so a group starts at a block boundary or lies inside one block)."""
    return find_params(torch.cat([W1[:, i:i + gs], W[:, i2:col + gs]], dim=1), spec)


def _block_torch(W, Hinv, i1, i2, gs, spec, grids, static_grids, perm):
    """The reference loop: one column at a time."""
    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Losses1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
        col = i1 + i
        w = W1[:, i]
        d = Hinv1[i, i]
        if static_grids is not None:
            scale, zero = static_grids[int(perm[col]) // gs if perm is not None else col // gs]
        else:
            if col % gs == 0:
                grids.append(_group_grid(W, W1, i, col, i2, gs, spec))
            scale, zero = grids[-1]
        q = quantize(w, scale, zero, spec.maxq)
        wq = dequantize(q, scale, zero)
        Q1[:, i] = q
        Losses1[:, i] = (w - wq) ** 2 / d**2
        err1 = (w - wq) / d
        W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        Err1[:, i] = err1
    return Q1, Err1, torch.sum(Losses1, 1)


def _block_triton(W, Hinv, i1, i2, gs, spec, grids):
    """The same block in one kernel launch (qrobust.kernels.gptq_block)."""
    from qrobust.kernels.gptq_block import gptq_block

    W1, Hinv1 = W[:, i1:i2], Hinv[i1:i2, i1:i2]
    if gs <= i2 - i1:
        Q1, Err1, loss, scales, zeros = gptq_block(W1, Hinv1, spec.maxq, spec.sym, gs)
        grids.extend(zip(scales, zeros))
    else:
        if i1 % gs == 0:
            grids.append(_group_grid(W, W1, 0, i1, i2, gs, spec))
        Q1, Err1, loss, _, _ = gptq_block(W1, Hinv1, spec.maxq, spec.sym, None, *grids[-1])
    return Q1, Err1, loss


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
