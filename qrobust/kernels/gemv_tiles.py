"""What one GEMV tile computes: each chunk of 32 inputs' Σ ŵ·x from its packed words.

_load_tile reads a tile's words, scales and zero points; _tile_sums sums it, in float32 one code
at a time (_unit_float: a code becomes 1 + q·2⁻ᵇ in a shift and one LOP3) or, with half2, in
float16 two codes at a time (_half2_sums, after the plans of kernels.layouts). On a GPU the
sums use PTX (fma.rn.f16x2, prmt, lop3, vector loads); under Triton's interpreter, which runs no
PTX, the same in Triton's operations (ASM off), as the tests check them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from qrobust.kernels.layouts import _field, _load_u32, _pair_const, _part_const, _x_load, _zeros


@triton.jit
def _shifted(v, d: tl.constexpr):
    """v << d, or v >> −d for negative d."""
    if d >= 0:
        out = v << d
    else:
        out = v >> -d
    return out


@triton.jit
def _unit_float(v, one, BITS: tl.constexpr):
    """The code held in bits [23 − b, 23) of v as the float32 1 + q·2⁻ᵇ, given `one` = the bits of
    1.0: a mask and an OR, with no int→float conversion, and [1, 2) is where float32 products
    lose nothing to the offset. `one` comes as an argument because one instruction (LOP3) does
    both only where one of the two constants sits in a register."""
    return ((v & (((1 << BITS) - 1) << (23 - BITS))) | one).to(tl.float32, bitcast=True)


@triton.jit
def _chunk_sums(x_row, kc, BLOCK_N: tl.constexpr):
    """[KC, 1]: the sums of x over the 32 inputs from each kc, computed in a [KC, BLOCK_N] tile
    (BLOCK_N ≥ 32) so that they come out in the layout of the GEMV's accumulators: a [KC, 32]
    tile has a layout of its own, and converting costs shared-memory round trips."""
    tl.static_assert(BLOCK_N >= 32)
    i = tl.arange(0, BLOCK_N)[None, :]
    xs = tl.load(x_row + kc[:, None] + i, mask=i < 32, other=0.0).to(tl.float32)
    return tl.sum(xs, axis=1)[:, None]


@triton.jit
def _load_tile(qw_ptr, s_ptr, qz_ptr, kc, n, mask, N, BITS: tl.constexpr, OFFSET: tl.constexpr, GS: tl.constexpr,
               ACT_ORDER: tl.constexpr):
    """What a GEMV tile reads of the weight, for chunks of 32 inputs starting at kc (where mask
    [1, BLOCK_N] holds): its BITS rows of packed words (a tuple of [KC, BLOCK_N]) and, grouped in
    order, the chunks' scales and zero points plus 2ᵇ (act-order layers read theirs per code, in
    _tile_sums)."""
    row = (kc // 32) * BITS  # each chunk's first word
    words = ()
    for r in tl.static_range(BITS):
        words = words + (_load_u32(qw_ptr + (row + r)[:, None] * N + n[None, :], mask),)
    if ACT_ORDER:
        s, z = 0.0, 0.0
    else:
        g = (kc // GS)[:, None]
        s = tl.load(s_ptr + g * N + n[None, :], mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        z = _zeros(qz_ptr, g, n[None, :], mask, N, BITS, OFFSET) + (1 << BITS)
    return words, s, z


@triton.jit
def _half_of(word, HIGH: tl.constexpr, dtype: tl.constexpr):
    """The low (or HIGH) 16-bit value of type `dtype` in a uint32, as float32."""
    bits = (word >> 16) if HIGH else (word & 0xFFFF)
    return bits.to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)


@triton.jit
def _halves(v):
    """A uint32 holding two float16 values, as (low, high) float32."""
    return _half_of(v, False, tl.float16), _half_of(v, True, tl.float16)


@triton.jit
def _half_word(lo, hi):
    """Two float32 values rounded to float16, as one uint32 (low, high)."""
    lo_bits = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return lo_bits | (hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def _hfma2(a, b, c, ASM: tl.constexpr):
    """a·b + c on pairs of float16 held in uint32s (PTX fma.rn.f16x2); without ASM (Triton's
    interpreter, which runs no PTX) the same in float32 rounded to float16, as the tests check it."""
    if ASM:
        out = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.uint32,
                                        is_pure=True, pack=1)
    else:
        a_lo, a_hi = _halves(a)
        b_lo, b_hi = _halves(b)
        c_lo, c_hi = _halves(c)
        out = _half_word(a_lo * b_lo + c_lo, a_hi * b_hi + c_hi)
    return out


@triton.constexpr_function
def _vector_load_asm(n):
    """PTX reading n (2 or 4) uint32 words at once into $0 … $n−1 from the address $n, and its constraints."""
    return (f"ld.global.v{n}.u32 {{{', '.join(f'${i}' for i in range(n))}}}, [${n}];",
            ",".join(["=r"] * n + ["l"]))


@triton.jit
def _x_words(x_row, kc, first: tl.constexpr, count: tl.constexpr, ASM: tl.constexpr):
    """`count` (2, 4 or 8) uint32 words of a chunk's 16-bit inputs from word `first` on, word w
    holding inputs 2w and 2w + 1: [KC] each, read 8 or 16 bytes at a time (Triton vectorizes
    only loads of a tensor's contiguous elements, and a thread's inputs are one element each of
    several tensors). Not pure: the reads must stay after the PDL wait and the norm's barrier."""
    at = x_row.to(tl.pointer_type(tl.uint32), bitcast=True) + kc // 2 + first
    VEC: tl.constexpr = min(count, 4)
    asm: tl.constexpr = _vector_load_asm(VEC)
    out = ()
    for w in tl.static_range(0, count, VEC):
        if ASM:
            out = out + tl.inline_asm_elementwise(asm[0], asm[1], [at + w], dtype=(tl.uint32,) * VEC,
                                                  is_pure=False, pack=1)
        else:
            for i in tl.static_range(VEC):
                out = out + (tl.load(at + w + i),)
    return out


