"""Matrix products that read GPTQ-packed weights as they are stored: no unpacked copy.

qweight [K·b/32, N] int32 packs input features along its rows, in chunks of 32 inputs (b words),
laid out as GPTQ checkpoints are ("gptq": for 2, 4 and 8 bits each word holds 32/b consecutive
inputs; for 3 bits 32 inputs fill three words, two of them straddling a word boundary) or, for 3
bits, as the half2 sums read best ("pairs"; qrobust.quant.pack has both). Weights dequantize as
ŵ = s·(q − z), with the scale s and the zero point z of the input's group and the output; zero
points are read from the packed qzeros, always in the GPTQ layout.

- gptq_gemv: y = x Ŵᵀ for a few rows of x (batch-1 decoding), memory bound: each program reads
  its outputs' packed words once and dequantizes in registers. gptq_gemv_add_norm adds a
  residual and applies an RMSNorm to x first, in the same kernel. With half2 (float16 x; 2, 4
  and 8 bits, and 3 bits in the pairs layout) it sums two codes per instruction in float16
  (_half2_sums), else one in float32.
- gptq_dequantize: Ŵᵀ [K, N] in the activation dtype, for larger batches (prefill, diffusion
  steps), which then run on the dense matmul.
- gptq_matmul: the same product with the dequantization fused into a tensor-core matmul (to be
  measured against dequantize-then-matmul before it replaces it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qrobust.kernels import interpreting
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
def _exact_float(q):
    """Codes (32-bit integers, 0 ≤ q < 2²³) as float32: the float 2²³ + q, whose mantissa holds
    q, less 2²³; no int→float conversion (a quarter of the arithmetic rate on recent GPUs)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _unpack_tile(qw_ptr, k0, n, N, BITS: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] of inputs k0… and outputs n (k0 a multiple of 32)."""
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
        KW: tl.constexpr = BLOCK_K // VPW
        row = k0 // VPW + tl.arange(0, KW)
        words = tl.load(qw_ptr + row[:, None] * N + n[None, :], mask=nmask, other=0)
        shifts = (tl.arange(0, VPW) * BITS)[None, :, None]
        q = (words[:, None, :] >> shifts) & maxq
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def last_to_arrive(lock, programs: tl.constexpr):
    """Called by each of `programs` programs sharing the counter `lock` once its partial results
    are stored: whether it is the last to get here, which then merges them (reading them past L1,
    .cg) and resets the counter to zero. The barrier makes every thread's stores precede the count."""
    tl.debug_barrier()
    return tl.atomic_add(lock, 1, sem="acq_rel") == programs - 1


