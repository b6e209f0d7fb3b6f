"""A candidate for the batched packed product, written in Gluon (Triton's explicit-layout language).

Triton's kernel (kernels.packed_matmul) dequantizes each weight tile in registers and then stores it
to shared memory, waits at a barrier and reads it back for the tensor cores, every 64 inputs and at
every width (`benchmarks/kernel_asm.py --matmul`). That is why it runs at the same speed at 2 bits
as at 8, at 0.4–0.9× of cuBLAS. Gluon lets the kernel name its layouts. Here each thread loads the
packed words of exactly the weights it holds in mma.sync's B fragment and dequantizes them in
place: no shared memory, no barrier. Only GPTQ's layout at 2, 4 and 8 bits, inputs in group order,
K-splits added up afterwards.

On a CUDA GPU, this script checks it against the dequantized weight and times it (CUDA graphs of
20 calls) against bf16 nn.Linear and the Triton product at Qwen3-1.7B's layer shapes and the
engine's row counts, for a few K-splits. Without a GPU, --compile-only prints what it compiles to
for sm_90 (mma.sync, global loads, no shared memory).

Measured on an H200 (results/engine/gluon_matmul_probe.json): correct, and at its best K-split
0.42-1.02x of the Triton product's speed. Each 64-input step waits for its own loads (one L2
round trip, nothing in flight behind it), and threads that share a packed word each load it. So
qrobust does not use it; a kernel that wins needs Marlin's repacking (one whole word per thread)
and loads issued several steps ahead.

    python benchmarks/gluon_matmul_probe.py --out "$OUT"      # on a CUDA GPU
    python benchmarks/gluon_matmul_probe.py --compile-only    # anywhere, with a Linux x86-64 Triton
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

GROUP_SIZE = 128


@gluon.jit
def _gluon_matmul_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, p_ptr, M, N, K, k_split, BITS: gl.constexpr,
                         OFFSET: gl.constexpr, GS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         BLOCK_K: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Partial sums p[split] [M, N] of x [M, K] times Ŵᵀ over inputs split·k_split … (split + 1)·k_split − 1;
    a tile of BLOCK_K inputs lies within one group."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS],
                                                         instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=acc_layout, k_width=2)
    VPW: gl.constexpr = 32 // BITS
    MAXQ: gl.constexpr = (1 << BITS) - 1
    split = gl.program_id(2)
    m_a = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_layout))
    k_a = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
    k_b = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
    n_b = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, b_layout))
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    for k0 in range(split * k_split, (split + 1) * k_split, BLOCK_K):
        a = gl.load(x_ptr + m_a[:, None] * K + (k0 + k_a)[None, :], mask=(m_a < M)[:, None], other=0.0)
        k = k0 + k_b
        # the word of input k for output n, shifted by k's place in it: each thread reads only its own codes
        words = gl.load(qw_ptr + (k // VPW)[:, None] * N + n_b[None, :]).to(gl.uint32, bitcast=True)
        q = (words >> ((k % VPW) * BITS).to(gl.uint32)[:, None]) & MAXQ
        g = k0 // GS
        s = gl.load(s_ptr + g * N + n_b).to(gl.float32)
        zw = gl.load(qz_ptr + g * (N // VPW) + n_b // VPW).to(gl.uint32, bitcast=True)
        z = ((((zw >> ((n_b % VPW) * BITS).to(gl.uint32)) & MAXQ) + OFFSET) & MAXQ).to(gl.float32)
        w = ((q.to(gl.float32) - z[None, :]) * s[None, :]).to(a.dtype)
        acc = mma_v2(a, w, acc)
    m_c = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    n_c = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    gl.store(p_ptr + split * M * N + m_c[:, None] * N + n_c[None, :], acc, mask=(m_c < M)[:, None])


def block_m_for(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))


def gluon_matmul(x: torch.Tensor, layer, split_k: int, partial: torch.Tensor | None = None, block_n: int = 64,
                 block_k: int = 64, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] times a QuantLinear's packed weight (GPTQ layout, inputs in group order): [M, N] in x's dtype."""
    from qrobust.quant.qlinear import FORMAT_OFFSET

    M, K = x.shape
    N = layer.out_features
    block_m = block_m_for(M)
    partial = torch.empty(split_k, M, N, device=x.device, dtype=torch.float32) if partial is None else partial
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _gluon_matmul_kernel[grid](x, layer.qweight, layer.scales, layer.qzeros, partial, M, N, K, K // split_k,
                               BITS=layer.spec.bits, OFFSET=FORMAT_OFFSET[layer.format], GS=layer.spec.group_size,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_WARPS=num_warps,
                               num_warps=num_warps)
    return (partial[0] if split_k == 1 else partial.sum(0)).to(x.dtype)


