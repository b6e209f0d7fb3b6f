"""A candidate for the batched packed product: Triton's loop, with the tensor cores' work overlapped.

Triton's kernel (kernels.packed_matmul) runs each 128-input step as a chain: dequantize the weight
tile, store it to shared memory, barrier, wgmma, wait for the wgmma, barrier. Under Nsight Compute
(benchmarks/product_profile.py) its warps wait a little on everything and DRAM stays 3-12% busy:
the chain is the cost. This Gluon kernel (Triton's explicit-layout language) keeps the same work
but orders it by hand: the wgmma of step i is issued asynchronously and waited for only after the
weights of step i + 1 are dequantized, into the other of two weight buffers; x's tiles arrive by
asynchronous copies into a ring of three, the packed words by plain loads two steps ahead. Each
thread loads whole words and dequantizes the codes of each (float32, as the library does), and
the weight tile goes to shared memory as [outputs, inputs], so a thread's eight codes of a word
are one 16-byte store. GPTQ's layout at 2, 4 and 8 bits, inputs in group order, 64-row tiles
(wgmma), K-splits added up afterwards.

On a CUDA GPU with wgmma (Hopper), this script checks it against the dequantized weight and times it
(CUDA graphs of 20 calls) against bf16 nn.Linear and the library's product with its K-splits added
up afterwards too (the same reduction) and inside (the library's default), at Qwen3-1.7B's layer
shapes. Without a GPU, --compile-only prints what it compiles to for sm_90.

Measured on an H200 (results/engine/gluon_wgmma_probe.json, 4 bits, 32 and 64 rows, 4 or 8
K-splits): correct (largest difference 0.3% of the largest output: bf16 rounding), and at its
best split 0.97-1.14x the time of the library's product with the same reduction afterwards,
0.98-1.35x that of the library's default. Overlapping the tensor cores' work gains nothing: the
wgmma was not what each step waited for (Nsight Compute: its waits on wgmma are 0.01 cycles per
instruction). So qrobust does not use it.

    python benchmarks/gluon_wgmma_probe.py --out "$OUT"      # on a Hopper GPU
    python benchmarks/gluon_wgmma_probe.py --compile-only    # anywhere, with a Linux x86-64 Triton
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

GROUP_SIZE = 128
BLOCK_M = gl.constexpr(64)  # wgmma's row tile
BLOCK_K = gl.constexpr(128)  # inputs per step
X_STAGES = gl.constexpr(3)  # x's tiles in flight or in use
# the barrier of all of a program's threads: thread_barrier up to Triton 3.6, barrier after
_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@gluon.jit
def _codes(words, j: gl.constexpr, BITS: gl.constexpr):
    return (words >> (j * BITS)) & ((1 << BITS) - 1)


@gluon.jit
def _dequantized(words, s, z, j: gl.constexpr, BITS: gl.constexpr, dtype: gl.constexpr):
    """Code j of each word as a weight: 2²³ + q as a float, less 2²³ + z, times the scale."""
    q = (_codes(words, j, BITS) | 0x4B000000).to(gl.float32, bitcast=True)
    return (s * (q - z)).to(dtype)


@gluon.jit
def _weight_tile_nk(words, s, z, BITS: gl.constexpr, dtype: gl.constexpr):
    """words [KW, BN] (32/b codes each) → weights [BN, KW·32/b], input 32/b·r + j at column r·32/b + j:
    joined in the thread that holds the word, so its codes are consecutive columns."""
    if BITS == 8:
        c = gl.join(gl.join(_dequantized(words, s, z, 0, BITS, dtype), _dequantized(words, s, z, 2, BITS, dtype)),
                    gl.join(_dequantized(words, s, z, 1, BITS, dtype), _dequantized(words, s, z, 3, BITS, dtype)))
        c = gl.permute(c, (1, 0, 2, 3))  # [BN, KW, j's bit 1, j's bit 0]: the last join is the lowest bit
    elif BITS == 4:
        c = gl.join(gl.join(gl.join(_dequantized(words, s, z, 0, BITS, dtype), _dequantized(words, s, z, 4, BITS, dtype)),
                            gl.join(_dequantized(words, s, z, 2, BITS, dtype), _dequantized(words, s, z, 6, BITS, dtype))),
                    gl.join(gl.join(_dequantized(words, s, z, 1, BITS, dtype), _dequantized(words, s, z, 5, BITS, dtype)),
                            gl.join(_dequantized(words, s, z, 3, BITS, dtype), _dequantized(words, s, z, 7, BITS, dtype))))
        c = gl.permute(c, (1, 0, 2, 3, 4))
    else:
        gl.static_assert(BITS == 2)
        lo = gl.join(gl.join(gl.join(_dequantized(words, s, z, 0, BITS, dtype), _dequantized(words, s, z, 8, BITS, dtype)),
                             gl.join(_dequantized(words, s, z, 4, BITS, dtype), _dequantized(words, s, z, 12, BITS, dtype))),
                     gl.join(gl.join(_dequantized(words, s, z, 2, BITS, dtype), _dequantized(words, s, z, 10, BITS, dtype)),
                             gl.join(_dequantized(words, s, z, 6, BITS, dtype), _dequantized(words, s, z, 14, BITS, dtype))))
        hi = gl.join(gl.join(gl.join(_dequantized(words, s, z, 1, BITS, dtype), _dequantized(words, s, z, 9, BITS, dtype)),
                             gl.join(_dequantized(words, s, z, 5, BITS, dtype), _dequantized(words, s, z, 13, BITS, dtype))),
                     gl.join(gl.join(_dequantized(words, s, z, 3, BITS, dtype), _dequantized(words, s, z, 11, BITS, dtype)),
                             gl.join(_dequantized(words, s, z, 7, BITS, dtype), _dequantized(words, s, z, 15, BITS, dtype))))
        c = gl.permute(gl.join(lo, hi), (1, 0, 2, 3, 4, 5))
    BN: gl.constexpr = words.shape[1]
    return gl.reshape(c, (BN, words.shape[0] * (32 // BITS)))


@gluon.jit
def _load_group(qw_ptr, s_ptr, qz_ptr, k0, n, N, BITS: gl.constexpr, OFFSET: gl.constexpr, GS: gl.constexpr,
                KW: gl.constexpr, w_layout: gl.constexpr):
    """The packed words [KW, BN] of inputs k0 … and outputs n, with their group's scales and zero
    points (the zero point as 2²³ + z), as [1, BN] in the words' layout."""
    VPW: gl.constexpr = 32 // BITS
    rows = k0 // VPW + gl.arange(0, KW, layout=gl.SliceLayout(1, w_layout))
    nmask = n < N
    words = gl.load(qw_ptr + rows[:, None] * N + n[None, :], mask=nmask[None, :], other=0).to(gl.uint32, bitcast=True)
    g = k0 // GS
    s = gl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(gl.float32)
    zw = gl.load(qz_ptr + g * (N // VPW) + n // VPW, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    z = ((((zw >> ((n % VPW) * BITS).to(gl.uint32)) & ((1 << BITS) - 1)) + OFFSET) & ((1 << BITS) - 1))
    return words, s[None, :], (z.to(gl.float32) + 8388608.0)[None, :]


@gluon.jit
def _wgmma_matmul_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, p_ptr, M, N, K, k_split, BITS: gl.constexpr,
                         OFFSET: gl.constexpr, GS: gl.constexpr, BLOCK_N: gl.constexpr, ITERS: gl.constexpr):
    """Partial sums p[split] [M, N] of x [M, K] times Ŵᵀ over inputs split·k_split … (split + 1)·k_split − 1,
    in ITERS steps of BLOCK_K inputs (one group each at most)."""
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    KW: gl.constexpr = BLOCK_K * BITS // 32
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    x_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16], warps_per_cta=[4, 1],
                                              order=[1, 0])
    w_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[2, 16], warps_per_cta=[4, 1],
                                              order=[1, 0])
    x_smem = gl.allocate_shared_memory(dtype, [X_STAGES, BLOCK_M, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype))
    w_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype))
    split = gl.program_id(2)
    k_first = split * k_split
    m_x = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
    k_x = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_ptrs = x_ptr + m_x[:, None] * K + k_first + k_x[None, :]
    x_mask = (m_x < M)[:, None]
    n_w = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, w_layout))
    for i in gl.static_range(X_STAGES - 1):  # x's first tiles on their way
        if i < ITERS:
            async_copy.async_copy_global_to_shared(x_smem.index(i), x_ptrs + i * BLOCK_K, mask=x_mask)
        async_copy.commit_group()
    w0, s0, z0 = _load_group(qw_ptr, s_ptr, qz_ptr, k_first, n_w, N, BITS, OFFSET, GS, KW, w_layout)
    SECOND: gl.constexpr = BLOCK_K if ITERS > 1 else 0
    w1, s1, z1 = _load_group(qw_ptr, s_ptr, qz_ptr, k_first + SECOND, n_w, N, BITS, OFFSET, GS, KW, w_layout)
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    for i in gl.static_range(ITERS):
        # the weights of step i, into the buffer that step i - 2's wgmma (waited for below) read
        w_smem.index(i % 2).store(_weight_tile_nk(w0, s0, z0, BITS, dtype))
        async_copy.wait_group(X_STAGES - 2)  # x's tile of step i has landed
        fence_async_shared()
        _barrier()
        acc = warpgroup_mma(x_smem.index(i % X_STAGES), w_smem.index(i % 2).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # step i - 1's is done: its buffers are free
        if i + X_STAGES - 1 < ITERS:
            async_copy.async_copy_global_to_shared(x_smem.index((i + X_STAGES - 1) % X_STAGES),
                                                   x_ptrs + (i + X_STAGES - 1) * BLOCK_K, mask=x_mask)
        async_copy.commit_group()
        w0, s0, z0 = w1, s1, z1
        if i + 2 < ITERS:
            w1, s1, z1 = _load_group(qw_ptr, s_ptr, qz_ptr, k_first + (i + 2) * BLOCK_K, n_w, N, BITS, OFFSET, GS,
                                     KW, w_layout)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    m_c = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    n_c = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    gl.store(p_ptr + split * M * N + m_c[:, None] * N + n_c[None, :], acc,
             mask=(m_c < M)[:, None] & (n_c < N)[None, :])


def wgmma_matmul(x: torch.Tensor, layer, split_k: int, partial: torch.Tensor | None = None,
                 block_n: int = 64) -> torch.Tensor:
    """x [M ≤ 64·tiles, K] times a QuantLinear's packed weight (GPTQ layout, inputs in group order): [M, N]."""
    from qrobust.quant.qlinear import FORMAT_OFFSET

    M, K = x.shape
    N = layer.out_features
    if K % (split_k * BLOCK_K.value):
        raise ValueError(f"gluon_wgmma_probe: {split_k} splits of {K} inputs are not whole {BLOCK_K.value}-input steps")
    partial = torch.empty(split_k, M, N, device=x.device, dtype=torch.float32) if partial is None else partial
    grid = (triton.cdiv(M, BLOCK_M.value), triton.cdiv(N, block_n), split_k)
    _wgmma_matmul_kernel[grid](x, layer.qweight, layer.scales, layer.qzeros, partial, M, N, K, K // split_k,
                               BITS=layer.spec.bits, OFFSET=FORMAT_OFFSET[layer.format], GS=layer.spec.group_size,
                               BLOCK_N=block_n, ITERS=K // split_k // BLOCK_K.value, num_warps=4)
    return (partial[0] if split_k == 1 else partial.sum(0)).to(x.dtype)


def compile_for_sm90(bits: int, K: int = 2048, split_k: int = 4, block_n: int = 64):
    from triton.experimental.gluon._runtime import GluonASTSource

    from qrobust.kernels.launch import compile_for

    pointers = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "p_ptr": "*fp32"}
    scalars = {"M": "i32", "N": "i32", "K": "i32", "k_split": "i32"}
    constants = dict(BITS=bits, OFFSET=1, GS=GROUP_SIZE, BLOCK_N=block_n, ITERS=K // split_k // BLOCK_K.value)
    return compile_for(_wgmma_matmul_kernel, 90, pointers, scalars, constants, source_type=GluonASTSource,
                       num_warps=4)


def compile_only(bits_list: tuple[int, ...]) -> list[dict]:
    from kernel_asm import MATMUL_OPCODES, cuobjdump, main_loop, sass_facts

    rows = []
    for bits in bits_list:
        cubin = compile_for_sm90(bits).asm["cubin"]
        ops, resources = sass_facts(cubin)
        sass = cuobjdump(cubin, "-sass")
        rows.append({"bits": bits, **resources, **{op: ops.get(op, 0) for op in MATMUL_OPCODES},
                     "sass_instructions": sum(ops.values()), "wgmma_waits": sass.count("WARPGROUP.DEPBAR"),
                     "loop_instructions": len(main_loop(sass))})
        print(rows[-1], flush=True)
    return rows


def measure(bits_list: tuple[int, ...], rows_list: tuple[int, ...], splits: tuple[int, ...]) -> list[dict]:
    from engine_gpu import Plan, config, layer_shapes, packed_like
    from gpu_script import graph_time
    from qrobust.kernels.packed_matmul import matmul_locks, packed_matmul
    from qrobust.quant.qlinear import FORMAT_OFFSET

    out = []
    for name, (K, N) in layer_shapes(config(Plan(), "ar")).items():
        dense = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        for bits in bits_list:
            layer = packed_like(dense, bits, GROUP_SIZE)
            w = layer.dequantized_weight().to(torch.bfloat16)
            locks = matmul_locks(N, "cuda")
            args = (layer.qweight, layer.scales, layer.qzeros, None, bits, GROUP_SIZE, FORMAT_OFFSET[layer.format])
            for m in rows_list:
                x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    us = {"bf16": 1e6 * graph_time(functools.partial(dense, x)),
                          "triton": 1e6 * graph_time(functools.partial(packed_matmul, x, *args, locks=locks)),
                          "triton, sums afterwards": 1e6 * graph_time(functools.partial(packed_matmul, x, *args))}
                    ref = x.float() @ w.float().t()
                    for split_k in splits:
                        if K % (split_k * BLOCK_K.value):
                            continue
                        partial = torch.empty(split_k, m, N, device="cuda", dtype=torch.float32)
                        err = ((wgmma_matmul(x, layer, split_k).float() - ref).abs().max() / ref.abs().max()).item()
                        t = 1e6 * graph_time(functools.partial(wgmma_matmul, x, layer, split_k, partial))
                        row = {"layer": name, "K": K, "N": N, "bits": bits, "rows": m, "split_k": split_k,
                               "max_rel_error": err, "us_gluon": t, **{f"us_{k}": v for k, v in us.items()}}
                        out.append(row)
                        print(f"{name:>12} {bits}-bit {m:>3} rows split {split_k:>2}: gluon {t:6.2f} us, bf16 "
                              f"{us['bf16']:6.2f}, triton {us['triton']:6.2f} (sums afterwards "
                              f"{us['triton, sums afterwards']:6.2f}), error {err:.1e}", flush=True)
            del layer, w
        del dense
    return out


def main() -> None:
    from gpu_script import probe_arguments, run_probe

    args = probe_arguments(__doc__.splitlines()[0], bits="4,2", rows="64,32")
    if args.compile_only:
        compile_only(args.bits)
        return
    run_probe(args, "gluon_wgmma_probe", measure)


if __name__ == "__main__":
    main()
