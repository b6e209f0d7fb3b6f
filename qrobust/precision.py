"""Which floating-point dtype a model runs in, and the name its full-precision baseline gets.

bfloat16 on CUDA (what the seed models are published and evaluated in), and on CPUs that
multiply bfloat16 natively (AVX512-BF16 or AMX: about 3x float32 for the built-in pair on a
2-core Zen 4, docs/metrics.md); float32 on other CPUs, where bfloat16 is emulated and slower.
`--dtype` overrides it, and so does QROBUST_CPU_DTYPE for CPUs (the test suite pins float32, so
that its numerical checks do not depend on the machine). The baseline of a sweep is named after
the dtype it really ran in (bf16, fp32, fp16), never a fixed label.
"""
from __future__ import annotations

import os

import torch

from qrobust.errors import QrobustError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LABELS: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
BITS: dict[str, int] = {"float32": 32, "bfloat16": 16, "float16": 16}
ALIASES: dict[str, str] = {**{label: name for name, label in LABELS.items()}, "fp": "float32", "half": "float16"}
# every label a full-precision baseline can carry (fp16 also names the baselines of older sweeps)
BASELINE_LABELS = frozenset(LABELS.values())


def dtype_name(name: str | torch.dtype) -> str:
    """The canonical name ('bfloat16', ...) of a dtype given by name, short label or torch dtype."""
    if isinstance(name, torch.dtype):
        text = str(name).removeprefix("torch.")
    else:
        text = ALIASES.get(name.strip().lower(), name.strip().lower())
    if text not in DTYPES:
        raise QrobustError(f"unknown dtype {name!r}: use float32, bfloat16 or float16 (or fp32, bf16, fp16)")
    return text


def cpu_has_native_bf16() -> bool:
    """Whether this CPU's oneDNN kernels multiply bfloat16 in hardware (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def default_dtype(device: str | torch.device) -> str:
    if torch.device(device).type == "cuda":
        return "bfloat16"
    pinned = os.environ.get("QROBUST_CPU_DTYPE")
    if pinned:
        return dtype_name(pinned)
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The torch dtype to load in: `name` when given, else the device's default."""
    return DTYPES[dtype_name(name) if name is not None else default_dtype(device)]


def baseline_label(name: str | torch.dtype) -> str:
    """'bf16', 'fp32' or 'fp16': the method name of a full-precision config in this dtype."""
    return LABELS[dtype_name(name)]


def dtype_bits(name: str | torch.dtype) -> int:
    return BITS[dtype_name(name)]


def is_baseline(method: str) -> bool:
    return method in BASELINE_LABELS
