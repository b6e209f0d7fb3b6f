"""Where the Triton kernels run: whether Triton is installed, whether its interpreter runs them
(TRITON_INTERPRET=1, set before Triton is imported), and which devices use them by default."""
from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_enabled(device: torch.device | str) -> bool:
    """Whether to use the Triton kernels for tensors on `device` by default: on CUDA with Triton
    installed, unless QROBUST_KERNELS=0 asks for the torch path (for comparisons)."""
    if os.environ.get("QROBUST_KERNELS", "1") == "0":
        return False
    return torch.device(device).type == "cuda" and triton_installed()


def supports(device: torch.device | str) -> bool:
    """Whether the kernels can run on tensors on `device` at all (CUDA, or CPU when interpreting)."""
    kind = torch.device(device).type
    return triton_installed() and (kind == "cuda" or (kind == "cpu" and interpreting()))