@triton.jit
def _store_row(y_ptr, m, n0, values, N, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row m's outputs n0 … n0 + BLOCK_N − 1 into y [M, N]; with SWIGLU, outputs interleaved as
    (gate, up) pairs go in as silu(gate)·up, into y [M, N/2]."""
    if SWIGLU:
        gate, up = tl.split(tl.reshape(values, (BLOCK_N // 2, 2)))
        i = n0 // 2 + tl.arange(0, BLOCK_N // 2)
        out = gate * tl.sigmoid(gate) * up
        tl.store(y_ptr + m * (N // 2) + i, out.to(y_ptr.dtype.element_ty), mask=i < N // 2)
    else:
        n = n0 + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + m * N + n, values.to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _add_splits(p_ptr, b_ptr, y_ptr, m, M, n0, N, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLITS: tl.constexpr, SWIGLU: tl.constexpr):
    """y[m, n] = the K-splits' partial sums p[·, m, n] added up (and the bias). p is read past L1
    (.cg): other programs wrote it."""
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = n < N
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        total += tl.load(p_ptr + (split * M + m) * N + n, mask=nmask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        total += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    _store_row(y_ptr, m, n0, total, N, SWIGLU, BLOCK_N)


@triton.jit
def _store_gemv(acc, b_ptr, p_ptr, y_ptr, lock_ptr, m, split, n0, N, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, LAST_SUMS: tl.constexpr, SWIGLU: tl.constexpr):
    """Row m's sums `acc` over one K-split into y, or into the partial sums p (see _gemv_kernel)."""
    M = tl.num_programs(1)
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = n < N
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        _store_row(y_ptr, m, n0, acc, N, SWIGLU, BLOCK_N)
    else:
        tl.store(p_ptr + (split * M + m) * N + n, acc, mask=nmask)
        if LAST_SUMS:
            lock = lock_ptr + tl.program_id(0) * M + m
            if last_to_arrive(lock, SPLITS):
                _add_splits(p_ptr, b_ptr, y_ptr, m, M, n0, N, HAS_BIAS, BLOCK_N, SPLITS, SWIGLU)
                tl.atomic_xchg(lock, 0)


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
def _zero_after_wait(x_row, K):
    """A uint32 zero that no compiler can tell is zero (x₀ ≠ x₀ and K < 0: never true), read
    after the PDL wait: what it is added to cannot be computed before the wait."""
    x0 = tl.load(x_row).to(tl.float32)
    return ((x0 != x0) & (K < 0)).to(tl.uint32)


@triton.jit
def _after_wait(words, x_row, K):
    """The words unchanged, made to depend on a value read after the PDL wait: otherwise ptxas
    unpacks them before the wait, while their loads are in flight, and holds every unpacked code
    in registers (up to 255, and spills). An added zero (_zero_after_wait) ties them to x₀, the
    first input; an OR would not: LLVM distributes shifts and masks over it and moves them
    ahead of the wait again. The half2 sums tie `one` instead (_masked_pair), one addition
    rather than one per word."""
    zero = _zero_after_wait(x_row, K)
    out = ()
    for r in tl.static_range(len(words)):
        out = out + (words[r] + zero,)
    return out


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


@triton.jit
def _stream_row(x_row, k, mask, x_split_stride, dtype, X_SPLITS: tl.constexpr):
    """Row x's inputs k: as stored, or with X_SPLITS > 1 the float32 partial sums of a GEMV's
    K-splits (x_split_stride apart, gptq_gemv_split_sums) added up in order and rounded to
    `dtype`, as _add_splits would have stored them."""
    if X_SPLITS == 1:
        x = tl.load(x_row + k, mask=mask, other=0.0)
    else:
        total = tl.zeros(k.shape, dtype=tl.float32)
        for s in tl.static_range(X_SPLITS):
            total += tl.load(x_row + s * x_split_stride + k, mask=mask, other=0.0)
        x = total.to(dtype)
    return x


@triton.jit
def _add_norm_row(x_row, r_row, w, h_row, xn_row, lo, hi, K, eps, write_h, x_split_stride, HAS_RES: tl.constexpr,
                  K_POW2: tl.constexpr, X_SPLITS: tl.constexpr):
    """The GEMV's input for inputs [lo, hi) as an RMSNorm computes it from the row x plus the
    residual r (h = r + x in h's dtype, h·rsqrt(mean(h²) + eps) rounded to it, times the norm's
    weights w, [K_POW2] as _norm_weights read them), stored at xn_row, with h at h_row if
    write_h; the same roundings as models.transformer.RMSNorm. Every program reads the whole row
    for the mean of squares. x may be split sums (_stream_row)."""
    k = tl.arange(0, K_POW2)
    mask = k < K
    h = _stream_row(x_row, k, mask, x_split_stride, h_row.dtype.element_ty, X_SPLITS)
    if HAS_RES:
        h = h + tl.load(r_row + k, mask=mask, other=0.0)
    mine = mask & (k >= lo) & (k < hi)
    tl.store(h_row + k, h, mask=mine & write_h)
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / K + eps)
    normed = (hf * rstd).to(h.dtype).to(tl.float32)
    tl.store(xn_row + k, (w * normed).to(xn_row.dtype.element_ty), mask=mine)
    tl.debug_barrier()  # the row's other threads read what this one stored


