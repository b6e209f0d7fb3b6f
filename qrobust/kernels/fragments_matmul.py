"""The batched product of 2-, 3-, 4- and 8-bit weights in the fragments layout on Hopper: y = x Ŵᵀ
computed as yᵀ = Ŵ xᵀ, with the weights wgmma's register operand (Gluon, Triton's explicit-layout
language).

kernels.packed_matmul dequantizes each weight tile into shared memory for the tensor cores:
about 7.6 instructions per weight and thread at 64 rows, a barrier per step, and programs whose
serial chain keeps DRAM 3-12% busy. Here one program is a warpgroup and 64 outputs (or more, below):

- each thread loads its words (kernels.fragments: the eight codes of its A fragment per 16-input
  step, 4·b contiguous bytes per 128 inputs at b bits, in two planes at 3 bits) LOAD_AHEAD steps
  before it dequantizes them;
- two codes become two weights in one register (kernels.layouts' `_pair_asm`: a shift, a LOP3
  under the exponent of 128 (bf16) or 1024 (fp16), q − z exact, one rounding of (q − z)·s; 3-bit
  codes with their high bit ORed in from its plane: _split_pair_asm; 8-bit codes, which bf16's
  7-bit mantissa does not hold, in float32 for bf16: _byte_pair_asm), in the layout wgmma reads,
  so no weight goes to shared memory;
- x's 128-input tiles arrive by asynchronous copies in a ring of three, and each step's wgmma
  (all rows, up to 64, as wgmma's N) runs while the next step's weights are dequantized;
- rows per program and K-splits follow fragments_tiling; of a K-split tile, the last program to
  finish adds the partial sums up in split order (an arrival counter per tile, as kernels.packed_matmul);
- a program may have 2 or 4 warpgroups (warpgroups=), each its own 64-output tile, sharing x's
  tiles, which L2 then serves N/128 or N/256 times instead of N/64;
- with swiglu=True the fused gate/up layer's outputs leave as silu(gate)·up: the sums move to a
  layout where a thread holds each (gate, up) pair, since the accumulator's lanes split them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from qrobust.kernels.fragments import TILE_K, TILE_N, first_plane_width, planes
from qrobust.kernels.launch import compile_for, launch_options
from qrobust.kernels.layouts import _pair_asm, pair_arithmetic, pair_magic
from qrobust.kernels.swiglu import swiglu as interleaved_swiglu

MAX_ROWS = 64  # the most rows a call takes (quant.kernel_choice)
ROW_BLOCK = 32  # the most rows a program of a small layer takes (fragments_tiling)
MAX_SPLIT = 8  # the most K-splits measured (benchmarks/fragments_splits.py)
WARPGROUPS = (1, 2, 4)  # warpgroups a program may have: 64, 128 or 256 outputs sharing x's tiles
LOAD_AHEAD = 3  # steps between the loads of a step's words and its dequantization (benchmarks/fragments_splits.py)
TILE_OUTPUTS = gl.constexpr(TILE_N)  # one warpgroup's outputs: a tile of the layout
BLOCK_K = gl.constexpr(TILE_K)
X_STAGES = gl.constexpr(3)  # x's tiles in flight or in use
_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier  # renamed after Triton 3.6


@triton.constexpr_function
def _byte_pair_asm(byte):
    """PTX for one call of _pair_weights on 8-bit codes in bf16 (pack=2: $0 the two weights, $1 and
    $2 the word, $3 and $4 −(2²³ + z), $5 and $6 the scale, float32): PRMT puts bytes `byte` and
    `byte` + 2 under the float32 exponent of 2²³, where adding −(2²³ + z) leaves q − z exactly; one
    rounding of (q − z)·s to float32 and one to bf16, as the dequantized weight's."""
    select = [0x7540 | b for b in (byte, byte + 2)]
    return ("{ .reg .b32 c, a, b; mov.b32 c, 0x4B000000; "
            f"prmt.b32 a, $1, c, {select[0]:#x}; prmt.b32 b, $1, c, {select[1]:#x}; "
            "add.f32 a, a, $3; add.f32 b, b, $3; mul.f32 a, a, $5; mul.f32 b, b, $5; "
            "cvt.rn.bf16x2.f32 $0, b, a; }")


