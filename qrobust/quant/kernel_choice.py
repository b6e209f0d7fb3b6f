"""Which packed product a QuantLinear runs, by device, bit width and rows: one table.

- gemv: kernels.gemv's GEMV, one pass over the packed words per few rows (decoding at
  batch 1–4); it also carries the fused norms and split sums (models.decode.fuse_norms).
- fused_matmul: kernels.packed_matmul, the weight tiles dequantized in registers on their way to
  the tensor cores, K split for parallelism (batched decoding: 5–64 rows), still memory bound.
- dequant_matmul: the whole weight dequantized, then the dense matmul (prefill, diffusion
  steps: enough rows to amortize the dequantization).
- fragments_matmul: kernels.fragments_matmul, for 2-, 3-, 4- and 8-bit layers (groups of 128 in
  input order) that QuantLinear has repacked in the fragments layout (Hopper GPUs): the weights as
  wgmma's register operand, 1-64 rows. A few rows run its 8-row tile, on an H200 at 4 bits in
  0.90-1.22× the GPTQ layout's GEMV time at one row and 0.34-1.01× at four
  (results/engine/fragments_splits.json); the decoder's fused GEMVs keep GPTQ's layout
  (QuantLinear.use_fragments).

A layout other than GPTQ's has its own list (LAYOUT_TABLE), whatever the device and width.

Rows past the last bound of a list go to its last kernel. The CPU entries are those the tests
run under Triton's interpreter; production CPU code never reaches the packed kernels.
"""
from __future__ import annotations

GEMV_MAX_ROWS = 4  # the GEMV's arrival counters are sized for this many rows (QuantLinear.uses_kernels)
FUSED_MAX_ROWS = 64

# (most rows, kernel), in increasing order of rows
_BY_ROWS = ((GEMV_MAX_ROWS, "gemv"), (FUSED_MAX_ROWS, "fused_matmul"), (None, "dequant_matmul"))

KERNEL_TABLE: dict[str, dict[int, tuple[tuple[int | None, str], ...]]] = {
    device: {bits: _BY_ROWS for bits in (2, 3, 4, 8)} for device in ("cuda", "cpu")
}
# bit widths without an entry (1, 5, 6, 7): the GEMV for few rows, else dequantize
FALLBACK = ((GEMV_MAX_ROWS, "gemv"), (None, "dequant_matmul"))
# the fragments layout's product takes up to wgmma's 64 rows
LAYOUT_TABLE: dict[str, tuple[tuple[int | None, str], ...]] = {
    "fragments": ((FUSED_MAX_ROWS, "fragments_matmul"), (None, "dequant_matmul")),
}


def packed_kernel(device_type: str, bits: int, rows: int, layout: str = "gptq") -> str:
    """The product for `rows` rows of a `bits`-bit layer whose codes are in `layout` on a device of `device_type`."""
    by_rows = LAYOUT_TABLE.get(layout) or KERNEL_TABLE.get(device_type, {}).get(bits, FALLBACK)
    for most, kernel in by_rows:
        if most is None or rows <= most:
            return kernel
    raise AssertionError("every row list ends with an unbounded entry")
