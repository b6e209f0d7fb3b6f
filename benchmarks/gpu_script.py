"""What the GPU-only benchmark scripts share (imported from the script's own folder, which Python
puts first on the path): the check for a CUDA device and the JSON file of their rows."""
from __future__ import annotations

import json

import torch


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: needs a CUDA device")


def write_rows(path: str | None, rows: list[dict], **fields) -> None:
    """`fields`, the torch version, the GPU's name and `rows` as JSON at `path` (nothing without one)."""
    if path:
        with open(path, "w") as f:
            json.dump({**fields, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f,
                      indent=2)