@triton.jit
def _x_pair(xw, j_lo: tl.constexpr, j_hi: tl.constexpr, ASM: tl.constexpr):
    """The float16 inputs j_lo and j_hi of a chunk as one uint32 (low, high), from its words
    (_x_words, the chunk's from its first on): inputs 2i and 2i + 1 are word i, others (of the same
    parity) take one byte permutation (PRMT)."""
    lo, hi = xw[j_lo // 2], xw[j_hi // 2]
    if j_lo % 2 == 0 and j_hi == j_lo + 1:
        out = lo
    elif ASM:
        select: tl.constexpr = "0x5410" if j_lo % 2 == 0 else "0x7632"
        out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, " + select + ";", "=r,r,r", [lo, hi],
                                        dtype=tl.uint32, is_pure=True, pack=1)
    elif j_lo % 2 == 0:
        out = (lo & 0xFFFF) | (hi << 16)
    else:
        out = (lo >> 16) | (hi & 0xFFFF0000)
    return out


@triton.constexpr_function
def _masked_pair_asm(shift, mask):
    """PTX for ((word >> shift) & mask) | one, word $1 and one $2: the mask and the OR in one lop3."""
    lop3 = f"lop3.b32 $0, {'t' if shift else '$1'}, {mask}, $2, 0xEA;"
    return f"{{ .reg .b32 t; shr.b32 t, $1, {shift}; {lop3} }}" if shift else lop3


@triton.jit
def _masked_pair(word, one, SHIFT: tl.constexpr, MASK: tl.constexpr, ASM: tl.constexpr):
    """((word >> SHIFT) & MASK) | one: a pair's codes with float16 1024's exponent in both halves
    (or, `one` a pair masked already, another part of its codes).
    On a GPU the mask and the OR are one PTX lop3 (with the shift, one asm statement), so that
    under PDL, where `one` is read after the wait, no compiler can mask the words ahead of it
    (LLVM splits a plain AND and OR and hoists the AND; see _after_wait)."""
    if ASM:
        out = tl.inline_asm_elementwise(_masked_pair_asm(SHIFT, MASK), "=r,r,r", [word, one], dtype=tl.uint32,
                                        is_pure=True, pack=1)
    else:
        out = ((word >> SHIFT) & MASK) | one
    return out


@triton.jit
def _half2_sums(words, x_row, kc, one, BITS: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_N: tl.constexpr,
                ASM: tl.constexpr):
    """[KC, BLOCK_N]: each chunk's Σ d·x, d = (q − 2ᵇ⁻¹)/2ᵇ⁻¹, two codes per instruction in float16
    (half2_pairs; x float16): masks and ORs with `one` (HALF2_ONE, float16 1024 twice; in a
    register for the reason _unit_float's is) make the float16 1024 + 2ᵗ·q of each, one fma
    makes d of both, another adds d·x to the chunk's pair of float16 sums. |d| ≤ 1, so no sum
    leaves x's range. Pair by pair, the inputs come as vectors (_x_words) as the codes need them,
    and pair up in at most one PRMT each (_x_pair)."""
    KC: tl.constexpr = kc.shape[0]
    acc = tl.zeros([KC, BLOCK_N], dtype=tl.uint32)
    xw = ()
    for k in tl.static_range(16):
        if _x_load(BITS, LAYOUT, k, "count") > 0:
            xw = xw + _x_words(x_row, kc, _x_load(BITS, LAYOUT, k, "first"), _x_load(BITS, LAYOUT, k, "count"), ASM)
        v = one
        for p in tl.static_range(_pair_const(BITS, LAYOUT, k, "parts")):
            v = _masked_pair(words[_part_const(BITS, LAYOUT, k, p, "word")], v,
                             _part_const(BITS, LAYOUT, k, p, "shift"), _part_const(BITS, LAYOUT, k, p, "mask"), ASM)
        scale = tl.full([1, 1], _pair_const(BITS, LAYOUT, k, "scale"), tl.int32).to(tl.uint32, bitcast=True)
        offset = tl.full([1, 1], _pair_const(BITS, LAYOUT, k, "offset"), tl.int32).to(tl.uint32, bitcast=True)
        d = _hfma2(v, scale, offset, ASM)
        x = _x_pair(xw, _pair_const(BITS, LAYOUT, k, "j_lo"), _pair_const(BITS, LAYOUT, k, "j_hi"), ASM)
        acc = _hfma2(d, x[:, None], acc, ASM)
    lo, hi = _halves(acc)
    return lo + hi


