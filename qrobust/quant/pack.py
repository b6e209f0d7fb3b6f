"""Bit packing in the GPTQ checkpoint layout.

Codes are laid out as one little-endian bit stream per column of 32-bit words: value j
occupies bits [b·j, b·j + b). For 2, 4 and 8 bits this is the familiar "32/b values per int32";
for 3 bits, 32 values fill three words with values 10 and 21 straddling word boundaries —
the layout AutoGPTQ and GPTQModel read.
"""
from __future__ import annotations

import math

import torch

from qrobust.errors import QrobustError

_MASK32 = (1 << 32) - 1


def values_per_chunk(bits: int) -> int:
    """Smallest number of values that fills whole 32-bit words."""
    return math.lcm(bits, 32) // bits


def _chunked(n: int, bits: int, what: str) -> tuple[int, int]:
    per_chunk = values_per_chunk(bits)
    if n % per_chunk:
        raise QrobustError(f"{what} has {n} entries; {bits}-bit packing needs a multiple of {per_chunk}")
    return per_chunk, per_chunk * bits // 32


def pack_last_dim(values: torch.Tensor, bits: int, what: str = "tensor") -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dimension into int32 words."""
    n = values.shape[-1]
    per_chunk, words_per_chunk = _chunked(n, bits, what)
    v = values.to(torch.int64).reshape(*values.shape[:-1], n // per_chunk, per_chunk)
    words = torch.zeros(*v.shape[:-1], words_per_chunk, dtype=torch.int64, device=values.device)
    for j in range(per_chunk):
        word, shift = divmod(bits * j, 32)
        words[..., word] |= (v[..., j] << shift) & _MASK32
        if shift + bits > 32:
            words[..., word + 1] |= v[..., j] >> (32 - shift)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(*values.shape[:-1], -1).to(torch.int32)


def unpack_last_dim(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_last_dim: n integer codes per row, as int32."""
    per_chunk, words_per_chunk = _chunked(n, bits, "packed tensor")
    words = packed.to(torch.int64) & _MASK32
    words = words.reshape(*packed.shape[:-1], n // per_chunk, words_per_chunk)
    maxq = (1 << bits) - 1
    out = torch.empty(*words.shape[:-1], per_chunk, dtype=torch.int64, device=packed.device)
    for j in range(per_chunk):
        word, shift = divmod(bits * j, 32)
        val = words[..., word] >> shift
        if shift + bits > 32:
            val = val | (words[..., word + 1] << (32 - shift))
        out[..., j] = val & maxq
    return out.reshape(*packed.shape[:-1], n).to(torch.int32)


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [out, in] -> qweight [in·bits/32, out], packed along the input dimension."""
    return pack_last_dim(q.contiguous(), bits, "in_features").t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight [in·bits/32, out] -> codes [out, in]."""
    return unpack_last_dim(qweight.t().contiguous(), bits, in_features)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [n_groups, out] -> qzeros [n_groups, out·bits/32], packed along outputs."""
    return pack_last_dim(zeros, bits, "out_features")


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack_last_dim(qzeros, bits, out_features)