def compile_for_sm90(rows: int, bits: int, block_n: int = 64, block_k: int = 64, num_warps: int = 4):
    from triton.experimental.gluon._runtime import GluonASTSource

    from qrobust.kernels.launch import compile_for

    pointers = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "qz_ptr": "*i32", "p_ptr": "*fp32"}
    scalars = {"M": "i32", "N": "i32", "K": "i32", "k_split": "i32"}
    constants = dict(BITS=bits, OFFSET=1, GS=GROUP_SIZE, BLOCK_M=block_m_for(rows), BLOCK_N=block_n, BLOCK_K=block_k,
                     NUM_WARPS=num_warps)
    return compile_for(_gluon_matmul_kernel, 90, pointers, scalars, constants, source_type=GluonASTSource,
                       num_warps=num_warps)


def compile_only(bits_list: tuple[int, ...], rows_list: tuple[int, ...]) -> list[dict]:
    from kernel_asm import MATMUL_OPCODES, sass_facts

    rows = []
    for bits in bits_list:
        for m in rows_list:
            ops, resources = sass_facts(compile_for_sm90(m, bits).asm["cubin"])
            rows.append({"bits": bits, "rows": m, **resources, **{op: ops.get(op, 0) for op in MATMUL_OPCODES}})
            print(rows[-1], flush=True)
    return rows


def measure(bits_list: tuple[int, ...], rows_list: tuple[int, ...], splits: tuple[int, ...]) -> list[dict]:
    from engine_gpu import Plan, config, layer_shapes, packed_like
    from gpu_script import graph_time
    from qrobust.kernels.packed_matmul import matmul_locks, packed_matmul
    from qrobust.quant.qlinear import FORMAT_OFFSET

    shapes = layer_shapes(config(Plan(), "ar"))
    out = []
    for name in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        K, N = shapes[name]
        dense = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        for bits in bits_list:
            layer = packed_like(dense, bits, GROUP_SIZE)
            w = layer.dequantized_weight().to(torch.bfloat16)
            locks = matmul_locks(N, "cuda")
            for m in rows_list:
                x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    us_bf16 = 1e6 * graph_time(functools.partial(dense, x))
                    us_triton = 1e6 * graph_time(functools.partial(
                        packed_matmul, x, layer.qweight, layer.scales, layer.qzeros, None, bits, GROUP_SIZE,
                        FORMAT_OFFSET[layer.format], locks=locks))
                    ref = (x.float() @ w.float().t())
                    for split_k in splits:
                        if K % (split_k * 64):
                            continue
                        partial = torch.empty(split_k, m, N, device="cuda", dtype=torch.float32)
                        err = (gluon_matmul(x, layer, split_k).float() - ref).abs().max().item() / ref.abs().max().item()
                        us = 1e6 * graph_time(functools.partial(gluon_matmul, x, layer, split_k, partial))
                        row = {"layer": name, "K": K, "N": N, "bits": bits, "rows": m, "split_k": split_k,
                               "max_rel_error": err, "us_bf16": us_bf16, "us_triton": us_triton, "us_gluon": us,
                               "gluon_vs_bf16": us_bf16 / us, "triton_vs_bf16": us_bf16 / us_triton}
                        out.append(row)
                        print(f"{name:>10} {bits}-bit {m:>3} rows split {split_k}: gluon {us:6.2f} us "
                              f"({us_bf16 / us:.2f}x bf16), triton {us_triton:6.2f} ({us_bf16 / us_triton:.2f}x), "
                              f"error {err:.1e}", flush=True)
            del layer, w
        del dense
    return out


def main() -> None:
    from gpu_script import probe_arguments, run_probe

    args = probe_arguments(__doc__.splitlines()[0], bits="2,4,8", rows="8,16,32,64")
    if args.compile_only:
        compile_only(args.bits, args.rows)
        return
    run_probe(args, "gluon_matmul_probe", measure)


if __name__ == "__main__":
    main()