@triton.jit
def _field_at(words, BITS: tl.constexpr, LAYOUT: tl.constexpr, J: tl.constexpr, F: tl.constexpr,
              TOP: tl.constexpr):
    """Field F of code J (_field) moved to the code's bits at TOP (_unit_float then masks out the
    rest of its word)."""
    FIRST: tl.constexpr = _field(BITS, LAYOUT, J, F, "first")
    field = words[_field(BITS, LAYOUT, J, F, "word")]
    if _field(BITS, LAYOUT, J, F, "premask"):
        field = field & (((1 << _field(BITS, LAYOUT, J, F, "width")) - 1) << FIRST)
    return _shifted(field, TOP + _field(BITS, LAYOUT, J, F, "low") - FIRST)


@triton.jit
def _tile_sums(words, s, z, x_row, s_ptr, qz_ptr, g_ptr, kc, n, nmask, N, one, BITS: tl.constexpr,
               LAYOUT: tl.constexpr, OFFSET: tl.constexpr, ACT_ORDER: tl.constexpr, BLOCK_N: tl.constexpr,
               HALF2: tl.constexpr, ASM: tl.constexpr):
    """[KC, BLOCK_N]: each chunk's Σ ŵ·x for the tile _load_tile read, x_row the row's inputs."""
    KC: tl.constexpr = kc.shape[0]
    TOP: tl.constexpr = 23 - BITS  # where _unit_float reads a code
    SCALE: tl.constexpr = 1 << BITS  # q = SCALE·u − SCALE for u = 1 + q·2⁻ᵇ
    if HALF2 and not ACT_ORDER:
        # Σ (q − z)·x = HALF·Σ d·x − (z − HALF)·Σ x, for d = (q − HALF)/HALF; z came with SCALE added
        HALF: tl.constexpr = 1 << (BITS - 1)
        part = _half2_sums(words, x_row, kc, one, BITS, LAYOUT, BLOCK_N, ASM)
        return s * (part * HALF - (z - SCALE - HALF) * _chunk_sums(x_row, kc, BLOCK_N))
    part = tl.zeros([KC, BLOCK_N], dtype=tl.float32)
    X16: tl.constexpr = x_row.dtype.element_ty.primitive_bitwidth == 16
    if X16:  # the chunk's inputs as 16-byte vectors, not one 16-bit load each
        xw = _x_words(x_row, kc, 0, 16, ASM)
    for j in tl.static_range(32):
        v = _field_at(words, BITS, LAYOUT, j, 0, TOP)
        for f in tl.static_range(1, _field(BITS, LAYOUT, j, 0, "count")):
            v = v | _field_at(words, BITS, LAYOUT, j, f, TOP)
        u = _unit_float(v, one, BITS)
        if X16:
            xj = _half_of(xw[j // 2], j % 2, x_row.dtype.element_ty)[:, None]
        else:
            xj = tl.load(x_row + kc + j).to(tl.float32)[:, None]
        if ACT_ORDER:
            gj = tl.load(g_ptr + kc + j)[:, None]
            sj = tl.load(s_ptr + gj * N + n[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
            zj = _zeros(qz_ptr, gj, n[None, :], nmask[None, :], N, BITS, OFFSET) + SCALE
            part += sj * (u * SCALE - zj) * xj
        else:
            part += u * xj
    if not ACT_ORDER:
        # Σ (q − z)·x over a chunk = SCALE·Σ u·x − (SCALE + z)·Σ x, with the chunk's scale s and
        # zero z (plus SCALE, from _load_tile)
        part = s * (part * SCALE - z * _chunk_sums(x_row, kc, BLOCK_N))
    return part


ONE_BITS = 0x3F800000  # float32 1.0 (_unit_float)


HALF2_ONE = 0x64006400  # float16 1024.0 twice (_half2_sums)
