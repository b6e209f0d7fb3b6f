"""Which model an lm-eval run scores: full precision, a quantized checkpoint, or quantized here.

Quantizing here goes through the same path as `qrobust probe` and `qrobust attribute`
(sweep.build_targets → sweep.quantize_for / quantize_model), so a `--method gptq --bits 3` model
is the one a sweep would evaluate.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qrobust.errors import QrobustError
from qrobust.precision import baseline_label, dtype_bits


@dataclass
class TargetSpec:
    """model: short name, hub id or directory; at most one of quantized, method (+ bits), plan."""

    model: str
    quantized: str | None = None
    method: str | None = None
    bits: int | None = None
    plan: str | None = None
    group_size: int = 128
    nsamples: int = 32
    calib_seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None


@dataclass(frozen=True)
class Loaded:
    """An adapter and the labels of the tidy table (full precision: method bf16/fp32/fp16 by dtype, bits 16 or 32)."""

    adapter: object
    model: str
    method: str
    bits: int


def torch_dtype(name: str | None):
    """A torch dtype by name; not imported from the CLI, which imports this package."""
    import torch

    dtype = getattr(torch, name, None) if name else None
    if name and not isinstance(dtype, torch.dtype):
        raise QrobustError(f"unknown dtype {name!r}: use float32, float16 or bfloat16")
    return dtype


def checkpoint_method(path: str | Path) -> str:
    meta = json.loads((Path(path) / "qrobust.json").read_text())
    return str(meta.get("quantization", {}).get("method", "gptq"))


def load_target(spec: TargetSpec, work_dir: str | Path | None = None) -> Loaded:
    from qrobust.models import load_model
    from qrobust.probe import target_for_checkpoint
    from qrobust.sweep import build_targets

    chosen = [name for name, v in (("quantized", spec.quantized), ("method", spec.method), ("plan", spec.plan)) if v]
    if len(chosen) > 1:
        raise QrobustError(f"give one of quantized, method (with bits) or plan, not {' and '.join(chosen)}")
    if spec.bits is not None and not spec.method:
        raise QrobustError("bits needs a method (gptq, rtn or hawq)")
    if spec.quantized:
        if not (Path(spec.quantized) / "qrobust.json").exists():
            raise QrobustError(f"{spec.quantized} is not a qrobust checkpoint: make one with `qrobust quantize`")
        target = target_for_checkpoint(spec.quantized)
        return Loaded(load_model(spec.quantized, device=spec.device), spec.model,
                      checkpoint_method(spec.quantized), target.bits)
    base = load_model(spec.model, device=spec.device, dtype=torch_dtype(spec.dtype))
    if not (spec.method or spec.plan):
        dtype = next(base.model.parameters()).dtype
        return Loaded(base, spec.model, baseline_label(dtype), dtype_bits(dtype))
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="qrobust-lm-eval-"))
    bits = [int(spec.bits)] if spec.bits is not None else []
    target, make = build_targets(spec.model, base, work, [], spec.method, bits, spec.plan, spec.group_size,
                                 spec.nsamples, spec.calib_seqlen, spec.seed)[1]
    method = spec.method or "plan"
    return Loaded(make(), spec.model, method, target.bits)
