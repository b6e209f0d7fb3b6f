"""x Ŵᵀ for the batch sizes of batched decoding (5 to 64 rows), reading the packed weight once.

Between the GEMV (a few rows) and dequantize-then-matmul (prefill), a batch of decoding rows is
still memory bound: what matters is reading the packed words once and keeping enough programs
in flight. Each program dequantizes its [BLOCK_K, BLOCK_N] weight tiles in registers on their
way to tl.dot (as kernels.dequant's fused matmul does, with kernels.layouts' unpacking helpers)
over one of SPLIT_K slices of the inputs. With several slices each program stores its float32 partial
sums and the last of a tile's programs to finish (an arrival counter per tile, `locks`) adds them
up, adds the bias and writes y in x's dtype: one kernel per product, where adding the slices up
afterwards took two more (a sum and a cast, each as long as a small matmul inside a CUDA graph).
packed_matmul_tiling picks the tiles and the split: each program reads a few hundred inputs,
and a layer of Qwen3-1.7B's shape (N of 1024 to 6144) has at least one program per SM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# the weight tile the fused matmul reads too (Triton resolves a kernel's callees among its module's globals)
from qrobust.kernels.launch import block_k, compile_for, last_to_arrive
from qrobust.kernels.layouts import _pair_weight_tile, _weight_tile, pairs_apply


@triton.jit
def _split_matmul_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr, b_ptr, p_ptr, y_ptr, lock_ptr, M, N, K, k_split,
                         stride_x, BITS: tl.constexpr, LAYOUT: tl.constexpr, OFFSET: tl.constexpr,
                         GS: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, LAST_SUMS: tl.constexpr, IN_THREAD: tl.constexpr,
                         PAIRS: tl.constexpr, PRECISION: tl.constexpr):
    """y of rows m and outputs n over inputs split·k_split … (split + 1)·k_split − 1: with
    SPLIT_K > 1, the partial sums p[split], which with LAST_SUMS the tile's last program adds
    up into y."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    mmask, nmask = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(split * k_split, (split + 1) * k_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=mmask[:, None], other=0.0)
        if PAIRS:
            w = _pair_weight_tile(qw_ptr, s_ptr, qz_ptr, k0, n, nmask[None, :], N, BITS, OFFSET, GS, BLOCK_K,
                                  BLOCK_N, a.dtype)
        else:
            w = _weight_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, k0, n, nmask[None, :], N, BITS, LAYOUT, OFFSET, GS,
                             ACT_ORDER, BLOCK_K, BLOCK_N, IN_THREAD)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    tile = m[:, None] * N + n[None, :]
    tmask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + tile, acc.to(y_ptr.dtype.element_ty), mask=tmask)
    else:
        tl.store(p_ptr + split * M * N + tile, acc, mask=tmask)
        if LAST_SUMS:
            lock = lock_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            if last_to_arrive(lock, SPLIT_K):
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):  # in split order: the same sums whoever arrives last
                    total += tl.load(p_ptr + s * M * N + tile, mask=tmask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + tile, total.to(y_ptr.dtype.element_ty), mask=tmask)
                tl.atomic_xchg(lock, 0)


@dataclass(frozen=True)
class MatmulTiling:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    codes_in_thread: bool = False  # layouts._unpack_tile's IN_THREAD
    # layouts._pair_weight_tile where pairs_apply, else the float32 weight tile. Off by default: half the
    # arithmetic per weight, and no faster (results/engine/engine_tiles_pairs.json)
    half_pairs: bool = False


# Tile-grid sweeps on an H200 (benchmarks/engine_breakdown.py --parts tiles, results/engine/engine_tiles.json)
# put every Qwen3-1.7B shape's best split where each program reads 512 to 768 inputs, with at least
# 128 programs (about one per SM), in 128-input tiles.
MAX_INPUTS_PER_PROGRAM = 768
MIN_PROGRAMS = 128


def packed_matmul_tiling(M: int, N: int, K: int, group_size: int, act_order: bool, bits: int = 4,
                         wgmma: bool = False) -> MatmulTiling:
    """Row tiles of 16 to 64 (tl.dot's minimum is 16), 64 outputs by 128 inputs per tile (less where
    the group size or K asks), and K split into whole tiles until each program reads at most
    MAX_INPUTS_PER_PROGRAM inputs and there are at least MIN_PROGRAMS programs. At 4 bits, where
    the tiles run on Hopper's wgmma (`wgmma`: a Hopper GPU; row tiles of 64), each thread keeps
    its words' codes (codes_in_thread): the products 4-8% faster on most of Qwen3-1.7B's shapes
    (results/engine/engine_products_ab.json). At 2 and 8 bits (fewer wide stores per
    word, or more codes to join) and for mma.sync (narrower tiles) they are as fast or slower."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64
    bk = block_k(K, group_size, act_order, 128)
    programs = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    tiles = K // bk
    split = 1
    while tiles % (split * 2) == 0 and (K // split > MAX_INPUTS_PER_PROGRAM or programs * split < MIN_PROGRAMS):
        split *= 2
    return MatmulTiling(block_m, block_n, bk, split, num_warps=4, num_stages=3,
                        codes_in_thread=wgmma and block_m == 64 and bits == 4)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 inputs as float32 (Triton's default, TF32, rounds them to
    10-bit mantissas: a float32 model's packed layers fell outside float32 tolerance of its dense
    ones on a GPU); half precision as it is."""
    return "ieee" if dtype == torch.float32 else "tf32"


