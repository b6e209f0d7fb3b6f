"""The fragments layout of 2-, 3-, 4- and 8-bit weights: the 32-bit words one thread of a Hopper
warpgroup feeds to wgmma as its A operand.

The product yᵀ = Ŵ xᵀ makes the weights wgmma's register operand (kernels.fragments_matmul), as
CUTLASS's Machete does. Thread lane = 4g + c of warp w holds, per 16-input step t, outputs
16w + g and 16w + g + 8 and inputs 16t + 2c, 2c + 1, 2c + 8, 2c + 9 of a tile of 64 outputs: four
pairs of adjacent inputs, pair J = output 16w + 8(J & 1) + g, inputs 16t + 8(J >> 1) + 2c + h
(h = 0, 1). Here a thread's words keep exactly those, in order: its pair e = 4t + J of a tile
sits in word e div R at bits b·(e mod R) + 16h, with R = 16/b pairs per b-bit word (8 at 2 bits:
two steps a word; 4 at 4 bits: one; 2 at 8 bits: two words a step). So one shift and one LOP3
put a pair under a half-precision exponent as the register wgmma reads (8 bits in bf16: one PRMT
per code, in float32). The 2b words of a thread's 128 inputs are contiguous, 8b words per row
8w + g, [32 (8w + g), 4 (c), 2b], and tiles follow each other output tile by output tile:
[N/64, K/128, 32, 4, 2b]. A 3-bit tile is two such planes in a row (planes): the codes' low two
bits at b = 2, then their high bits at b = 1. It is a permutation of GPTQ's qweight [K·b/32, N]
and is stored in the same buffer (QuantLinear.layout "fragments"; checkpoints keep GPTQ's).

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

BITS = (2, 3, 4, 8)  # the widths the layout holds
TILE_N = 64  # outputs per tile: one warpgroup's wgmma rows
TILE_K = 128  # inputs per tile: one group


def fragments_apply(bits: int, group_size: int, in_group_order: bool, N: int, K: int) -> bool:
    """Whether a layer can take the fragments layout: 2, 3, 4 or 8 bits, groups of 128 in input order, whole tiles."""
    return bits in BITS and group_size == TILE_K and in_group_order and N % TILE_N == 0 and K % TILE_K == 0


@triton.constexpr_function  # also read by the kernels, through first_plane_width
def planes(bits: int) -> tuple[tuple[int, int], ...]:
    """(width, lowest code bit) of each plane a tile's words hold, in order: the codes themselves,
    but for 3 bits, which no word holds a whole number of pairs of, their low two bits and then
    their high bit (the kernel ORs it in: one shift and one LOP3 more per pair)."""
    if bits not in BITS:
        raise ValueError(f"the fragments layout holds {BITS} bits, not {bits}")
    return ((2, 0), (1, 2)) if bits == 3 else ((bits, 0),)


@triton.constexpr_function
def first_plane_width(bits: int) -> int:
    """The width of a tile's first plane (planes); a second, if any, holds the other bits - width
    of each code and starts 256·width words into the tile."""
    return planes(bits)[0][0]


def _index(N: int, K: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, input, bit) of each code of a plane `width` bits wide,
    [N/64, K/128, 4 (w), 8 (g), 4 (c), 2b (word), R (e mod R), 2 (h)], R = 16/b."""
    R = 16 // width
    shape = (N // TILE_N, K // TILE_K, 4, 8, 4, 32 // R, R, 2)

    def along(dim: int) -> torch.Tensor:
        return torch.arange(shape[dim], device=device).view((1,) * dim + (-1,) + (1,) * (len(shape) - 1 - dim))

    tile, step, w, g, c, word, r, h = (along(d) for d in range(len(shape)))
    e = R * word + r  # the thread's pair: step e // 4, J = e % 4
    t, j = e // 4, e % 4
    n = TILE_N * tile + 16 * w + 8 * (j & 1) + g
    k = TILE_K * step + 16 * t + 8 * (j >> 1) + 2 * c + h
    bit = width * r + 16 * h
    return n.expand(shape), k.expand(shape), bit.expand(shape)


def to_fragments(qweight: torch.Tensor, K: int, bits: int) -> torch.Tensor:
    """GPTQ's `bits`-bit qweight [K·bits/32, N] → the fragments layout, in a tensor of the same shape."""
    N, layout = qweight.shape[1], planes(bits)
    codes = unpack_qweight(qweight, bits, K).to(torch.int64)  # [N, K]
    tiles = []
    for width, low in layout:
        n, k, bit = _index(N, K, width, qweight.device)
        plane = (codes >> low) & ((1 << width) - 1)
        tiles.append((plane[n, k] << bit).sum(dim=(-2, -1)).reshape(N // TILE_N, K // TILE_K, -1))
    words = torch.cat(tiles, dim=-1).reshape(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.view(qweight.shape)


def from_fragments(words: torch.Tensor, K: int, bits: int) -> torch.Tensor:
    """The fragments layout → GPTQ's qweight [K·bits/32, N] (to_fragments' inverse)."""
    N = words.shape[1]
    tiles = words.reshape(N // TILE_N, K // TILE_K, -1).to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(N, K, dtype=torch.int64, device=words.device)
    first = 0
    for width, low in planes(bits):
        n, k, bit = _index(N, K, width, words.device)
        w = tiles[..., first:first + 256 * width].reshape(*n.shape[:6], 1, 1)
        codes[n, k] |= ((w >> bit) & ((1 << width) - 1)) << low
        first += 256 * width
    return pack_qweight(codes.to(torch.int32), bits)


@triton.jit
def _plane_codes(tile_ptr, WIDTH: tl.constexpr):
    """The codes [128 inputs, 64 outputs] of a tile's plane WIDTH bits wide (its 256·WIDTH words
    from tile_ptr), each word read once. Word (32 (ow og), 4 ic, 2·WIDTH ·) holds pairs e of its
    thread, e = 4 it + 2 ib + ob, at bits WIDTH·(e mod 16/WIDTH) + 16 ih: output 16 ow + 8 ob + og,
    input 16 it + 8 ib + 2 ic + ih. So the words' codes in the order read reshape to
    [ow, og, ic, it, ib, ob, ih], which permutes to the tile's [inputs, outputs]."""
    R: tl.constexpr = 16 // WIDTH
    words = tl.load(tile_ptr + tl.arange(0, 256 * WIDTH)).to(tl.uint32, bitcast=True)
    shift = (WIDTH * tl.arange(0, R)[:, None] + 16 * tl.arange(0, 2)[None, :]).to(tl.uint32)
    codes = (tl.reshape(words, (128, 2 * WIDTH, 1, 1)) >> shift[None, None, :, :]) & ((1 << WIDTH) - 1)
    codes = tl.permute(tl.reshape(codes, (4, 8, 4, 8, 2, 2, 2)), (3, 4, 2, 6, 0, 5, 1))
    return tl.reshape(codes, (128, 64))


@triton.jit
def _dequant_fragments_kernel(qw_ptr, s_ptr, qz_ptr, w_ptr, N, K, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """Ŵᵀ of one tile (64 outputs × 128 inputs) from its 256·BITS words."""
    tile, step = tl.program_id(0), tl.program_id(1)
    o = tl.arange(0, 64)[None, :]  # output in the tile
    i = tl.arange(0, 128)[:, None]  # input in the tile
    tile_ptr = qw_ptr + (tile * (K // 128) + step) * (256 * BITS)
    WIDTH: tl.constexpr = first_plane_width(BITS)
    q = _plane_codes(tile_ptr, WIDTH)
    if WIDTH < BITS:  # the high bits' plane (planes)
        q = q | (_plane_codes(tile_ptr + 256 * WIDTH, BITS - WIDTH) << WIDTH)
    n = tile * 64 + o
    s, z = _group_scales_zeros(s_ptr, qz_ptr, step, n, n < N, N, BITS, OFFSET)
    k = step * 128 + i
    tl.store(w_ptr + k * N + n, (s * (q.to(tl.float32) - z)).to(w_ptr.dtype.element_ty))


def dequantize_fragments(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, zero_offset: int, K: int,
                         dtype: torch.dtype, bits: int) -> torch.Tensor:
    """Ŵᵀ [K, N] in `dtype` from a qweight in the fragments layout (as kernels.dequant's for GPTQ's)."""
    planes(bits)  # a width the layout holds
    N = qweight.shape[1]
    w = torch.empty(K, N, device=qweight.device, dtype=dtype)
    _dequant_fragments_kernel[(N // TILE_N, K // TILE_K)](qweight, scales, qzeros, w, N, K, BITS=bits,
                                                           OFFSET=zero_offset)
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
