"""The GEMV: y = x Ŵᵀ for a few rows of x (batch-1 decoding), reading GPTQ-packed weights as stored.

Memory bound: each program reads its outputs' packed words once and dequantizes them in
registers (kernels.gemv_tiles). gptq_gemv_add_norm adds a residual and applies an RMSNorm to x
first, in the same kernel (its prologue); gptq_gemv_split_sums leaves its K-splits' partial sums
for such a prologue to add up. With half2 (float16 x; 2, 4 and 8 bits, and 3 bits in the pairs
layout) the tiles sum two codes per instruction in float16, else one in float32. gemv_config
picks the tiling; compile_gemv_for compiles the kernel for a GPU on a machine without one
(benchmarks/kernel_asm.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qrobust.kernels.availability import interpreting
from qrobust.kernels.gemv_tiles import HALF2_ONE, ONE_BITS, _load_tile, _tile_sums
from qrobust.kernels.launch import block_k, compile_for, last_to_arrive, launch_options
from qrobust.kernels.layouts import _check_layout, half2_applies


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


def compile_gemv_for(arch: int, constants: dict, dtype: str = "fp16", num_warps: int = 8, num_stages: int = 3,
                     norm_dtype: str | None = None):
    """_gemv_kernel compiled for CUDA compute capability `arch` (×10) without a GPU, to read the
    code it becomes (benchmarks/kernel_asm.py; the PDL test): activations and outputs of Triton
    type `dtype`, norm weights of `norm_dtype` (default `dtype`), every pointer and integer
    16-byte aligned, `constants` the kernel's constexpr parameters (all of them), PDL's launch
    option where constants ask for it."""
    act = "*" + dtype
    pointers = {"x_ptr": act, "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "g_ptr": "*i32", "b_ptr": act,
                "p_ptr": "*fp32", "y_ptr": act, "lock_ptr": "*i32", "r_ptr": act, "nw_ptr": "*" + (norm_dtype or dtype),
                "h_ptr": act, "xn_ptr": act}
    scalars = {"N": "i32", "K": "i32", "k_split": "i32", "stride_x": "i32", "x_split_stride": "i32", "one": "u32",
               "eps": "fp32"}
    return compile_for(_gemv_kernel, arch, pointers, scalars, constants, num_warps=num_warps, num_stages=num_stages,
                       **launch_options(constants.get("PDL", False)))


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