@triton.constexpr_function
def _split_pair_asm(J, bf16):
    """PTX for one call of _pair_weights on 3-bit codes (pack=2: $0 the two weights, $1 and $2 the
    low two bits' word, $3 and $4 the high bit's, $5 the negated offset zero points, $6 and $7 the
    scale's two parts): pair J's low bits at 2J and 16 + 2J, its high bits at J and 16 + J, ORed
    together under the half-precision exponent as _pair_asm's."""
    low = f"shr.b32 q, $1, {2 * J};" if J else "mov.b32 q, $1;"
    high = f"shl.b32 u, $3, {2 - J};" if J < 2 else "mov.b32 u, $3;" if J == 2 else "shr.b32 u, $3, 1;"
    return ("{ .reg .b32 q, u, d, lo, one, nz; " + low + f" lop3.b32 q, q, {0x30003}, {pair_magic(bf16)}, 0xEA; "
            + high + f" lop3.b32 q, u, {0x40004}, q, 0xEA; " + pair_arithmetic(bf16, "$5", "$6", "$7") + " }")


@triton.constexpr_function
def _in_float32(bits, dtype):
    """Whether pairs are made in float32: 8-bit codes for bf16 weights."""
    return bits == 8 and dtype == gl.bfloat16


@gluon.jit
def _pair_weights(words, high, zn, s_hi, s_lo, J: gl.constexpr, BITS: gl.constexpr, DTYPE: gl.constexpr):
    """The codes of pair J, at bits `shift` and 16 + `shift` of each word, as two weights ([..., 2])
    in one register: shift = BITS·J (at 2 and 3 bits each step's word already brought down,
    _weights), 8·(J & 1) at 8 bits; at 3 bits `high` holds the high bits, J and 16 + J."""
    shift: gl.constexpr = 8 * (J % 2) if BITS == 8 else BITS * J
    w2 = gl.join(words, words)
    if BITS == 3:
        pair = gl.inline_asm_elementwise(_split_pair_asm(J, DTYPE == gl.bfloat16), "=r,r,r,r,r,r,r,r",
                                         [w2, gl.join(high, high), zn, s_hi, s_lo], dtype=zn.dtype, is_pure=True,
                                         pack=2)
    elif _in_float32(BITS, DTYPE):
        pair = gl.inline_asm_elementwise(_byte_pair_asm(shift // 8), "=r,r,r,r,r,r,r", [w2, zn, s_hi],
                                         dtype=s_lo.dtype, is_pure=True, pack=2)
    else:
        pair = gl.inline_asm_elementwise(_pair_asm(shift, BITS, DTYPE == gl.bfloat16), "=r,r,r,r,r,r",
                                         [w2, zn, s_hi, s_lo], dtype=zn.dtype, is_pure=True, pack=2)
    return pair


@gluon.jit
def _load_group(s_ptr, qz_ptr, group, n0, N, j0: gl.constexpr, BITS: gl.constexpr, WG: gl.constexpr,
                w_layout: gl.constexpr):
    """The scales [32·WG] of rows 16w + 8·j0 + g of the program's outputs (row 8w + g of the words,
    w the warp) and the word holding each one's zero point, with the next word (zx) where a 3-bit
    zero point may reach into it."""
    r = gl.arange(0, 32 * WG, layout=gl.SliceLayout(1, w_layout))
    n = n0 + 16 * (r // 8) + 8 * j0 + r % 8
    row = qz_ptr + group * (N * BITS // 32)  # a bit stream of zero points, as kernels.layouts' _unpack_at
    zw = gl.load(row + n * BITS // 32).to(gl.uint32, bitcast=True)
    if 32 % BITS:  # the next word, where a 3-bit zero point straddles two
        zx = gl.load(row + n * BITS // 32 + 1, mask=(n * BITS) % 32 > 32 - BITS, other=0)
        zx = zx.to(gl.uint32, bitcast=True)
    else:
        zx = zw
    return gl.load(s_ptr + group * N + n), zw, zx


@gluon.jit
def _group_pairs(s, zw, zx, n0, j0: gl.constexpr, BITS: gl.constexpr, OFFSET: gl.constexpr, DTYPE: gl.constexpr,
                 WG: gl.constexpr, w_layout: gl.constexpr):
    """What _pair_weights takes of a group for rows 16w + 8·j0 + g, as [32·WG, 1, 2] pairs: bf16 takes
    s_hi = bf16(s), s_lo = s − s_hi and −128 − z; fp16 s twice and −1024 − z; 8 bits in bf16
    −(2²³ + z) and s in float32 (s_lo, in bf16, only gives the weights' type)."""
    r = gl.arange(0, 32 * WG, layout=gl.SliceLayout(1, w_layout))
    n = n0 + 16 * (r // 8) + 8 * j0 + r % 8
    maxq: gl.constexpr = (1 << BITS) - 1
    shift = ((n * BITS) % 32).to(gl.uint32)
    q = zw >> shift
    if 32 % BITS:
        q = q | gl.where(shift > 32 - BITS, zx << (32 - shift), 0)
    z = (((q & maxq) + OFFSET) & maxq).to(gl.float32)
    s = s.to(gl.float32)
    if _in_float32(BITS, DTYPE):
        s_hi = s
        s_lo = s.to(gl.bfloat16)
        zn = -8388608.0 - z
    elif DTYPE == gl.bfloat16:
        s_hi = s.to(gl.bfloat16)
        s_lo = (s - s_hi.to(gl.float32)).to(gl.bfloat16)
        zn = (-128.0 - z).to(gl.bfloat16)
    else:
        s_hi = s.to(gl.float16)
        s_lo = s_hi
        zn = (-1024.0 - z).to(gl.float16)
    zn, s_hi, s_lo = zn[:, None], s_hi[:, None], s_lo[:, None]
    return gl.join(zn, zn), gl.join(s_hi, s_hi), gl.join(s_lo, s_lo)


@gluon.jit
def _tile_rows(qw_ptr, tile, step, K, BITS: gl.constexpr, WG: gl.constexpr, layout: gl.constexpr):
    """Pointers to the start of each row [32·WG] of a step's words: warpgroup r div 32 reads the
    layout's 64-output tile WG·tile + r div 32 (tiles follow each other, steps within a tile), row r mod 32."""
    r = gl.arange(0, 32 * WG, layout=gl.SliceLayout(1, layout))
    return qw_ptr + ((WG * tile + r // 32) * (K // BLOCK_K) + step) * (256 * BITS), r % 32


@gluon.jit
def _load_step(qw_ptr, s_ptr, qz_ptr, tile, step, N, K, BITS: gl.constexpr, WG: gl.constexpr,
               load_layout: gl.constexpr, high_layout: gl.constexpr, w_layout: gl.constexpr):
    """A step's words [32·WG (8w + g), 8b (8c + ·)] of its first plane (kernels.fragments.planes: b =
    BITS, or 2 at 3 bits), at 3 bits its high bits' words [32·WG, 8], and its group's scales and zero
    points for the two halves of each warp's rows: loads only, used steps later (arithmetic on them
    here would wait for them)."""
    width: gl.constexpr = first_plane_width(BITS)
    per_row: gl.constexpr = 8 * width
    tile_ptr, r = _tile_rows(qw_ptr, tile, step, K, BITS, WG, load_layout)
    col = gl.arange(0, per_row, layout=gl.SliceLayout(0, load_layout))
    words = gl.load((tile_ptr + r * per_row)[:, None] + col[None, :], eviction_policy="evict_first")
    words = words.to(gl.uint32, bitcast=True)
    if BITS == 3:
        tile_ptr, r = _tile_rows(qw_ptr, tile, step, K, BITS, WG, high_layout)
        high_row: gl.constexpr = 8 * (BITS - width)
        col = gl.arange(0, high_row, layout=gl.SliceLayout(0, high_layout))
        high = gl.load((tile_ptr + 256 * width + r * high_row)[:, None] + col[None, :], eviction_policy="evict_first")
        high = high.to(gl.uint32, bitcast=True)
    else:
        high = words
    n0 = tile * (TILE_OUTPUTS * WG)
    s0, zw0, zx0 = _load_group(s_ptr, qz_ptr, step, n0, N, 0, BITS, WG, w_layout)
    s1, zw1, zx1 = _load_group(s_ptr, qz_ptr, step, n0, N, 1, BITS, WG, w_layout)
    return words, high, s0, zw0, zx0, s1, zw1, zx1


@gluon.jit
def _weights(loaded, tile, BITS: gl.constexpr, OFFSET: gl.constexpr, DTYPE: gl.constexpr, WG: gl.constexpr,
             w_layout: gl.constexpr, a_layout: gl.constexpr):
    """A step's weights [64·WG outputs, 128 inputs] in wgmma's A register layout, without moving data:
    [8w + g, 8c + t, h, J & 1, J >> 1] is output 16w + 8(J & 1) + g, input 16t + 8(J >> 1) + 2c + h.
    The words are first made one per step (and per two pairs: `first` for J < 2, `second`), in the
    thread that loaded them: a 2-bit word holds steps 2u and 2u + 1 (the second 8 bits up), a
    high bits' word four (4 bits apart), 8-bit steps take two words each."""
    words, high, s0, zw0, zx0, s1, zw1, zx1 = loaded
    rows: gl.constexpr = 32 * WG
    if BITS == 2 or BITS == 3:
        words = gl.convert_layout(gl.reshape(gl.join(words, words >> 8), (rows, 32)), w_layout, assert_trivial=True)
    if BITS == 3:
        high = gl.reshape(gl.join(gl.join(high, high >> 8), gl.join(high >> 4, high >> 12)), (rows, 32))
        high = gl.convert_layout(high, w_layout, assert_trivial=True)
    if BITS == 8:
        first, second = gl.split(gl.reshape(words, (rows, 32, 2)))
        first = gl.convert_layout(first, w_layout, assert_trivial=True)
        second = gl.convert_layout(second, w_layout, assert_trivial=True)
    else:
        first = words
        second = words
    n0 = tile * (TILE_OUTPUTS * WG)
    zn0, shi0, slo0 = _group_pairs(s0, zw0, zx0, n0, 0, BITS, OFFSET, DTYPE, WG, w_layout)
    zn1, shi1, slo1 = _group_pairs(s1, zw1, zx1, n0, 1, BITS, OFFSET, DTYPE, WG, w_layout)
    c = gl.join(gl.join(_pair_weights(first, high, zn0, shi0, slo0, 0, BITS, DTYPE),
                        _pair_weights(first, high, zn1, shi1, slo1, 1, BITS, DTYPE)),
                gl.join(_pair_weights(second, high, zn0, shi0, slo0, 2, BITS, DTYPE),
                        _pair_weights(second, high, zn1, shi1, slo1, 3, BITS, DTYPE)))
    c = gl.permute(gl.reshape(c, (4 * WG, 8, 4, 8, 2, 2, 2)), (0, 5, 1, 3, 6, 2, 4))
    return gl.convert_layout(gl.reshape(c, (TILE_OUTPUTS * WG, BLOCK_K)), a_layout, assert_trivial=True)


@gluon.jit
def _first_x_tiles(x_smem, x_ptrs, x_mask, ITERS: gl.constexpr):
    """x's first tiles on their way, one copy group each."""
    for i in gl.static_range(X_STAGES - 1):
        if i < ITERS:
            async_copy.async_copy_global_to_shared(x_smem.index(i), x_ptrs + i * BLOCK_K, mask=x_mask)
        async_copy.commit_group()


@gluon.jit
def _fragments_matmul_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, p_ptr, y_ptr, lock_ptr, M, N, K, stride_x,
                             BITS: gl.constexpr, OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, BM: gl.constexpr,
                             ITERS: gl.constexpr, SPLIT: gl.constexpr, LAST_SUMS: gl.constexpr, AHEAD: gl.constexpr,
                             WG: gl.constexpr, SWIGLU: gl.constexpr, PDL: gl.constexpr):
    """y = x Ŵᵀ + bias for the 64·WG outputs of program_id(0) (WG warpgroups, each the layout's
    64-output tile of its own, sharing x's tiles) and the BM rows of program_id(2) over ITERS
    128-input steps from program_id(1)·ITERS; with SPLIT > 1 the partial sums p[split], which
    with LAST_SUMS the tile's last program adds up in split order (lock_ptr: one counter per tile
    of outputs and rows, left at zero); with SWIGLU, y = silu(gate)·up of outputs interleaved as
    (gate, up) pairs, [M, N/2]. With PDL (a programmatic dependent launch) it loads its first
    steps' weights and dequantizes the first before it waits for the kernel before it (which may
    still be writing x, or reading memory y reuses), then lets the next kernel launch."""
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    OUTPUTS: gl.constexpr = TILE_OUTPUTS * WG
    warps: gl.constexpr = 4 * WG
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                                         instr_shape=[16, BM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    # a thread's eight words of a step: row 8w + g, columns 8c … 8c + 7 (lane 4g + c)
    w_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[8, 4],
                                              warps_per_cta=[warps, 1], order=[1, 0])
    # as loaded: a thread's 2b words of a step's first plane (at 2 bits each holds two steps), and
    # at 3 bits its two words of high bits
    width: gl.constexpr = first_plane_width(BITS)
    load_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 2 * width], threads_per_warp=[8, 4],
                                                 warps_per_cta=[warps, 1], order=[1, 0])
    high_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 2], threads_per_warp=[8, 4],
                                                 warps_per_cta=[warps, 1], order=[1, 0])
    x_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                              warps_per_cta=[warps, 1], order=[1, 0])
    x_smem = gl.allocate_shared_memory(dtype, [X_STAGES, BM, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BM, BLOCK_K], dtype))
    tile = gl.program_id(0)
    split = gl.program_id(1)
    first = split * ITERS
    m0 = gl.program_id(2) * BM
    m_x = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, x_layout))
    k_x = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_ptrs = x_ptr + m_x[:, None] * stride_x + first * BLOCK_K + k_x[None, :]
    x_mask = (m_x < M)[:, None]
    if not PDL:
        _first_x_tiles(x_smem, x_ptrs, x_mask, ITERS)
    # the loop is unrolled, so `loaded` (step j's loads at index j) is a list at compile time:
    # each step's words are asked for AHEAD steps before they are dequantized
    loaded = ()
    for j in gl.static_range(AHEAD + 1):
        if j < ITERS:
            loaded = loaded + (_load_step(qw_ptr, s_ptr, qz_ptr, tile, first + j, N, K, BITS, WG, load_layout,
                                          high_layout, w_layout),)
    a = _weights(loaded[0], tile, BITS, OFFSET, dtype, WG, w_layout, a_layout)
    acc = gl.zeros([OUTPUTS, BM], gl.float32, acc_layout)
    if PDL:  # the weights are constants: only x and what this kernel writes wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        _first_x_tiles(x_smem, x_ptrs, x_mask, ITERS)
    for i in gl.static_range(ITERS):
        async_copy.wait_group(X_STAGES - 2)  # x's tile of step i has landed
        fence_async_shared()
        _barrier()
        acc = warpgroup_mma(a, x_smem.index(i % X_STAGES).permute((1, 0)), acc, is_async=True)
        if i + 1 < ITERS:
            a_next = _weights(loaded[i + 1], tile, BITS, OFFSET, dtype, WG, w_layout, a_layout)  # while step i's wgmma runs
            if i + AHEAD + 1 < ITERS:
                loaded = loaded + (_load_step(qw_ptr, s_ptr, qz_ptr, tile, first + i + AHEAD + 1, N, K, BITS, WG,
                                              load_layout, high_layout, w_layout),)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        if i + X_STAGES - 1 < ITERS:  # into the buffer step i - 1 read
            async_copy.async_copy_global_to_shared(x_smem.index((i + X_STAGES - 1) % X_STAGES),
                                                   x_ptrs + (i + X_STAGES - 1) * BLOCK_K, mask=x_mask)
        async_copy.commit_group()
        if i + 1 < ITERS:
            a = a_next
    n = tile * OUTPUTS + gl.arange(0, OUTPUTS, layout=gl.SliceLayout(1, acc_layout))
    m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, acc_layout))
    at = m[None, :] * N + n[:, None]
    mask = (m < M)[None, :]
    if SPLIT > 1:
        gl.store(p_ptr + split * M * N + at, acc, mask=mask)
    # with SWIGLU the outputs are added up, biased and rounded in pair_layout, where a thread holds
    # both of a (gate, up) pair
    pair_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[2, 1], threads_per_warp=[16, 2],
                                                 warps_per_cta=[1, warps], order=[0, 1])
    out_layout: gl.constexpr = pair_layout if SWIGLU else acc_layout
    if LAST_SUMS:
        _barrier()  # every thread's partial sums precede the count
        lock = lock_ptr + gl.program_id(2) * gl.num_programs(0) + tile
        if gl.atomic_add(lock, 1, sem="acq_rel") == SPLIT - 1:
            _add_up_and_store(p_ptr, y_ptr, b_ptr, tile * OUTPUTS, m0, M, N, OUTPUTS, BM, SPLIT, HAS_BIAS, SWIGLU,
                              out_layout)
            gl.atomic_xchg(lock, 0)
    if SPLIT == 1:
        if SWIGLU:
            acc = gl.convert_layout(acc, pair_layout)
            n = tile * OUTPUTS + gl.arange(0, OUTPUTS, layout=gl.SliceLayout(1, pair_layout))
            m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, pair_layout))
        _store_outputs(acc, n, m, y_ptr, b_ptr, M, N, HAS_BIAS, SWIGLU)