@triton.jit
def _norm_weights(nw_ptr, K, K_POW2: tl.constexpr):
    """The norm's weights [K_POW2] as float32 (zero past K), in _add_norm_row's layout."""
    k = tl.arange(0, K_POW2)
    return tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _normed_row(x_row, r_ptr, nw, h_ptr, xn_ptr, m, split, k_split, K, eps, x_split_stride, HAS_RES: tl.constexpr,
                K_POW2: tl.constexpr, X_SPLITS: tl.constexpr):
    """This program's row of xn, holding the normalized inputs of its K-split (see _gemv_kernel)."""
    program = (tl.program_id(0) * tl.num_programs(1) + m) * tl.num_programs(2) + split
    xn_row = xn_ptr + program.to(tl.int64) * K
    _add_norm_row(x_row, r_ptr + m * K, nw, h_ptr + m * K, xn_row, split * k_split, (split + 1) * k_split, K,
                  eps, tl.program_id(0) == 0, x_split_stride, HAS_RES, K_POW2, X_SPLITS)
    return xn_row


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr, b_ptr, p_ptr, y_ptr, lock_ptr, r_ptr, nw_ptr, h_ptr, xn_ptr,
                 N, K, k_split, stride_x, x_split_stride, one, eps,
                 BITS: tl.constexpr, LAYOUT: tl.constexpr, OFFSET: tl.constexpr, GS: tl.constexpr,
                 ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLITS: tl.constexpr, LAST_SUMS: tl.constexpr, SWIGLU: tl.constexpr, ONE_TILE: tl.constexpr,
                 PDL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, K_POW2: tl.constexpr,
                 X_SPLITS: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr):
    """Outputs n of row m over inputs [split·k_split, (split+1)·k_split). One split writes y [M, N];
    several write float32 partial sums p [splits, M, N], which with LAST_SUMS the split that
    finishes last for a tile adds up into y (counting arrivals in lock, which it resets to zero),
    and otherwise a second kernel adds up. SWIGLU: see _store_row.

    The weights are read as chunks of 32 inputs (b words each), so that every code's word and
    shift are compile-time constants, with no reshapes (which Triton turns into shared-memory
    round trips), and the sum over K waits until the end. A code becomes u = 1 + q·2⁻ᵇ in a
    shift and one LOP3 (_unit_float, `one` being the bits of 1.0), so that the loop adds only u·x;
    the offset and zero point come off per chunk, as (2ᵇ + z)·Σx (act-order layers, whose codes
    each have their own group, take them off per code). README: GPU performance.

    PDL (programmatic dependent launch): the kernel may start while the one before it in the
    stream still runs; it reads its first tile of weights (and with NORM the norm's weights),
    which nothing before it writes, then waits for that kernel (griddepcontrol) before it reads x
    or writes anything, and lets the kernel after it start likewise. With one tile per program
    (ONE_TILE, as the default tiling arranges) that read happens before the wait; with several,
    all reads come after it.

    NORM: x is a block's residual stream still to be added to the residual r (h = r + x, or x
    without HAS_RES), and the product takes RMSNorm(h) with the norm's weights nw (_add_norm_row):
    each program normalizes its K-split of the row into its own slice of xn [programs, K] and
    reads it from there, and the programs of the first output tile write h [M, K]. That folds
    the residual add and the norm, one element-wise kernel each time, into the GEMV after them.
    With X_SPLITS > 1, x is the float32 partial sums [X_SPLITS, M, K] (x_split_stride apart) a
    product left unadded (gptq_gemv_split_sums), added up here as that product would have.

    LAYOUT: how qweight packs a chunk's codes (qrobust.quant.pack). HALF2: each chunk's sums in
    float16, two codes at a time (_half2_sums, `one` = HALF2_ONE); ASM: on a GPU (off, the
    interpreter computes the same in Triton's operations)."""
    m, split = tl.program_id(1), tl.program_id(2)
    n0 = tl.program_id(0) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = n < N
    KC: tl.constexpr = BLOCK_K // 32
    x_row = x_ptr + m * stride_x
    chunks = tl.arange(0, KC) * 32
    if NORM:  # weights too: before the wait, rather than serialized after the mean of squares
        nw = _norm_weights(nw_ptr, K, K_POW2)
    if ONE_TILE:  # its tile's weights come before the wait
        kc = split * k_split + chunks
        words, s, z = _load_tile(qw_ptr, s_ptr, qz_ptr, kc, n, nmask[None, :], N, BITS, OFFSET, GS, ACT_ORDER)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if NORM:
        x_row = _normed_row(x_row, r_ptr, nw, h_ptr, xn_ptr, m, split, k_split, K, eps, x_split_stride, HAS_RES,
                            K_POW2, X_SPLITS)
    if ONE_TILE:
        if PDL and HALF2:
            one = one + _zero_after_wait(x_row, K)
        elif PDL:
            words = _after_wait(words, x_row, K)
        acc = _tile_sums(words, s, z, x_row, s_ptr, qz_ptr, g_ptr, kc, n, nmask, N, one, BITS, LAYOUT, OFFSET,
                         ACT_ORDER, BLOCK_N, HALF2, ASM)
    else:
        acc = tl.zeros([KC, BLOCK_N], dtype=tl.float32)
        for k0 in range(split * k_split, (split + 1) * k_split, BLOCK_K):
            kc = k0 + chunks
            words, s, z = _load_tile(qw_ptr, s_ptr, qz_ptr, kc, n, nmask[None, :], N, BITS, OFFSET, GS, ACT_ORDER)
            acc += _tile_sums(words, s, z, x_row, s_ptr, qz_ptr, g_ptr, kc, n, nmask, N, one, BITS, LAYOUT,
                              OFFSET, ACT_ORDER, BLOCK_N, HALF2, ASM)
    _store_gemv(tl.sum(acc, axis=0), b_ptr, p_ptr, y_ptr, lock_ptr, m, split, n0, N, HAS_BIAS, BLOCK_N,
                SPLITS, LAST_SUMS, SWIGLU)


