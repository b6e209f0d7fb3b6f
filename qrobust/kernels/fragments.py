"""The fragments layout of 4-bit weights: each 32-bit word holds the eight codes one thread of a
Hopper warpgroup feeds to wgmma as its A operand for one 16-input step.

The product yᵀ = Ŵ xᵀ makes the weights wgmma's register operand (kernels.fragments_matmul), as
CUTLASS's Machete does. Thread lane = 4g + c of warp w holds, per 16-input step t, outputs
16w + g and 16w + g + 8 and inputs 16t + 2c, 2c + 1, 2c + 8, 2c + 9 of a tile of 64 outputs. Here
a word keeps exactly those: the code at bits 4J + 16h is output 16w + 8(J & 1) + g, input
16t + 8(J >> 1) + 2c + h, so one shift and one LOP3 put two of them (h = 0, 1) under a bf16
exponent as the register pair wgmma reads. The words of a tile's 128 inputs are 1024 in a row,
[32 (8w + g), 4 (c), 8 (t)], so a thread's eight are 32 contiguous bytes, and tiles follow each
other output tile by output tile: [N/64, K/128, 32, 4, 8]. It is a permutation of GPTQ's qweight
[K/8, N] and is stored in the same buffer (QuantLinear.layout "fragments"; checkpoints keep GPTQ's).

to_fragments / from_fragments convert a qweight (any device); dequantize_fragments gives Ŵᵀ from
it (a Triton kernel, also for the interpreter) for products of more rows.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qrobust.kernels.layouts import _group_scales_zeros
from qrobust.quant.pack import pack_qweight, unpack_qweight

BITS = 4
TILE_N = 64  # outputs per tile: one warpgroup's wgmma rows
TILE_K = 128  # inputs per tile: one group


def fragments_apply(bits: int, group_size: int, in_group_order: bool, N: int, K: int) -> bool:
    """Whether a layer can take the fragments layout: 4 bits, groups of 128 in input order, whole tiles."""
    return bits == BITS and group_size == TILE_K and in_group_order and N % TILE_N == 0 and K % TILE_K == 0


def _index(N: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, input, bit) of each code of the fragments layout, [N/64, K/128, 32, 4, 8, 4 (J), 2 (h)]."""
    def along(size: int, dim: int) -> torch.Tensor:
        return torch.arange(size, device=device).view((1,) * dim + (-1,) + (1,) * (7 - dim))

    tile, step, w, g, c, t, j, h = (along(n, d) for d, n in enumerate((N // TILE_N, K // TILE_K, 4, 8, 4, 8, 4, 2)))
    n = TILE_N * tile + 16 * w + 8 * (j & 1) + g
    k = TILE_K * step + 16 * t + 8 * (j >> 1) + 2 * c + h
    bit = 4 * j + 16 * h
    shape = (N // TILE_N, K // TILE_K, 4, 8, 4, 8, 4, 2)
    return n.expand(shape), k.expand(shape), bit.expand(shape)


def to_fragments(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """GPTQ's 4-bit qweight [K/8, N] → the fragments layout, in a tensor of the same shape."""
    N = qweight.shape[1]
    codes = unpack_qweight(qweight, BITS, K).to(torch.int64)  # [N, K]
    n, k, bit = _index(N, K, qweight.device)
    words = (codes[n, k] << bit).sum(dim=(-2, -1)).reshape(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.view(qweight.shape)


def from_fragments(words: torch.Tensor, K: int) -> torch.Tensor:
    """The fragments layout → GPTQ's qweight [K/8, N] (to_fragments' inverse)."""
    N = words.shape[1]
    n, k, bit = _index(N, K, words.device)
    w = words.reshape(N // TILE_N, K // TILE_K, 4, 8, 4, 8, 1, 1).to(torch.int64) & 0xFFFFFFFF
    codes = torch.empty(N, K, dtype=torch.int32, device=words.device)
    codes[n, k] = ((w >> bit) & 15).to(torch.int32)
    return pack_qweight(codes, BITS)


@triton.jit
def _dequant_fragments_kernel(qw_ptr, s_ptr, qz_ptr, w_ptr, N, K, OFFSET: tl.constexpr):
    """Ŵᵀ of one tile (64 outputs × 128 inputs) from its 1024 words."""
    tile, step = tl.program_id(0), tl.program_id(1)
    o = tl.arange(0, 64)[None, :]  # output in the tile
    i = tl.arange(0, 128)[:, None]  # input in the tile
    word = ((o // 16) * 8 + o % 8) * 32 + ((i % 8) // 2) * 8 + i // 16
    bit = (4 * (2 * ((i // 8) % 2) + (o // 8) % 2) + 16 * (i % 2)).to(tl.uint32)
    words = tl.load(qw_ptr + (tile * (K // 128) + step) * 1024 + word).to(tl.uint32, bitcast=True)
    q = ((words >> bit) & 15).to(tl.float32)
    n = tile * 64 + o
    s, z = _group_scales_zeros(s_ptr, qz_ptr, step, n, n < N, N, BITS, OFFSET)
    k = step * 128 + i
    tl.store(w_ptr + k * N + n, (s * (q - z)).to(w_ptr.dtype.element_ty))


def dequantize_fragments(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, zero_offset: int, K: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """Ŵᵀ [K, N] in `dtype` from a qweight in the fragments layout (as kernels.dequant's for GPTQ's)."""
    N = qweight.shape[1]
    w = torch.empty(K, N, device=qweight.device, dtype=dtype)
    _dequant_fragments_kernel[(N // TILE_N, K // TILE_K)](qweight, scales, qzeros, w, N, K, OFFSET=zero_offset)
    return w


@functools.cache
def gluon_available() -> bool:
    """Whether this Triton has Gluon with Hopper's wgmma (Triton ≥ 3.5)."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma
    except ImportError:
        return False
    return callable(warpgroup_mma)


@functools.cache
def runs_fragments(device: torch.device) -> bool:
    """Whether `device` runs kernels.fragments_matmul: a Hopper GPU (wgmma) and a Triton with Gluon."""
    if device.type != "cuda" or not gluon_available():
        return False
    return torch.cuda.get_device_capability(device)[0] == 9