@gluon.jit
def _add_up_and_store(p_ptr, y_ptr, b_ptr, n0, m0, M, N, OUTPUTS: gl.constexpr, BM: gl.constexpr,
                      SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, SWIGLU: gl.constexpr, layout: gl.constexpr):
    """The partial sums p [SPLIT, M, N] of outputs n0 … and rows m0 … added up in split order (the
    same sums whoever arrives last), read in `layout`, and stored (_store_outputs)."""
    n = n0 + gl.arange(0, OUTPUTS, layout=gl.SliceLayout(1, layout))
    m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, layout))
    at = m[None, :] * N + n[:, None]
    mask = (m < M)[None, :]
    acc = gl.zeros([OUTPUTS, BM], gl.float32, layout)
    for s in gl.static_range(SPLIT):
        acc += gl.load(p_ptr + s * M * N + at, mask=mask, other=0.0, cache_modifier=".cg")
    _store_outputs(acc, n, m, y_ptr, b_ptr, M, N, HAS_BIAS, SWIGLU)


@gluon.jit
def _pairs(t, OUTPUTS: gl.constexpr, BM: gl.constexpr):
    """[OUTPUTS, BM] → its even and its odd rows, [OUTPUTS/2, BM] each (a thread's own two values)."""
    return gl.split(gl.permute(gl.reshape(t, [OUTPUTS // 2, 2, BM]), (0, 2, 1)))


@gluon.jit
def _store_outputs(acc, n, m, y_ptr, b_ptr, M, N, HAS_BIAS: gl.constexpr, SWIGLU: gl.constexpr):
    """acc [outputs n, rows m] (float32 sums) plus the bias, rounded to y's dtype, into y [M, N];
    with SWIGLU silu(gate)·up of the interleaved (gate, up) outputs into y [M, N/2], rounded as
    quant.qlinear.interleaved_swiglu's torch form rounds them."""
    dtype: gl.constexpr = y_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += gl.load(b_ptr + n).to(gl.float32)[:, None]
    y = acc.to(dtype)
    if SWIGLU:
        OUTPUTS: gl.constexpr = acc.shape[0]
        BM: gl.constexpr = acc.shape[1]
        at, _ = _pairs(m[None, :] * (N // 2) + n[:, None] // 2, OUTPUTS, BM)
        inside, _ = _pairs((m[None, :] < M) & (n[:, None] >= 0), OUTPUTS, BM)  # the row mask over the whole tile
        gate, up = _pairs(y, OUTPUTS, BM)
        g = gate.to(gl.float32)
        act = (g / (1.0 + gl.exp(-g))).to(dtype)
        gl.store(y_ptr + at, (act.to(gl.float32) * up.to(gl.float32)).to(dtype), mask=inside)
    else:
        gl.store(y_ptr + m[None, :] * N + n[:, None], y, mask=(m < M)[None, :])


def fragments_tiling(M: int, N: int, K: int) -> tuple[int, int, int]:
    """(rows per program, K-splits, warpgroups per program) for M rows of an N × K layer.

    Up to 32 rows, a program takes them all as wgmma's N (8, 16 or 32), and K-splits (1-8) are
    doubled while the layer has fewer than 256 programs (512 for 8 rows or fewer) and each split
    keeps at least four 128-input steps (two for 8 rows): over Qwen3-1.7B's six layer shapes at 1,
    4, 8, 32 and 64 rows on an H200 that picked the fastest of splits 1-8 on 24 of 30 and was within
    5% elsewhere (results/engine/fragments_splits.json): fewer programs leave SMs idle, shorter
    splits spend their time on a program's fixed cost and on adding up the sums.

    At 33-64 rows one program takes all the rows, reading each weight once instead of twice, where
    that still makes 96 programs with splits of at least twelve steps (doubled while fewer than 128):
    the large layers (gate/up fused or not, down_proj), which took 2-37% less time so at every width
    on an H100 (results/engine/fragments_splits_{8,4,3,2}bit_h100.json). The smaller ones keep programs
    of 32 rows, which fill the GPU where one of 64 leaves it half idle."""
    if not 0 < M <= MAX_ROWS:
        raise ValueError(f"fragments_matmul takes 1 to {MAX_ROWS} rows, got {M}")
    tiles, steps = N // TILE_N, K // TILE_K
    if M > ROW_BLOCK:
        split = _k_split(tiles, steps, target=128, min_steps=12)
        if tiles * split >= 96:
            return MAX_ROWS, split, 1
    rows = min(ROW_BLOCK, max(8, triton.next_power_of_2(M)))
    target, min_steps = (512, 2) if M <= 8 else (256, 4)
    return rows, _k_split(tiles * triton.cdiv(M, rows), steps, target, min_steps), 1


def _k_split(programs: int, steps: int, target: int, min_steps: int) -> int:
    """K-splits doubled from one while the layer has fewer than `target` programs (`programs` per
    split) and each split keeps whole steps, at least min_steps of them."""
    split = 1
    while (split < MAX_SPLIT and steps % (2 * split) == 0 and steps // (2 * split) >= min_steps
           and programs * split < target):
        split *= 2
    return split


def fragments_locks(N: int, device: torch.device | str) -> torch.Tensor:
    """fragments_matmul's arrival counters for a layer of N outputs (up to 64 rows in programs of
    at least 8): zeros, left as found."""
    return torch.zeros(MAX_ROWS // 8 * (N // TILE_N), dtype=torch.int32, device=device)


def fragments_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     bits: int, zero_offset: int, bias: torch.Tensor | None = None, locks: torch.Tensor | None = None,
                     split_k: int | None = None, rows_per_program: int | None = None,
                     load_ahead: int = LOAD_AHEAD, warpgroups: int | None = None, swiglu: bool = False,
                     pdl: bool = False) -> torch.Tensor:
    """x [M ≤ 64, K] (bf16 or fp16) times a 2-, 3-, 4- or 8-bit qweight in the fragments layout (groups of 128):
    [M, N] in x's dtype; with `swiglu`, silu(gate)·up of outputs interleaved as (gate, up) pairs, [M, N/2],
    applied as the outputs are stored. With `locks` (fragments_locks) K-splits are added up inside the kernel, else afterwards.
    The loads of a step's words are issued `load_ahead` steps before they are dequantized; split_k,
    rows_per_program and warpgroups override fragments_tiling's choice. `pdl` launches it as a
    programmatic dependent launch (kernels.launch.pdl_supported), its weights read before it waits."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fragments_matmul takes bf16 or fp16 activations, got {x.dtype}")
    M, K = x.shape
    N = qweight.shape[1]
    planes(bits)  # a width the layout holds
    if qweight.shape[0] * 32 != K * bits:
        raise ValueError(f"fragments_matmul: a {bits}-bit qweight of {K} inputs has {K * bits // 32} rows, "
                         f"got {qweight.shape[0]}")
    if x.stride(1) != 1 or x.stride(0) % 8:
        x = x.contiguous()
    rows, split, wg = fragments_tiling(M, N, K)
    split, bm, wg = split_k or split, rows_per_program or rows, warpgroups or wg
    steps = K // TILE_K
    if steps % split:
        raise ValueError(f"fragments_matmul: {split} K-splits of {steps} 128-input steps")
    if wg not in WARPGROUPS or N % (TILE_N * wg):
        raise ValueError(f"fragments_matmul: programs of {wg} warpgroups (one of {WARPGROUPS}, {TILE_N} outputs "
                         f"each) do not tile {N} outputs")
    inside = split > 1 and locks is not None
    programs = (N // (TILE_N * wg)) * triton.cdiv(M, bm)
    if inside and locks.numel() < programs:
        raise ValueError(f"fragments_matmul needs {programs} locks for {M} rows in programs of {bm}, "
                         f"got {locks.numel()}")
    finished = split == 1 or inside  # the kernel writes the outputs
    y = torch.empty(M, N // 2 if swiglu and finished else N, device=x.device, dtype=x.dtype)
    partial = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    fuse_bias = bias is not None and finished
    _fragments_matmul_kernel[(N // (TILE_N * wg), split, triton.cdiv(M, bm))](
        x, qweight, scales, qzeros, bias if fuse_bias else y, partial, y, locks if inside else y, M, N, K, x.stride(0),
        BITS=bits, OFFSET=zero_offset, HAS_BIAS=fuse_bias, BM=bm, ITERS=steps // split,
        SPLIT=split, LAST_SUMS=inside, AHEAD=load_ahead, WG=wg, SWIGLU=swiglu and finished, PDL=pdl, num_warps=4 * wg,
        **launch_options(pdl))
    if finished:
        return y
    y = (partial.sum(0) if bias is None else partial.sum(0) + bias.float()).to(x.dtype)
    return interleaved_swiglu(y) if swiglu else y


def compile_fragments_matmul_for(M: int, N: int, K: int, dtype: str = "bf16", arch: int = 90,
                                 load_ahead: int = LOAD_AHEAD, bits: int = 4, warpgroups: int | None = None,
                                 swiglu: bool = False, pdl: bool = False):
    """_fragments_matmul_kernel as fragments_matmul launches it (K-splits added up inside, no bias;
    `warpgroups` overrides the tiling's), compiled for sm_<arch> without a GPU
    (benchmarks/kernel_asm.py and the tests read its SASS)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    act = "*" + dtype
    pointers = {"x_ptr": act, "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "b_ptr": act, "p_ptr": "*fp32",
                "y_ptr": act, "lock_ptr": "*i32"}
    scalars = {"M": "i32", "N": "i32", "K": "i32", "stride_x": "i32"}
    rows, split, wg = fragments_tiling(M, N, K)
    wg = warpgroups or wg
    constants = dict(BITS=bits, OFFSET=1, HAS_BIAS=False, BM=rows, ITERS=K // TILE_K // split, SPLIT=split,
                     LAST_SUMS=split > 1, AHEAD=load_ahead, WG=wg, SWIGLU=swiglu, PDL=pdl)
    return compile_for(_fragments_matmul_kernel, arch, pointers, scalars, constants, source_type=GluonASTSource,
                       num_warps=4 * wg, **launch_options(pdl))


# A custom op, as the other products (kernels.ops): torch.compile treats it as one call; the locks
# come back as they were (zeros), so it declares no mutation.
@torch.library.custom_op("qrobust::fragments_matmul", mutates_args=())
def fragments_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                        bias: torch.Tensor | None, locks: torch.Tensor | None, bits: int,
                        zero_offset: int, swiglu: bool = False, pdl: bool = False) -> torch.Tensor:
    return fragments_matmul(x, qweight, scales, qzeros, bits, zero_offset, bias, locks, swiglu=swiglu, pdl=pdl)


@fragments_matmul_op.register_fake
def _(x, qweight, scales, qzeros, bias, locks, bits, zero_offset, swiglu=False, pdl=False):
    return x.new_empty(x.shape[0], qweight.shape[1] // (2 if swiglu else 1))