@triton.jit
def _sum_splits_kernel(p_ptr, b_ptr, y_ptr, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                       SWIGLU: tl.constexpr):
    _add_splits(p_ptr, b_ptr, y_ptr, tl.program_id(1), tl.num_programs(1), tl.program_id(0) * BLOCK, N, HAS_BIAS,
                BLOCK, SPLITS, SWIGLU)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, qz_ptr, g_ptr, w_ptr, N, K,
                    BITS: tl.constexpr, LAYOUT: tl.constexpr, OFFSET: tl.constexpr, GS: tl.constexpr,
                    ACT_ORDER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = (n < N)[None, :]
    k = k0 + tl.arange(0, BLOCK_K)
    q = _exact_float(_unpack_tile(qw_ptr, k0, n, N, BITS, LAYOUT, BLOCK_K, BLOCK_N))
    if ACT_ORDER:
        g = tl.load(g_ptr + k)[:, None]
    else:
        g = k0 // GS
    s = tl.load(s_ptr + g * N + n[None, :], mask=nmask, other=0.0).to(tl.float32)
    z = _zeros(qz_ptr, g, n[None, :], nmask, N, BITS, OFFSET)
    tl.store(w_ptr + k[:, None] * N + n[None, :], (s * (q - z)).to(w_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _matmul_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_y,
                   BITS: tl.constexpr, LAYOUT: tl.constexpr, OFFSET: tl.constexpr, GS: tl.constexpr,
                   ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """y = x Ŵᵀ on tensor cores, each weight tile dequantized in registers on its way to tl.dot."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=mmask[:, None], other=0.0)
        q = _exact_float(_unpack_tile(qw_ptr, k0, n, N, BITS, LAYOUT, BLOCK_K, BLOCK_N))
        if ACT_ORDER:
            g = tl.load(g_ptr + k)[:, None]
        else:
            g = k0 // GS
        s = tl.load(s_ptr + g * N + n[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
        z = _zeros(qz_ptr, g, n[None, :], nmask[None, :], N, BITS, OFFSET)
        acc += tl.dot(a, (s * (q - z)).to(a.dtype))
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def pdl_supported(device: torch.device | str) -> bool:
    """Whether kernels on `device` can be launched as programmatic dependent launches: CUDA GPUs
    of compute capability 9.0 (Hopper) or later, with a Triton that has the griddepcontrol calls;
    never under Triton's interpreter."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 \
        and hasattr(tl.extra.cuda, "gdc_wait")


def launch_options(pdl: bool) -> dict:
    """Triton launch options for a kernel written with a PDL switch (gdc_wait before it reads what
    earlier kernels wrote): the launch attribute only when asked, as the interpreter knows none."""
    return {"launch_pdl": True} if pdl else {}


def compile_gemv_for(arch: int, constants: dict, dtype: str = "fp16", num_warps: int = 8, num_stages: int = 3,
                     norm_dtype: str | None = None):
    """_gemv_kernel compiled for CUDA compute capability `arch` (×10) without a GPU, to read the
    code it becomes (benchmarks/kernel_asm.py; the PDL test): activations and outputs of Triton
    type `dtype`, norm weights of `norm_dtype` (default `dtype`), every pointer and integer
    16-byte aligned, `constants` the kernel's constexpr parameters (all of them), PDL's launch
    option where constants ask for it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    act = "*" + dtype
    pointers = {"x_ptr": act, "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "g_ptr": "*i32", "b_ptr": act,
                "p_ptr": "*fp32", "y_ptr": act, "lock_ptr": "*i32", "r_ptr": act, "nw_ptr": "*" + (norm_dtype or dtype),
                "h_ptr": act, "xn_ptr": act}
    integers = {"N": "i32", "K": "i32", "k_split": "i32", "stride_x": "i32", "x_split_stride": "i32", "one": "u32"}
    signature = {**pointers, **integers, "eps": "fp32", **{name: "constexpr" for name in constants}}
    names = list(signature)
    source = ASTSource(_gemv_kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + len(integers))})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   **launch_options(constants.get("PDL", False))})


def block_k(K: int, group_size: int, act_order: bool, preferred: int, chunked: bool = False) -> int:
    """A tile depth that divides K and is a multiple of 32. Without act-order, a tile of the
    dequantizing kernels lies within one group; the GEMV (`chunked`) reads groups as chunks of
    32 inputs, so its tiles may cut across groups that are whole chunks."""
    def fits(bk: int) -> bool:
        if K % bk:
            return False
        return act_order or (group_size % 32 == 0 if chunked else group_size % bk == 0)
    bk = preferred
    while bk > 32 and not fits(bk):
        bk //= 2
    if not fits(bk):
        raise ValueError(f"packed kernels need input features and group size divisible by 32 "
                         f"(K={K}, group={group_size})")
    return bk


ONE_BITS = 0x3F800000  # float32 1.0 (_unit_float)
HALF2_ONE = 0x64006400  # float16 1024.0 twice (_half2_sums)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # outputs per program
    block_depth: int  # inputs per loop step
    splits: int  # programs along K per output tile
    num_warps: int


def gemv_warps(block_depth: int) -> int:
    """Warps for a GEMV tile of 32 outputs by block_depth inputs: one per 256 inputs (1 to 8)."""
    return max(1, min(8, block_depth // 256))


def gemv_config(K: int, group_size: int, act_order: bool) -> GemvConfig:
    """The GEMV's tiling for a layer of K inputs: programs of 32 outputs that each read one deep tile,
    all of K up to 2048 inputs (deeper layers: tiles of 2048, one per K-split), with a warp per
    256 inputs, so that each thread unpacks 256 codes. Few programs with many loads in flight
    each beat many shallow ones, whose fixed costs (the K-split partial sums, their counters)
    dominate products of a few microseconds. On an H100 at Qwen3-1.7B's shapes, at 2, 4 and 8
    bits, this was the fastest tiling measured alone or within 2% of it, but for the fused
    gate/up product at 2 and 8 bits (24%, 10%; benchmarks/packed_gemv.py, README: GPU
    performance), and for the 6144-deep down projection, where 1024-deep tiles did as well
    alone; in 4-bit decoding three 2048-deep splits of it beat six 1024-deep ones by 0.7%, and
    split sums (gptq_gemv_split_sums) leave fewer partial sums for the next product to add."""
    bk = block_k(K, group_size, act_order, 2048, chunked=True)
    return GemvConfig(32, bk, K // bk, num_warps=gemv_warps(bk))


def gemv_locks(N: int, device: torch.device, rows: int, block_n: int) -> torch.Tensor:
    """The arrival counters gptq_gemv's split-K programs share: zeros, one per output tile and
    row, which every call leaves at zero again. Owned by one layer: calls that run at the same
    time (on several streams) need separate counters."""
    return torch.zeros(triton.cdiv(N, block_n) * rows, dtype=torch.int32, device=device)


def gptq_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
              g_idx: torch.Tensor | None, bits: int, group_size: int, zero_offset: int,
              bias: torch.Tensor | None = None, block_n: int = 32, block_depth: int | None = None,
              splits: int | None = None, num_warps: int | None = None, num_stages: int = 3,
              locks: torch.Tensor | None = None, swiglu: bool = False, pdl: bool = False,
              half2: bool = False, layout: str = "gptq") -> torch.Tensor:
    """x [M, K] (M small) times the packed weight: [M, N] in x's dtype. g_idx is None when inputs
    are grouped in order (group = k // group_size), else each input's group (act-order);
    zero_offset is what the checkpoint format subtracted from the stored zero points. Tiles are
    block_n outputs (a power of two, at least 32) by block_depth inputs (or the most that divide
    K and its groups); without `splits`, one per program along K. Unset depth and warps follow
    gemv_config. With several K-splits, `locks` (gemv_locks, at least cdiv(N, block_n)·M of
    them) lets the last split of each tile add the partial sums in the same kernel; without, a
    second kernel does. With `swiglu`, the weight's outputs interleave gate and up (g₀, u₀, g₁,
    u₁, …) and the result is silu(gate)·up [M, N/2], applied as the kernel stores it. `pdl` launches
    it as a programmatic dependent launch (see _gemv_kernel; Hopper and later, pdl_supported):
    only where no kernel just before it writes the packed weights, as in decoding. `half2` sums
    each chunk of 32 inputs two codes at a time in float16 (_half2_sums) where it can
    (half2_applies). `layout` is qweight's (qrobust.quant.pack: "gptq", or "pairs" for 3 bits)."""
    return _gemv(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, bias, block_n, block_depth,
                 splits, num_warps, num_stages, locks, swiglu, pdl, half2, layout)[0]


def aligned_rows(x: torch.Tensor, alignment: int = 16) -> torch.Tensor:
    """x [M, K], or a copy of it whose rows start at multiples of `alignment` bytes, as the GEMV's
    vector reads of 16-bit inputs need (_x_words): a view into a larger tensor may start anywhere."""
    if x.data_ptr() % alignment or x.stride(0) * x.element_size() % alignment:
        x = torch.empty_strided(x.shape, (triton.cdiv(x.shape[1] * x.element_size(), alignment) * alignment
                                          // x.element_size(), 1), dtype=x.dtype, device=x.device).copy_(x)
    return x


@dataclass(frozen=True)
class AddNorm:
    """What comes before a GEMV that takes a block's residual stream: h = residual + x (x alone
    without a residual), then an RMSNorm of weight `weight` and epsilon `eps`."""
    residual: torch.Tensor | None
    weight: torch.Tensor
    eps: float


def gptq_gemv_add_norm(x: torch.Tensor, norm: AddNorm, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) times the packed weight, h) for h = norm.residual + x, in one kernel: the
    residual add and the norm run in the GEMV's prologue (_gemv_kernel's NORM). x is [M, K], or
    with a residual the split sums [S, M, K] of gptq_gemv_split_sums, which the prologue adds up
    first. The other arguments are gptq_gemv's."""
    return _gemv(x, *args, **kwargs, norm=norm)


def gptq_gemv_split_sums(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """gptq_gemv's product left as its K-splits' float32 partial sums [splits, M, N] (several
    splits, no locks, SwiGLU or bias), for a GEMV with a norm to add up in its prologue
    (gptq_gemv_add_norm with x [splits, M, K]): the split that finishes last then has no partial
    sums to gather, and its arrival counter, fence and reads leave the critical path. The
    arguments are gptq_gemv's."""
    return _gemv(x, *args, **kwargs, add_splits=False)[0]


def _gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
          g_idx: torch.Tensor | None, bits: int, group_size: int, zero_offset: int,
          bias: torch.Tensor | None = None, block_n: int = 32, block_depth: int | None = None,
          splits: int | None = None, num_warps: int | None = None, num_stages: int = 3,
          locks: torch.Tensor | None = None, swiglu: bool = False, pdl: bool = False, half2: bool = False,
          layout: str = "gptq", norm: AddNorm | None = None,
          add_splits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gptq_gemv's product, and h where `norm` (gptq_gemv_add_norm) asks for the norm first; x
    [S, M, K] there is split sums (gptq_gemv_split_sums). Without add_splits, the K-splits'
    partial sums [splits, M, N] instead of the product."""
    x_splits = x.shape[0] if x.dim() == 3 else 1
    if x_splits > 1 and (norm is None or norm.residual is None):
        raise ValueError("gptq_gemv: split sums [S, M, K] are an input only where a residual and a norm follow")
    dtype = x.dtype if x_splits == 1 else norm.residual.dtype
    M, K = x.shape[-2:]
    N = qweight.shape[1]
    x = x.contiguous()
    act_order = g_idx is not None
    _check_layout(bits, layout)
    half2 = half2 and half2_applies(bits, act_order, dtype, layout)
    if norm is None and x.element_size() == 2:  # read as vectors (_x_words)
        x = aligned_rows(x)
    if block_depth is None:
        bk = gemv_config(K, group_size, act_order).block_depth
    else:
        bk = block_k(K, group_size, act_order, block_depth, chunked=True)
    if block_n < 32 or block_n & (block_n - 1):
        raise ValueError(f"gptq_gemv: block_n must be a power of two of at least 32, got {block_n}")
    if swiglu and N % 2:
        raise ValueError(f"gptq_gemv: swiglu needs (gate, up) output pairs, got {N} outputs")
    if splits is None:
        splits = K // bk
    if K % (splits * bk):
        raise ValueError(f"gptq_gemv: {splits} K-splits of {K} inputs are not whole tiles of depth {bk}")
    tiles = triton.cdiv(N, block_n)
    last_sums = splits > 1 and locks is not None
    if last_sums and locks.numel() < tiles * M:
        raise ValueError(f"gptq_gemv needs {tiles * M} locks for {M} rows, got {locks.numel()}")
    if not add_splits and (splits == 1 or last_sums or swiglu or bias is not None):
        raise ValueError("gptq_gemv: split sums need several K-splits, no locks, no SwiGLU and no bias")
    y = torch.empty(M, N // 2 if swiglu else N, device=x.device, dtype=dtype)
    partial = y if splits == 1 else torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
    fuse_bias = bias is not None and (splits == 1 or last_sums)
    h = xn = residual = None
    if norm is not None:
        h = torch.empty(M, K, device=x.device, dtype=dtype)
        xn = torch.empty(tiles * M * splits, K, device=x.device, dtype=dtype)
        residual = None if norm.residual is None else norm.residual.reshape(M, K).contiguous()
    _gemv_kernel[(tiles, M, splits)](
        x, qweight, scales, qzeros, g_idx if act_order else scales, bias if fuse_bias else y, partial, y,
        locks if last_sums else y, y if residual is None else residual, y if norm is None else norm.weight,
        y if h is None else h, y if xn is None else xn, N, K, K // splits, x.stride(-2),
        x.stride(0) if x_splits > 1 else 0, HALF2_ONE if half2 else ONE_BITS,
        0.0 if norm is None else norm.eps, BITS=bits, LAYOUT=layout, OFFSET=zero_offset,
        GS=group_size, ACT_ORDER=act_order, HAS_BIAS=fuse_bias, BLOCK_N=block_n, BLOCK_K=bk, SPLITS=splits,
        LAST_SUMS=last_sums, SWIGLU=swiglu, ONE_TILE=K // splits == bk,
        PDL=pdl, NORM=norm is not None, HAS_RES=residual is not None, K_POW2=triton.next_power_of_2(K),
        X_SPLITS=x_splits, HALF2=half2, ASM=not interpreting(), num_warps=num_warps or gemv_warps(bk),
        num_stages=num_stages,
        **launch_options(pdl))
    if not add_splits:
        return partial, h
    if splits > 1 and not last_sums:
        _sum_splits_kernel[(triton.cdiv(N, 1024), M)](partial, bias if bias is not None else y, y, N, SPLITS=splits,
                                                       HAS_BIAS=bias is not None, BLOCK=1024, SWIGLU=swiglu)
    return y, h


def _check_layout(bits: int, layout: str) -> None:
    if not layout_applies(bits, layout):
        raise ValueError(f"packed kernels: no {layout!r} layout for {bits}-bit codes (qrobust.quant.pack)")


def gptq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                    bits: int, group_size: int, zero_offset: int, K: int, dtype: torch.dtype,
                    block_n: int = 64, block_depth: int = 64, layout: str = "gptq") -> torch.Tensor:
    """Ŵᵀ [K, N] in `dtype`, from qweight in `layout`."""
    N = qweight.shape[1]
    act_order = g_idx is not None
    _check_layout(bits, layout)
    bk = block_k(K, group_size, act_order, block_depth)
    w = torch.empty(K, N, device=qweight.device, dtype=dtype)
    grid = (K // bk, triton.cdiv(N, block_n))
    _dequant_kernel[grid](qweight, scales, qzeros, g_idx if act_order else scales, w, N, K, BITS=bits,
                          LAYOUT=layout, OFFSET=zero_offset, GS=group_size, ACT_ORDER=act_order, BLOCK_N=block_n,
                          BLOCK_K=bk)
    return w


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int, zero_offset: int,
                bias: torch.Tensor | None = None, block_n: int = 64, block_depth: int = 64,
                layout: str = "gptq") -> torch.Tensor:
    """x [M, K] times the packed weight with the dequantization fused into a tensor-core matmul,
    for batches too large for the GEMV (prefill, diffusion steps). Not yet the default anywhere:
    benchmarks/packed_gemv.py times it against dequantize-then-matmul."""
    M, K = x.shape
    N = qweight.shape[1]
    x = x.contiguous()
    act_order = g_idx is not None
    _check_layout(bits, layout)
    bk = block_k(K, group_size, act_order, block_depth)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _matmul_kernel[grid](x, qweight, scales, qzeros, g_idx if act_order else scales, bias if bias is not None else y,
                         y, M, N, K, x.stride(0), y.stride(0), BITS=bits, LAYOUT=layout, OFFSET=zero_offset,
                         GS=group_size, ACT_ORDER=act_order, HAS_BIAS=bias is not None, BLOCK_M=block_m,
                         BLOCK_N=block_n, BLOCK_K=bk)
    return y


# The products as torch custom ops: torch.compile treats each as one opaque call (rather than
# tracing into the launcher and analysing the Triton kernel at every call site, which made
# compiling a 1.7B model take minutes), and CUDA graphs capture them as they are.
@torch.library.custom_op("qrobust::gptq_gemv", mutates_args=())
def gemv_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
            g_idx: torch.Tensor | None, bias: torch.Tensor | None, locks: torch.Tensor | None, bits: int,
            group_size: int, zero_offset: int, block_n: int, block_depth: int, splits: int,
            num_warps: int, swiglu: bool = False, pdl: bool = False, half2: bool = False,
            layout: str = "gptq") -> torch.Tensor:
    """gptq_gemv. `locks` is not listed as mutated: every call leaves it as it found it."""
    return gptq_gemv(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, bias=bias, block_n=block_n,
                     block_depth=block_depth, splits=splits, num_warps=num_warps, locks=locks, swiglu=swiglu, pdl=pdl,
                     half2=half2, layout=layout)


@gemv_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bias, locks, bits, group_size, zero_offset, block_n, block_depth, splits,
      num_warps, swiglu=False, pdl=False, half2=False, layout="gptq"):
    return x.new_empty(x.shape[0], qweight.shape[1] // 2 if swiglu else qweight.shape[1])


@torch.library.custom_op("qrobust::gptq_gemv_split_sums", mutates_args=())
def gemv_split_sums_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor | None, bits: int, group_size: int, zero_offset: int, block_n: int,
                       block_depth: int, splits: int, num_warps: int, pdl: bool = False,
                       half2: bool = False, layout: str = "gptq") -> torch.Tensor:
    """gptq_gemv_split_sums."""
    return gptq_gemv_split_sums(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, block_n=block_n,
                                block_depth=block_depth, splits=splits, num_warps=num_warps, pdl=pdl, half2=half2,
                                layout=layout)


@gemv_split_sums_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, block_n, block_depth, splits, num_warps,
      pdl=False, half2=False, layout="gptq"):
    return x.new_empty(splits, x.shape[0], qweight.shape[1], dtype=torch.float32)


@torch.library.custom_op("qrobust::gptq_gemv_add_norm", mutates_args=())
def gemv_add_norm_op(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                     bias: torch.Tensor | None, locks: torch.Tensor | None, bits: int, group_size: int,
                     zero_offset: int, block_n: int, block_depth: int, splits: int, num_warps: int,
                     swiglu: bool = False, pdl: bool = False, half2: bool = False,
                     layout: str = "gptq") -> tuple[torch.Tensor, torch.Tensor]:
    """gptq_gemv_add_norm: (the product, h)."""
    return gptq_gemv_add_norm(x, AddNorm(residual, norm_weight, eps), qweight, scales, qzeros, g_idx, bits,
                              group_size, zero_offset, bias=bias, block_n=block_n, block_depth=block_depth,
                              splits=splits, num_warps=num_warps, locks=locks, swiglu=swiglu, pdl=pdl, half2=half2,
                              layout=layout)


@gemv_add_norm_op.register_fake
def _(x, residual, norm_weight, eps, qweight, scales, qzeros, g_idx, bias, locks, bits, group_size, zero_offset,
      block_n, block_depth, splits, num_warps, swiglu=False, pdl=False, half2=False, layout="gptq"):
    stream = x if residual is None else residual  # [M, K] in the activations' dtype; x may be split sums
    return stream.new_empty(stream.shape[0], qweight.shape[1] // 2 if swiglu else qweight.shape[1]), \
        torch.empty_like(stream)


@torch.library.custom_op("qrobust::gptq_dequantize", mutates_args=())
def dequantize_op(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                  bits: int, group_size: int, zero_offset: int, K: int, dtype: torch.dtype,
                  layout: str = "gptq") -> torch.Tensor:
    return gptq_dequantize(qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, K, dtype, layout=layout)


@dequantize_op.register_fake
def _(qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, K, dtype, layout="gptq"):
    return qweight.new_empty(K, qweight.shape[1], dtype=dtype)
