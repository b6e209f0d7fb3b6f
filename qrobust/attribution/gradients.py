"""Projected per-example gradients through Bergson's hooks, with the adapter's own loss.

TrackStar-style features: each linear layer's per-example gradient G (out × in) is scaled by
the inverse square root of an Adafactor-factored second moment, projected on both sides by
seeded Rademacher matrices (p × p per layer), and the layers are concatenated. Documents longer
than the model's context are cut into windows; features are linear in the gradient, so a
document's feature is the sum of its windows' features (the gradient of its summed loss).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from qrobust.errors import QrobustError


def _bergson():
    try:
        from bergson import GradientProcessor, InMemoryCollector
        from bergson.config.config import IndexConfig
        from bergson.gradients import AdafactorNormalizer
    except ImportError as e:
        raise QrobustError(f"attribution needs Bergson ({e.name} is missing): "
                           "pip install -e '.[attribution]' && pip install --no-deps 'bergson==2.5.1'") from None
    return GradientProcessor, InMemoryCollector, IndexConfig, AdafactorNormalizer


@dataclass
class GradientConfig:
    projection_dim: int = 16  # p: p × p features per layer
    projection_seed: int = 0  # the same seed for every model compared, so features share one space
    mask_seed: int = 0  # diffusion: window i is corrupted with seed mask_seed + i, in every model
    max_tokens: int = 1024  # of each document; None for all
    window: int = 512  # at most the model's context
    normalizer_windows: int = 32  # windows whose gradients estimate the second moments
    batch_size: int = 1  # windows per forward/backward; AR features do not depend on it, diffusion
    # masks do (batch b is corrupted with seed mask_seed + its first window's index)
    precondition: bool = True  # False: raw gradients (no second-moment scaling)


def token_windows(tokenizer, texts: list[str], max_tokens: int | None, window: int) -> list[tuple[int, list[int]]]:
    """(owner index, token ids) for each window of each text; windows of fewer than 2 tokens are dropped."""
    out = []
    for owner, ids in enumerate(tokenizer(texts)["input_ids"]):
        ids = ids[:max_tokens] if max_tokens else ids
        out.extend((owner, ids[s:s + window]) for s in range(0, len(ids), window) if len(ids[s:s + window]) >= 2)
    owners = {o for o, _ in out}
    if len(owners) < len(texts):
        empty = sorted(set(range(len(texts))) - owners)[:5]
        raise QrobustError(f"texts {empty} have fewer than 2 tokens: drop them from the corpus or queries")
    return out


def windows_for(adapter, texts: list[str], cfg: GradientConfig) -> list[tuple[int, list[int]]]:
    context = adapter.max_positions or cfg.window
    return token_windows(adapter.tokenizer, texts, cfg.max_tokens, min(cfg.window, context))


def _prepare(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():  # activation gradients must flow; weight grads are only read for normalizers
        p.requires_grad_(True)


def estimate_normalizers(adapter, windows: list[tuple[int, list[int]]], cfg: GradientConfig) -> dict:
    """Adafactor row/column second moments of per-window gradients, one pair per linear layer."""
    *_, AdafactorNormalizer = _bergson()
    names = adapter.linear_layer_names()
    model = adapter.model
    _prepare(model)
    step = max(1, len(windows) // cfg.normalizer_windows)
    chosen = windows[::step][:cfg.normalizer_windows]
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for i, (_, ids) in enumerate(chosen):
        model.zero_grad(set_to_none=True)
        x = torch.tensor([ids], device=adapter.device)
        adapter.loss(x, seed=cfg.mask_seed + 10_000 + i, reduction="sum").backward()
        for name in names:
            g2 = model.get_submodule(name).weight.grad.float().pow(2)
            rows[name] = rows.get(name, 0) + g2.sum(1)
            cols[name] = cols.get(name, 0) + g2.sum(0)
    model.zero_grad(set_to_none=True)
    return {n: AdafactorNormalizer(rows[n] / len(chosen), cols[n] / len(chosen)) for n in names}


@dataclass
class Features:
    values: np.ndarray  # [items, dim], unit norm rows
    seconds: float
    bytes_per_item: int


def _right_padded(rows: list[list[int]], tokenizer, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids and attention mask, padded on the right (real tokens never see padding)."""
    if len(rows) == 1:
        return torch.tensor(rows, device=device), None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return x, mask


def collect_features(adapter, texts: list[str], cfg: GradientConfig, normalizers: dict | None,
                     desc: str = "gradients", progress: bool = True,
                     windows: list[tuple[int, list[int]]] | None = None) -> Features:
    """One unit-norm feature row per text (windows: the texts' windows, when already made)."""
    GradientProcessor, InMemoryCollector, IndexConfig, _ = _bergson()
    import datasets

    windows = windows or windows_for(adapter, texts, cfg)
    model = adapter.model
    _prepare(model)
    processor = GradientProcessor(normalizers=normalizers or {}, projection_dim=cfg.projection_dim,
                                  projection_seed=cfg.projection_seed)
    index_cfg = IndexConfig(run_path="unused", projection_dim=cfg.projection_dim, projection_seed=cfg.projection_seed)
    data = datasets.Dataset.from_dict({"input_ids": [ids for _, ids in windows]})
    collector = InMemoryCollector(model=model, data=data, cfg=index_cfg, processor=processor,
                                  target_modules=set(adapter.linear_layer_names()))
    t0 = time.perf_counter()
    starts = range(0, len(windows), cfg.batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        indices = list(range(start, min(start + cfg.batch_size, len(windows))))
        x, mask = _right_padded([windows[i][1] for i in indices], adapter.tokenizer, adapter.device)
        with collector.with_batch(None):
            # summed, not averaged: each window's gradient is independent of its batch
            loss = adapter.loss(x, mask, seed=cfg.mask_seed + start, reduction="sum")
            loss.backward()
        model.zero_grad(set_to_none=True)
        collector.process_batch(indices, losses=loss.detach().expand(len(indices)) / len(indices))
    collector.teardown()
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    per_window = torch.cat([collector.gradients[n] for n in sorted(collector.gradients)], dim=1).float()
    owners = torch.tensor([o for o, _ in windows])
    summed = torch.zeros(len(texts), per_window.shape[1]).index_add_(0, owners, per_window)
    unit = summed / summed.norm(dim=1, keepdim=True).clamp_min(1e-30)
    bytes_per_item = per_window.shape[1] * collector.save_dtype.itemsize
    return Features(unit.numpy(), seconds, bytes_per_item)