def arch_runs_wgmma(arch: int) -> bool:
    """Whether Triton's tl.dot runs Hopper's wgmma on sm_<arch> (for row tiles of 64)."""
    return arch // 10 == 9


@functools.cache  # packed_matmul asks on every product
def runs_wgmma(device: torch.device) -> bool:
    """arch_runs_wgmma for `device` (False off CUDA)."""
    if device.type != "cuda":
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return arch_runs_wgmma(10 * major + minor)


def matmul_locks(N: int, device: torch.device | str, max_rows: int = 64) -> torch.Tensor:
    """The arrival counters packed_matmul's K-split programs share for a layer of N outputs at up
    to max_rows rows (one per output tile of the narrowest tiling): zeros, which every call leaves
    as it found them. Products running at the same time (on several streams) need separate ones."""
    return torch.zeros(triton.cdiv(max_rows, 16) * triton.cdiv(N, 64), dtype=torch.int32, device=device)


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                  g_idx: torch.Tensor | None, bits: int, group_size: int, zero_offset: int,
                  bias: torch.Tensor | None = None, layout: str = "gptq",
                  tiling: MatmulTiling | None = None, locks: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] times the packed weight (GPTQ's qweight in `layout`, as gptq_matmul takes it): [M, N] in
    x's dtype. With `locks` (matmul_locks) K-splits are added up inside the kernel, else afterwards."""
    M, K = x.shape
    N = qweight.shape[1]
    x = x.contiguous()
    act_order = g_idx is not None
    t = tiling or packed_matmul_tiling(M, N, K, group_size, act_order, bits, runs_wgmma(x.device))
    if K % (t.split_k * t.block_k):
        raise ValueError(f"packed_matmul: {t.split_k} K-splits of {K} inputs are not whole tiles of {t.block_k}")
    grid = (triton.cdiv(M, t.block_m), triton.cdiv(N, t.block_n), t.split_k)
    last_sums = t.split_k > 1 and locks is not None
    if last_sums and locks.numel() < grid[0] * grid[1]:
        raise ValueError(f"packed_matmul needs {grid[0] * grid[1]} locks for {M} rows, got {locks.numel()}")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if t.split_k == 1 or last_sums else None
    partial = None if t.split_k == 1 else torch.empty((t.split_k, M, N), device=x.device, dtype=torch.float32)
    fuse_bias = bias is not None and (t.split_k == 1 or last_sums)
    out = y if y is not None else partial
    _split_matmul_kernel[grid](x, qweight, scales, qzeros, g_idx if act_order else scales,
                               bias if fuse_bias else out, out if partial is None else partial, out,
                               locks if last_sums else out, M, N, K, K // t.split_k, x.stride(0), BITS=bits,
                               LAYOUT=layout, OFFSET=zero_offset, GS=group_size, ACT_ORDER=act_order,
                               HAS_BIAS=fuse_bias, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                               SPLIT_K=t.split_k, LAST_SUMS=last_sums, IN_THREAD=t.codes_in_thread,
                               PAIRS=t.half_pairs and x.is_cuda and pairs_apply(bits, layout, act_order, x.dtype),
                               PRECISION=dot_precision(x.dtype),
                               num_warps=t.num_warps,
                               num_stages=t.num_stages)
    if y is not None:
        return y
    y = partial.sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def compile_packed_matmul_for(arch: int, M: int, N: int, K: int, bits: int, group_size: int = 128,
                              layout: str = "gptq", dtype: str = "bf16", tiling: MatmulTiling | None = None):
    """_split_matmul_kernel as packed_matmul launches it for M rows of a layer of K inputs and N
    outputs (no act-order, no bias, K-splits added up in the kernel), compiled for sm_<arch>
    without a GPU (benchmarks/kernel_asm.py --matmul)."""
    t = tiling or packed_matmul_tiling(M, N, K, group_size, False, bits, wgmma=arch_runs_wgmma(arch))
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    act = "*" + dtype
    pointers = {"x_ptr": act, "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "g_ptr": "*i32", "b_ptr": act,
                "p_ptr": "*fp32", "y_ptr": act, "lock_ptr": "*i32"}
    scalars = {"M": "i32", "N": "i32", "K": "i32", "k_split": "i32", "stride_x": "i32"}
    constants = dict(BITS=bits, LAYOUT=layout, OFFSET=1, GS=group_size, ACT_ORDER=False, HAS_BIAS=False,
                     BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLIT_K=t.split_k,
                     LAST_SUMS=t.split_k > 1, IN_THREAD=t.codes_in_thread,
                     PAIRS=t.half_pairs and pairs_apply(bits, layout, False, torch_dtype),
                     PRECISION=dot_precision(torch_dtype))
    return compile_for(_split_matmul_kernel, arch, pointers, scalars, constants, num_warps=t.num_warps,
                       num_stages=t.num_stages)


# A custom op, as the other products (kernels.ops): torch.compile treats it as one call.
# The locks come back as they were (zeros), so the op declares no mutation, as the GEMV op does.
@torch.library.custom_op("qrobust::packed_matmul", mutates_args=())
def packed_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     g_idx: torch.Tensor | None, bias: torch.Tensor | None, locks: torch.Tensor | None, bits: int,
                     group_size: int, zero_offset: int, layout: str = "gptq") -> torch.Tensor:
    return packed_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, zero_offset, bias, layout,
                         locks=locks)


@packed_matmul_op.register_fake
def _(x, qweight, scales, qzeros, g_idx, bias, locks, bits, group_size, zero_offset, layout="gptq"):
    return x.new_empty(x.shape[0], qweight.shape[1])
