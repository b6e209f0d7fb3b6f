"""Triton kernels: GPTQ's column loop, and matrix products that read packed GPTQ weights.

Every kernel has a torch twin elsewhere in qrobust that stays the reference and the CPU path.
The kernels run where Triton can: on CUDA devices, and on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, set before Triton is imported), which is how the tests
check them on machines without a GPU.

The products that read packed GPTQ weights: layouts (where packed codes sit; the compile-time
plans), gemv_tiles (what a GEMV tile sums), gemv (the GEMV and its add-norm and split-sums
forms), dequant (dequantize; the fused matmul), launch (PDL, arrival counters, tile depths) and
ops (their torch custom ops); packed_matmul (split-K products for batched decoding); fragments
and fragments_matmul (2-, 3-, 4- and 8-bit weights in wgmma's register layout, Hopper's batched product, in
Gluon). Besides:
decode_attention, rms_norm (RMSNorm in one kernel, and with the residual add before it), swiglu
(silu(gate)·up of fused gate/up outputs), nucleus (the top-p draw from 16-bit logits),
gptq_block (GPTQ's column loop), tinygemm,
and availability (where the kernels run).
"""
from __future__ import annotations

import importlib

from qrobust.kernels.availability import interpreting, kernels_enabled, supports, triton_installed

# The kernels' public names, importable from here without importing Triton until one is used
# (Triton is optional, and must be imported after TRITON_INTERPRET is set): name -> module.
_EXPORTS = {
    "AddNorm": "gemv", "GemvConfig": "gemv", "compile_gemv_for": "gemv", "gemv_config": "gemv", "gemv_locks": "gemv",
    "gptq_gemv": "gemv", "gptq_gemv_add_norm": "gemv", "gptq_gemv_split_sums": "gemv",
    "gptq_dequantize": "dequant", "gptq_matmul": "dequant",
    "dequantize_op": "ops", "gemv_add_norm_op": "ops", "gemv_op": "ops", "gemv_split_sums_op": "ops",
    "half2_applies": "layouts", "pdl_supported": "launch",
}
__all__ = ["interpreting", "kernels_enabled", "supports", "triton_installed", *_EXPORTS]


def __getattr__(name: str):
    """A name of _EXPORTS, looked up in its module at every access (not kept here), so that callers
    get what a test patches into that module."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
