"""Hutchinson estimates of each quantizable layer's Hessian-block trace under the model's loss.

One Rademacher probe v over all layers at once and one Hessian-vector product (double backprop)
give vₗᵀ(Hv)ₗ for every layer l; its expectation is Tr(Hₗₗ) because the cross terms
vₗᵀHₗₘvₘ have mean zero. Probes continue until every layer's standard error is below
`rel_tol` of its estimate or `max_probes` is reached. Memory stays near one double backward.

At real model sizes the forward pass and first backward dominate, so `probes_per_backward`
probes share one (each a second backward through the kept graph), and the probes are drawn on
the model's device in its dtype: ±1 is exact in bfloat16, and so is v·Hv elementwise, which is
summed in float32. A group of probes shares its batch and mask, so the standard error is taken
over groups (independent draws), not over probes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm


MIN_GROUPS = 3  # a standard error from fewer independent draws is too noisy to stop on


@dataclass
class TraceEstimate:
    mean: float
    stderr: float
    probes: int
    n_params: int


def hutchinson_traces(adapter, batches: list[torch.Tensor], layer_names: list[str] | None = None,
                      max_probes: int = 64, min_probes: int = 8, rel_tol: float = 0.05, seed: int = 0,
                      progress: bool = True, loss_seed: int | None = None,
                      probes_per_backward: int = 1) -> dict[str, TraceEstimate]:
    """Tr(H_l) of the adapter's own loss (AR: next-token CE; diffusion: masked ELBO loss).

    Group k (of `probes_per_backward` probes) uses batch k mod len(batches) with mask seed k (or
    `loss_seed` for every group), so the estimate is of the Hessian averaged over data and (for
    diffusion) masks. Computed in the model's dtype.
    """
    model = adapter.model
    names = layer_names or adapter.linear_layer_names()
    params = [model.get_submodule(n).weight for n in names]
    per_group = max(1, probes_per_backward)
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}  # one mean per group of probes
    groups = -(-max_probes // per_group)
    bar = tqdm(range(groups), desc="hutchinson probes", disable=not progress)
    try:
        for k in bar:
            batch = batches[k % len(batches)].to(adapter.device)
            sums = torch.zeros(len(params), dtype=torch.float32, device=params[0].device)
            with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
                loss = adapter.loss(batch, seed=k if loss_seed is None else loss_seed)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for j in range(per_group):
                    vs = [_rademacher(p, g) for p in params]
                    hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=j < per_group - 1)
                    sums += torch.stack([(v * hv).sum(dtype=torch.float32) for v, hv in zip(vs, hvs)])
                    del vs, hvs
            del grads, loss
            for n, x in zip(names, (sums / per_group).tolist()):  # one device sync per group
                samples[n].append(x)
            if (k + 1) * per_group >= min_probes and k + 1 >= MIN_GROUPS:
                worst = max(_stderr(s) / max(abs(_mean(s)), 1e-12) for s in samples.values())
                bar.set_postfix(rel_err=f"{worst:.3f}")
                if worst < rel_tol:
                    break
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    return {n: TraceEstimate(_mean(s), _stderr(s), len(s) * per_group, params[i].numel())
            for i, (n, s) in enumerate(samples.items())}


def _rademacher(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±1 of p's shape, drawn where p lives and in its dtype (drawing 1.7B of them on the CPU and
    copying them over took longer than the Hessian-vector product itself)."""
    return torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=p.dtype).mul_(2).sub_(1)


def exact_trace(adapter, batch: torch.Tensor, layer_name: str, loss_seed: int = 0) -> float:
    """Tr(H_l) from one Hessian-vector product per weight: for checking the estimator on small layers."""
    weight = adapter.model.get_submodule(layer_name).weight
    was = weight.requires_grad
    weight.requires_grad_(True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            loss = adapter.loss(batch.to(adapter.device), seed=loss_seed)
            (grad,) = torch.autograd.grad(loss, [weight], create_graph=True)
            flat = grad.flatten()
            total = 0.0
            for i in range(flat.numel()):
                (row,) = torch.autograd.grad(flat[i], [weight], retain_graph=True)
                total += float(row.flatten()[i])
    finally:
        weight.requires_grad_(was)
    return total


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("inf")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
