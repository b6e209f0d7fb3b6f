"""Bit packing in the GPTQ checkpoint layout, and one layout of our kernels' own.

Codes are laid out in chunks of 32-bit words along the packed dimension, each chunk holding
values_per_chunk(b) values. In the GPTQ layout ("gptq") a chunk is a little-endian bit stream:
value j occupies bits [b·j, b·j + b). For 2, 4 and 8 bits this is the familiar "32/b values per
int32"; for 3 bits, 32 values fill three words with values 10 and 21 straddling word boundaries
— the layout AutoGPTQ and GPTQModel read, and what checkpoints hold.

The "pairs" layout (3 bits) is the GEMV's: values 2i and 2i + 1 sit 16 bits apart in one word,
so that one mask takes both into the two halves of a float16 pair, next to inputs 2i and 2i + 1,
which are one 32-bit word of a float16 row (kernels.gemv_tiles._half2_sums). Word r (of 3)
holds values 10r … 10r + 9 at bits 3i and 16 + 3i (i = 0 … 4, value 10r + 2i then 10r + 2i + 1);
the bits left, 15 and 31 of each word, hold values 30 and 31, bit r of each in word r.
Checkpoints never hold it: layers repack on the way in and out (QuantLinear.half2).
"""
from __future__ import annotations

import math

import torch

from qrobust.errors import QrobustError

_MASK32 = (1 << 32) - 1

# A value's bit field: (word of the chunk, first bit in it, width, the value's first bit it holds)
Field = tuple[int, int, int, int]
LAYOUTS = ("gptq", "pairs")


def values_per_chunk(bits: int) -> int:
    """Smallest number of values that fills whole 32-bit words."""
    return math.lcm(bits, 32) // bits


def layout_applies(bits: int, layout: str) -> bool:
    """Whether `layout` is defined for b-bit values: GPTQ's for any b ≤ 8, the pairs layout for 3."""
    return layout == "gptq" and 1 <= bits <= 8 or layout == "pairs" and bits == 3


def chunk_fields(bits: int, layout: str = "gptq") -> tuple[tuple[Field, ...], ...]:
    """Where each value of a chunk sits: for value j, its bit fields (module docstring), one
    unless it straddles words (GPTQ's 3 bits) or is spread over them (the pairs layout)."""
    if not layout_applies(bits, layout):
        raise QrobustError(f"no {layout!r} packing layout for {bits}-bit values; layouts: gptq (1–8 bits), "
                           f"pairs (3 bits)")
    if layout == "pairs":
        regular = tuple(((j // 10, 16 * (j % 2) + 3 * (j % 10 // 2), 3, 0),) for j in range(30))
        spread = tuple(tuple((r, 15 + 16 * half, 1, r) for r in range(3)) for half in (0, 1))
        return regular + spread
    fields = []
    for j in range(values_per_chunk(bits)):
        word, shift = divmod(bits * j, 32)
        low = min(bits, 32 - shift)
        fields.append(((word, shift, low, 0),) + (((word + 1, 0, bits - low, low),) if low < bits else ()))
    return tuple(fields)


def _chunked(n: int, bits: int, what: str) -> tuple[int, int]:
    per_chunk = values_per_chunk(bits)
    if n % per_chunk:
        raise QrobustError(f"{what} has {n} entries; {bits}-bit packing needs a multiple of {per_chunk}")
    return per_chunk, per_chunk * bits // 32


def pack_last_dim(values: torch.Tensor, bits: int, what: str = "tensor", layout: str = "gptq") -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dimension into int32 words."""
    n = values.shape[-1]
    per_chunk, words_per_chunk = _chunked(n, bits, what)
    v = values.to(torch.int64).reshape(*values.shape[:-1], n // per_chunk, per_chunk)
    words = torch.zeros(*v.shape[:-1], words_per_chunk, dtype=torch.int64, device=values.device)
    for j, fields in enumerate(chunk_fields(bits, layout)):
        for word, first, width, low in fields:
            words[..., word] |= ((v[..., j] >> low) & ((1 << width) - 1)) << first
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(*values.shape[:-1], -1).to(torch.int32)


def unpack_last_dim(packed: torch.Tensor, bits: int, n: int, layout: str = "gptq") -> torch.Tensor:
    """Inverse of pack_last_dim: n integer codes per row, as int32."""
    per_chunk, words_per_chunk = _chunked(n, bits, "packed tensor")
    words = packed.to(torch.int64) & _MASK32
    words = words.reshape(*packed.shape[:-1], n // per_chunk, words_per_chunk)
    out = torch.zeros(*words.shape[:-1], per_chunk, dtype=torch.int64, device=packed.device)
    for j, fields in enumerate(chunk_fields(bits, layout)):
        for word, first, width, low in fields:
            out[..., j] |= ((words[..., word] >> first) & ((1 << width) - 1)) << low
    return out.reshape(*packed.shape[:-1], n).to(torch.int32)


def pack_qweight(q: torch.Tensor, bits: int, layout: str = "gptq") -> torch.Tensor:
    """Codes [out, in] -> qweight [in·bits/32, out], packed along the input dimension."""
    return pack_last_dim(q.contiguous(), bits, "in_features", layout).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int, layout: str = "gptq") -> torch.Tensor:
    """qweight [in·bits/32, out] -> codes [out, in]."""
    return unpack_last_dim(qweight.t().contiguous(), bits, in_features, layout)


def repack_qweight(qweight: torch.Tensor, bits: int, in_features: int, source: str, target: str) -> torch.Tensor:
    """qweight packed in layout `source` as layout `target` (same shape)."""
    if source == target:
        return qweight
    return pack_qweight(unpack_qweight(qweight, bits, in_features, source), bits, target)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [n_groups, out] -> qzeros [n_groups, out·bits/32], packed along outputs."""
    return pack_last_dim(zeros, bits, "out_features")


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack_last_dim(qzeros, bits, out_features)
