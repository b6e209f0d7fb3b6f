"""Where GPTQ-packed codes sit: the Triton functions that read them, and the compile-time plans
the kernels unroll.

qweight [K·b/32, N] int32 packs input features along its rows, in chunks of 32 inputs (b words),
laid out as GPTQ checkpoints are ("gptq": for 2, 4 and 8 bits each word holds 32/b consecutive
inputs; for 3 bits 32 inputs fill three words, two of them straddling a word boundary) or, for 3
bits, as the half2 sums read best ("pairs"; qrobust.quant.pack has both). Weights dequantize as
ŵ = s·(q − z), with the scale s and the zero point z of the input's group and the output; zero
points are read from the packed qzeros, always in the GPTQ layout.

Here: reading codes and zero points (_load_u32, _unpack_at, _zeros; tiles of codes, _unpack_tile
and _codes_of_words; weights, _weight_tile, and in half-precision pairs _pair_weight_tile where
pairs_apply); each code's fields in a chunk of 32 (_FIELDS,
_field); the half2 plans (half2_pairs, half2_applies) and the constants the half2 sums take from
them (_pair_const, _part_const, _x_load), evaluated while Triton compiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qrobust.quant.pack import LAYOUTS, chunk_fields, layout_applies


def _fields_of_32(bits: int, layout: str) -> tuple:
    """chunk_fields for the kernels' chunks of 32 codes (b words), which hold 32/n packing chunks of n codes."""
    fields = chunk_fields(bits, layout)
    words = len(fields) * bits // 32
    return tuple(tuple((c * words + word, first, width, low) for word, first, width, low in code)
                 for c in range(32 // len(fields)) for code in fields)


# Every layout's fields by (bits, layout), for the compile-time functions below: they may read a
# module's constants but not call its functions.
_FIELDS = {(bits, layout): _fields_of_32(bits, layout) for bits in range(1, 9) for layout in LAYOUTS
           if layout_applies(bits, layout)}


@triton.jit
def _load_u32(ptrs, mask):
    """Packed int32 words (codes, zero points) as uint32, so that right shifts bring in zeros.
    A product reads each word once: marked first to leave L2 (evict_first), the stream of
    weights does not push out what is read again soon (activations, partial sums, the KV
    cache); batch-1 decoding at 4 bits on an H100 got 1% faster."""
    return tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)


@triton.jit
def _unpack_at(row_ptr, idx, mask, BITS: tl.constexpr):
    """Codes number idx of a bit stream of b-bit values packed in int32 words (any b ≤ 8)."""
    bit = idx * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    v = _load_u32(row_ptr + word, mask) >> shift
    if 32 % BITS != 0:
        straddle = shift > 32 - BITS
        hi = _load_u32(row_ptr + word + 1, mask & straddle) << tl.where(straddle, 32 - shift, 0)
        v = v | tl.where(straddle, hi, 0)
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _zeros(qz_ptr, g, n, mask, N, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """Zero points of groups g and outputs n from qzeros [groups, N·b/32] (stored − OFFSET)."""
    return ((_unpack_at(qz_ptr + g * (N * BITS // 32), n, mask, BITS) + OFFSET) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _words(qw_ptr, k0, n, nmask, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed int32 words [BLOCK_K·b/32, BLOCK_N] of inputs k0 … k0 + BLOCK_K − 1 and outputs n,
    for widths whose words hold whole codes (2, 4, 8 bits; nmask [1, BLOCK_N])."""
    VPW: tl.constexpr = 32 // BITS
    row = k0 // VPW + tl.arange(0, BLOCK_K // VPW)
    return tl.load(qw_ptr + row[:, None] * N + n[None, :], mask=nmask, other=0)


@triton.jit
def _group_scales_zeros(s_ptr, qz_ptr, g, n, nmask, N, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """Scales (float32) and zero points (float32) of groups g and outputs n (both [·, BLOCK_N])."""
    s = tl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
    return s, _zeros(qz_ptr, g, n, nmask, N, BITS, OFFSET)


@triton.jit
def _unpack_tile(qw_ptr, k0, n, N, BITS: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, IN_THREAD: tl.constexpr = False):
    """Codes [BLOCK_K, BLOCK_N] of inputs k0… and outputs n (k0 a multiple of 32). IN_THREAD (2, 4
    and 8 bits): each thread keeps the codes of the words it loads (_codes_of_words)."""
    maxq = (1 << BITS) - 1
    nmask = (n < N)[None, :]
    if BITS == 3:  # 32 inputs per 3 words
        KC: tl.constexpr = BLOCK_K // 32
        row = (k0 // 32) * 3 + tl.arange(0, KC) * 3
        w0 = _load_u32(qw_ptr + (row + 0)[:, None] * N + n[None, :], nmask)[:, None, :]
        w1 = _load_u32(qw_ptr + (row + 1)[:, None] * N + n[None, :], nmask)[:, None, :]
        w2 = _load_u32(qw_ptr + (row + 2)[:, None] * N + n[None, :], nmask)[:, None, :]
        if LAYOUT == "pairs":
            # value j < 30 at bit 16·(j mod 2) + 3·⌊(j mod 10)/2⌋ of word ⌊j/10⌋; values 30 and 31 bit by
            # bit from bit 15 (or 31) of each word (qrobust.quant.pack)
            j = tl.arange(0, 32)[None, :, None]
            word = j // 10
            shift = (16 * (j % 2) + 3 * ((j % 10) // 2)).to(tl.uint32)
            regular = (tl.where(word == 0, w0, tl.where(word == 1, w1, w2)) >> shift) & maxq
            top = (15 + 16 * (j % 2)).to(tl.uint32)
            spread = ((w0 >> top) & 1) | (((w1 >> top) & 1) << 1) | (((w2 >> top) & 1) << 2)
            q = tl.where(j < 30, regular, spread).to(tl.int32)
        else:  # value j starts at bit 3j, values 10 and 21 straddle two words
            bit = tl.arange(0, 32) * 3
            word = (bit // 32)[None, :, None]
            shift = (bit % 32).to(tl.uint32)[None, :, None]
            cur = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
            nxt = tl.where(word == 0, w1, w2)
            straddle = shift > 29
            hi = tl.where(straddle, nxt << tl.where(straddle, 32 - shift, 0), 0)
            q = (((cur >> shift) | hi) & maxq).to(tl.int32)
    else:
        VPW: tl.constexpr = 32 // BITS
        words = _words(qw_ptr, k0, n, nmask, N, BITS, BLOCK_K)
        if IN_THREAD:
            q = _codes_of_words(words, BITS)
        else:
            shifts = (tl.arange(0, VPW) * BITS)[None, :, None]
            q = (words[:, None, :] >> shifts) & maxq
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def _code(words, j: tl.constexpr, BITS: tl.constexpr):
    return (words >> (j * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _code_pairs(words, j: tl.constexpr, BITS: tl.constexpr):
    """Codes j and j + 1 of each word along a new last dimension."""
    return tl.join(_code(words, j, BITS), _code(words, j + 1, BITS))


@triton.jit
def _code_quads(words, j: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_code_pairs(words, j, BITS), _code_pairs(words, j + 2, BITS))


@triton.jit
def _code_octets(words, j: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_code_quads(words, j, BITS), _code_quads(words, j + 4, BITS))


@triton.jit
def _codes_of_words(words, BITS: tl.constexpr):
    """[KW, BN] words of 32/b codes each (2, 4 or 8 bits) → codes [KW, 32/b, BN], code j of word r
    for input 32/b·r + j. Built by joins, whose new dimension stays in the thread that holds the
    word: each thread then owns runs of consecutive inputs, and for Hopper's wgmma the tile
    reaches shared memory in 128-bit stores, where a broadcast against a vector of shifts spreads
    a word's codes across threads (one 16-bit store per weight; kernel_asm.py --matmul). For
    mma.sync (tiles of fewer than 64 rows) the broadcast is faster. The joins' dimensions come out
    as the code index's bits, lowest first; the permutation puts them after the word index,
    highest first."""
    if BITS == 8:
        c = _code_quads(words, 0, BITS)
        return tl.permute(c, (0, 3, 2, 1))
    elif BITS == 4:
        c = _code_octets(words, 0, BITS)
        return tl.permute(c, (0, 4, 3, 2, 1))
    else:
        c = tl.join(_code_octets(words, 0, BITS), _code_octets(words, 8, BITS))
        return tl.permute(c, (0, 5, 4, 3, 2, 1))


@triton.jit
def _weight_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, k0, n, nmask, N, BITS: tl.constexpr, LAYOUT: tl.constexpr,
                 OFFSET: tl.constexpr, GS: tl.constexpr, ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, IN_THREAD: tl.constexpr = False):
    """Ŵᵀ[k0 : k0 + BLOCK_K, n] in float32: the codes (IN_THREAD: _unpack_tile's), their group's
    scale and zero point (nmask [1, BLOCK_N] masks outputs past N). The dequantize kernel stores
    it; the fused matmuls feed it to tl.dot."""
    # codes as the floats 2²³ + q (q in the mantissa of 2²³: no int→float conversion, a quarter
    # of the arithmetic rate), less 2²³ + z: q − z in one exact subtraction per weight
    q = (_unpack_tile(qw_ptr, k0, n, N, BITS, LAYOUT, BLOCK_K, BLOCK_N, IN_THREAD) | 0x4B000000).to(
        tl.float32, bitcast=True)
    if ACT_ORDER:
        g = tl.load(g_ptr + k0 + tl.arange(0, BLOCK_K))[:, None]
    else:
        g = k0 // GS
    s, z = _group_scales_zeros(s_ptr, qz_ptr, g, n[None, :], nmask, N, BITS, OFFSET)
    return s * (q - (z + 8388608.0))


@triton.constexpr_function
def pair_magic(bf16: bool) -> int:
    """The two halves' exponent bits under which a code in the mantissa reads as 128 + q (bf16) or 1024 + q (fp16)."""
    return 0x43004300 if bf16 else 0x64006400


@triton.constexpr_function
def pair_arithmetic(bf16: bool, zn: str, s_hi: str, s_lo: str) -> str:
    """PTX taking the pair of codes under pair_magic in register q to $0, (q − z)·s: operands zn
    the negated offset zero points, s_hi and s_lo the scale's two parts (each a pair of halves);
    uses registers d, lo, one, nz."""
    if bf16:  # d = q' + z'' by FMA with 1; d·s_lo is exact; one rounding in d·s_hi + d·s_lo
        return ("mov.b32 one, 0x3F803F80; mov.b32 nz, 0x80008000;"
                f"fma.rn.bf16x2 d, q, one, {zn}; fma.rn.bf16x2 lo, d, {s_lo}, nz; fma.rn.bf16x2 $0, d, {s_hi}, lo;")
    return f"add.rn.f16x2 d, q, {zn}; mul.rn.f16x2 $0, d, {s_hi};"


@triton.constexpr_function
def _pair_asm(shift, bits, bf16):
    """PTX for one call of _pair_weights (pack=2: $0 the two weights, $1 and $2 the word, $3 the
    negated offset zero points, $4 and $5 the scale's two parts, each a pair of halves)."""
    mask = ((1 << bits) - 1) * 0x10001
    shifted = f"shr.b32 q, $1, {shift};" if shift else "mov.b32 q, $1;"
    return ("{ .reg .b32 q, d, lo, one, nz; " + shifted + f" lop3.b32 q, q, {mask}, {pair_magic(bf16)}, 0xEA; "
            + pair_arithmetic(bf16, "$3", "$4", "$5") + " }")


@triton.jit
def _pair_weights(words, z2, s_hi2, s_lo2, J: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr):
    """Weights of codes J and J + 16/b of each word ([KW, BN] → [KW, BN, 2]), two per 32-bit
    register: (word >> b·J) & mask holds them at bits 0 and 16, under the exponent of 128 (bf16)
    or 1024 (fp16) each is a half whose mantissa is the code."""
    w2 = tl.join(words, words)
    return tl.inline_asm_elementwise(_pair_asm(J * BITS, BITS, BF16), "=r,r,r,r,r,r", [w2, z2, s_hi2, s_lo2],
                                     dtype=tl.bfloat16 if BF16 else tl.float16, is_pure=True, pack=2)


@triton.jit
def _pair_weight_tile(qw_ptr, s_ptr, qz_ptr, k0, n, nmask, N, BITS: tl.constexpr, OFFSET: tl.constexpr,
                      GS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """_weight_tile in DTYPE (bf16 or fp16) for 2- and 4-bit GPTQ words, inputs in group order,
    in half-precision pairs: per two weights a shift, one logic operation and two (fp16) or three
    (bf16) packed operations, where the float32 form takes about five per weight. Each thread
    keeps its words' codes, as _codes_of_words. Codes sit in the mantissa of 128 (bf16, exact
    up to 7 bits) or 1024 (fp16); q' − z' is exact; fp16 multiplies by the scale, rounding once.
    bf16 splits the float16 scale s into s_hi = bf16(s) and s_lo = s − s_hi (at most 3
    significant bits, so d·s_lo is exact for |d| < 32) and takes d·s_hi + d·s_lo in one FMA:
    bf16((q − z)·s), rounded once, as the float32 form gives. Inline PTX: CUDA only."""
    BF16: tl.constexpr = DTYPE == tl.bfloat16
    words = _words(qw_ptr, k0, n, nmask, N, BITS, BLOCK_K)
    s, z = _group_scales_zeros(s_ptr, qz_ptr, k0 // GS, n[None, :], nmask, N, BITS, OFFSET)
    if BF16:
        s_hi = s.to(tl.bfloat16)
        s_lo = (s - s_hi.to(tl.float32)).to(tl.bfloat16)
        zn = (-128.0 - z).to(tl.bfloat16)
    else:
        s_hi = s.to(tl.float16)
        s_lo = s_hi
        zn = (-1024.0 - z).to(tl.float16)
    z2, s_hi2, s_lo2 = tl.join(zn, zn), tl.join(s_hi, s_hi), tl.join(s_lo, s_lo)
    if BITS == 4:
        # [KW, BN, 2 (code +4), 2 (+1), 2 (+2)] → inputs 8r + 4·h + 2·b + a
        c = tl.join(tl.join(_pair_weights(words, z2, s_hi2, s_lo2, 0, BITS, BF16),
                            _pair_weights(words, z2, s_hi2, s_lo2, 1, BITS, BF16)),
                    tl.join(_pair_weights(words, z2, s_hi2, s_lo2, 2, BITS, BF16),
                            _pair_weights(words, z2, s_hi2, s_lo2, 3, BITS, BF16)))
        c = tl.permute(c, (0, 2, 4, 3, 1))
    else:
        # [KW, BN, 2 (code +8), 2 (+1), 2 (+2), 2 (+4)]
        lo = tl.join(tl.join(_pair_weights(words, z2, s_hi2, s_lo2, 0, BITS, BF16),
                             _pair_weights(words, z2, s_hi2, s_lo2, 1, BITS, BF16)),
                     tl.join(_pair_weights(words, z2, s_hi2, s_lo2, 2, BITS, BF16),
                             _pair_weights(words, z2, s_hi2, s_lo2, 3, BITS, BF16)))
        hi = tl.join(tl.join(_pair_weights(words, z2, s_hi2, s_lo2, 4, BITS, BF16),
                             _pair_weights(words, z2, s_hi2, s_lo2, 5, BITS, BF16)),
                     tl.join(_pair_weights(words, z2, s_hi2, s_lo2, 6, BITS, BF16),
                             _pair_weights(words, z2, s_hi2, s_lo2, 7, BITS, BF16)))
        c = tl.permute(tl.join(lo, hi), (0, 2, 5, 4, 3, 1))
    return tl.reshape(c, (BLOCK_K, BLOCK_N))


def pairs_apply(bits: int, layout: str, act_order: bool, dtype: torch.dtype) -> bool:
    """Whether _pair_weight_tile can dequantize a layer's tiles: 2 or 4 bits in the GPTQ layout,
    inputs in group order, bf16 or fp16 activations."""
    return bits in (2, 4) and layout == "gptq" and not act_order and dtype in (torch.bfloat16, torch.float16)


# The pairs layout's codes at bits 9 and 12 of a half word are read shifted down by 9 − r in word r
# (r = 0, 1, 2), where float16 1024's mantissa holds them (t + b ≤ 10): codes 30 and 31, whose bit
# r sits at bit 15 of word r, then come out of those same shifted words at bits 6, 7 and 8.
PAIRS_HIGH_SHIFT = 9


@triton.constexpr_function
def half2_pairs(bits: int, layout: str = "gptq"):
    """How the half2 sums (_half2_sums) read a chunk of 32 b-bit codes (b words): 16 pairs
    (j_lo, j_hi, t, parts), codes j_lo and j_hi at bits t and 16 + t (t + b ≤ 10) of the OR of
    `parts` (r, s, mask): word r shifted right by s under mask (both halves). With 1024's
    exponent ORed in, each code sits in the mantissa of one float16 half. In the GPTQ layout, for
    2, 4 and 8 bits: one part, s ∈ {0, 8}, j_hi = j_lo + 16/b. In the pairs layout, for 3 bits:
    j_hi = j_lo + 1 (inputs that share one word of x), one part, but three for codes 30 and 31,
    a bit from each word. None otherwise: in the GPTQ layout 3-bit codes straddle words, and a
    plan of funnel-shifted windows took 104 registers (64 for the float32 sums) and decoded
    slower than the float32 sums on an H100 (README: GPU performance)."""
    if layout == "gptq" and bits in (2, 4, 8):
        return tuple(((32 * r + s) // bits + i, (32 * r + s + 16) // bits + i, bits * i,
                      ((r, s, ((1 << bits) - 1) << (bits * i)),))
                     for r in range(bits) for s in (0, 8) for i in range(8 // bits))
    if layout != "pairs" or bits != 3:
        return None
    fields = _FIELDS[(bits, layout)]
    plan = ()
    for k in range(16):
        lo = fields[2 * k]  # code 2k + 1's fields are these, 16 bits up
        r, first = lo[0][:2]
        t = first if len(lo) == 1 and first + bits <= 10 else first - (PAIRS_HIGH_SHIFT - r)
        parts = tuple((r, first - t - low, ((1 << width) - 1) << (t + low)) for r, first, width, low in lo)
        plan = plan + ((2 * k, 2 * k + 1, t, parts),)
    return plan


def half2_applies(bits: int, act_order: bool, dtype: torch.dtype, layout: str = "gptq") -> bool:
    """Whether gptq_gemv's half2 sums can serve a layer: float16 inputs, inputs in group order, a
    width and layout half2_pairs has a plan for."""
    return dtype == torch.float16 and not act_order and half2_pairs(bits, layout) is not None


@triton.constexpr_function
def _half_bits(value: float) -> int:
    """The float16 bits of a normal value it holds exactly (written out: Triton's dependency scan
    of compile-time functions refuses library calls)."""
    sign, a, e = (1 << 15 if value < 0 else 0), (-value if value < 0 else value), 15
    while a >= 2:
        a, e = a / 2, e + 1
    while a < 1:
        a, e = a * 2, e - 1
    return sign | e << 10 | int((a - 1) * 1024)


@triton.constexpr_function
def _signed(word):
    """A 32-bit pattern as the int32 that holds it."""
    return word - (1 << 32) if word >= 1 << 31 else word


@triton.constexpr_function
def _pair_const(bits, layout, k, what):
    """Pair k's (half2_pairs) codes j_lo and j_hi, its number of parts, and both halves of the
    float16 scale and offset that turn 1024 + 2ᵗ·q into d = (q − 2ᵇ⁻¹)/2ᵇ⁻¹, exactly (as int32)."""
    j_lo, j_hi, t, parts = half2_pairs(bits, layout)[k]
    fields = {"j_lo": j_lo, "j_hi": j_hi, "parts": len(parts),
              "scale": _half_bits(2.0 ** (-t - bits + 1)) * 0x10001,
              "offset": _half_bits(-(2.0 ** (11 - t - bits)) - 1) * 0x10001}
    return _signed(fields[what])


@triton.constexpr_function
def _part_const(bits, layout, k, p, what):
    """Part p of pair k (half2_pairs): its word, shift and mask (in both halves, as int32)."""
    r, s, mask = half2_pairs(bits, layout)[k][3][p]
    return _signed({"word": r, "shift": s, "mask": mask * 0x10001}[what])


@triton.constexpr_function
def _x_load(bits, layout, k, what):
    """The words of x (_x_words) to read before pair k: "first" and "count", 0 where those read
    already cover its inputs; a word's inputs at a time in the GPTQ layout, 16 bytes in the pairs
    layout (its words' inputs are not whole vectors)."""
    pairs = half2_pairs(bits, layout)
    loaded, first, count = 0, 0, 0
    for i in range(k + 1):
        j_lo, j_hi = pairs[i][:2]
        first, count = loaded, 0
        if max(j_lo, j_hi) // 2 >= loaded:
            count = 16 // bits if layout == "gptq" else 4
        loaded = loaded + count
    return {"first": first, "count": count}[what]


@triton.constexpr_function
def _field(bits, layout, j, f, what):
    """Code j's field f (qrobust.quant.pack.chunk_fields): "count" (its fields), "word", "first",
    "width", "low", and "premask": whether the float32 sums must mask it before moving it into
    place, where other bits of its word would land among the code's (_tile_sums)."""
    fields = _FIELDS[(bits, layout)][j]
    if what == "count":
        return len(fields)
    word, first, width, low = fields[f]
    above_clear = first + width == 32 or low + width == bits  # bits above it leave the word or the code
    below_clear = first == 0 or low == 0  # none below it, or they land below the code
    return {"word": word, "first": first, "width": width, "low": low,
            "premask": not (above_clear and below_clear)}[what]


def _check_layout(bits: int, layout: str) -> None:
    if not layout_applies(bits, layout):
        raise ValueError(f"packed kernels: no {layout!r} layout for {bits}-bit codes (qrobust.quant.pack)")
