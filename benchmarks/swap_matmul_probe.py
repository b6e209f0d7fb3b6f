"""A candidate for the batched packed product: the weights as wgmma's register operand ("swap AB").

Triton's kernel (kernels.packed_matmul) computes x Ŵᵀ with the dequantized weight tile as the
second operand, which Hopper's wgmma reads only from shared memory: each tile is dequantized in
registers, stored, and read back after a barrier (`benchmarks/kernel_asm.py --matmul`). This
probe computes yᵀ = Ŵ xᵀ instead. wgmma reads its first operand from registers, and Triton loads
the packed codes from shared memory straight into that register layout and dequantizes them
there (MMAv3 layout hoisting), with no store of the dequantized tile and no barrier for it. Triton
hoists the layout only through element-wise operations on whole loaded tiles, with no broadcasts
and no narrowing casts. Three choices follow from that:
- each int16 half word of qweight holds V = 16/b codes, and sub-product i takes code i of every
  half word, a constant shift, against inputs V·c + i;
- scales and zero points (float16, 1024 + z, unpacked beforehand) are loaded as whole tiles;
- the arithmetic is float16, ŵ = ((1024 + q) − (1024 + z))·s, then bf16.
GPTQ's layout at 2, 4 and 8 bits only, inputs in group order, tiles within one group. The probe
also times the same kernel reading x in that order from a copy permuted beforehand (--no-xperm
skips it), which bounds what the strided reads of x cost.

Measured on an H200 (results/engine/swap_matmul_probe.json, 4 bits, 32 and 64 rows, best of
its tilings per shape): correct (largest error 0.4% of the largest output). It is not faster.
Reading x as it comes it runs at 0.70-0.94x the speed of the Triton product, and with x
permuted beforehand at 0.87-1.02x. Removing the store round trip does not make the product
faster. Its cost is the fixed latency of programs that read 2 to 6 tiles each, and of the
K-split sums, at these sizes. So qrobust does not use it.

    python benchmarks/swap_matmul_probe.py --bits 4 --rows 32,64 --out "$OUT"   # on a Hopper GPU
    python benchmarks/swap_matmul_probe.py --compile-only   # anywhere, with a Linux x86-64 Triton
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import torch
import triton
import triton.language as tl

from qrobust.kernels.launch import last_to_arrive

GROUP_SIZE = 128
SHAPES = {"q_proj": (2048, 2048), "k_proj": (2048, 1024), "gate_proj": (2048, 6144), "down_proj": (6144, 2048)}


@triton.jit
def _swap_kernel(x_ptr, qw_ptr, s_ptr, zf_ptr, p_ptr, y_ptr, lock_ptr, M, N, K, k_split, stride_x,
                 BITS: tl.constexpr, GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, XPERM: tl.constexpr):
    """yᵀ for outputs n and rows m over inputs split·k_split …; with SPLIT_K > 1 the last of an
    output tile's programs adds up the partial sums p (lock_ptr: one arrival counter per tile).
    XPERM: x's inputs come permuted per tile, position i·C + c holding input V·c + i (permuted)."""
    V: tl.constexpr = 16 // BITS
    C: tl.constexpr = BLOCK_K // V
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    c = tl.arange(0, C)
    split = tl.program_id(1)
    nmask = n < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    half_words = qw_ptr.to(tl.pointer_type(tl.int16), bitcast=True)
    for k0 in range(split * k_split, (split + 1) * k_split, BLOCK_K):
        g = k0 // GS
        h = tl.load(half_words + ((k0 // (2 * V) + c // 2)[None, :] * N + n[:, None]) * 2 + (c % 2)[None, :],
                    mask=nmask[:, None], other=0)
        s = tl.load(s_ptr + g * N + n[:, None] + 0 * c[None, :], mask=nmask[:, None], other=0.0)
        z = tl.load(zf_ptr + g * N + n[:, None] + 0 * c[None, :], mask=nmask[:, None], other=0.0)
        for i in tl.static_range(V):
            q = (h >> (BITS * i)) & ((1 << BITS) - 1)
            w = ((q | 0x6400).to(tl.float16, bitcast=True) - z) * s  # 0x6400: float16 1024, ulp 1
            k = k0 + i * C + c if XPERM else k0 + V * c + i
            xt = tl.load(x_ptr + m[None, :] * stride_x + k[:, None], mask=(m < M)[None, :], other=0.0)
            acc += tl.dot(w.to(x_ptr.dtype.element_ty), xt)
    tile = m[None, :] * N + n[:, None]
    tmask = (m < M)[None, :] & nmask[:, None]
    if SPLIT_K == 1:
        tl.store(y_ptr + tile, acc.to(y_ptr.dtype.element_ty), mask=tmask)
    else:
        tl.store(p_ptr + split * M * N + tile, acc, mask=tmask)
        lock = lock_ptr + tl.program_id(0)
        if last_to_arrive(lock, SPLIT_K):
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for part in tl.static_range(SPLIT_K):
                total += tl.load(p_ptr + part * M * N + tile, mask=tmask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + tile, total.to(y_ptr.dtype.element_ty), mask=tmask)
            tl.atomic_xchg(lock, 0)


def unpacked_zeros(layer) -> torch.Tensor:
    """The layer's zero points as the kernel reads them: float16 1024 + z, [groups, N]."""
    return (layer.zero_points().to(layer.scales.device).to(torch.float16) + 1024).contiguous()


def swap_matmul(x: torch.Tensor, layer, zeros: torch.Tensor, locks: torch.Tensor, block_n: int = 64,
                block_k: int = 128, split_k: int = 1, num_stages: int = 3, xperm: bool = False) -> torch.Tensor:
    """x [M, K] (permuted beforehand with xperm, `permuted`) times the QuantLinear layer's weight,
    [M, N] in x's dtype; zeros from unpacked_zeros, locks: zeros, one per output tile."""
    bits = layer.spec.bits
    M, K = x.shape
    N = layer.qweight.shape[1]
    if bits not in (2, 4, 8) or GROUP_SIZE % block_k or K % (split_k * block_k):
        raise ValueError(f"swap_matmul: {bits} bits, tiles of {block_k} inputs, {split_k} splits of {K}")
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    partial = torch.empty((split_k, M, N), device=x.device, dtype=torch.float32) if split_k > 1 else y
    _swap_kernel[(triton.cdiv(N, block_n), split_k)](
        x, layer.qweight, layer.scales, zeros, partial, y, locks, M, N, K, K // split_k, x.stride(0), BITS=bits,
        GS=GROUP_SIZE, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, XPERM=xperm,
        num_warps=4, num_stages=num_stages)
    return y


def permuted(x: torch.Tensor, bits: int, block_k: int) -> torch.Tensor:
    """x with each tile's inputs in the order XPERM reads them: position i·C + c holds input V·c + i."""
    V = 16 // bits
    M, K = x.shape
    return x.reshape(M, K // block_k, block_k // V, V).transpose(2, 3).reshape(M, K)


def compile_for_sm90(rows: int, bits: int, block_n: int = 64):
    """The kernel as swap_matmul launches it (no K-split), compiled for an H100 without a GPU."""
    from qrobust.kernels.launch import compile_for

    pointers = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "zf_ptr": "*fp16", "p_ptr": "*fp32",
                "y_ptr": "*bf16", "lock_ptr": "*i32"}
    scalars = {"M": "i32", "N": "i32", "K": "i32", "k_split": "i32", "stride_x": "i32"}
    constants = dict(BITS=bits, GS=GROUP_SIZE, BLOCK_M=16 if rows <= 16 else 32 if rows <= 32 else 64,
                     BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=1, XPERM=False)
    return compile_for(_swap_kernel, 90, pointers, scalars, constants, num_warps=4, num_stages=3)


def register_operand_facts(rows: int, bits: int, block_n: int = 64) -> dict:
    """What decides the probe's design, from its TTGIR for sm_90: how many wgmma take the weights
    (operand A) from registers, and which tiles the kernel stores from registers to shared memory
    (in the Triton product, the dequantized weights; here they should be x's tiles only, wgmma's
    operand B). Tiles that arrive by asynchronous copy (packed words, scales, zeros) are not stores."""
    import re

    ttgir = compile_for_sm90(rows, bits, block_n).asm["ttgir"]
    # the operand types follow the attributes: `ttng.warp_group_dot %a, %b, %c {...} : A * B -> C`
    operands = [line.split("} : ", 1)[1].split(" -> ")[0].split(" * ") for line in ttgir.splitlines()
                if "ttng.warp_group_dot " in line]
    stored = re.findall(r"ttg\.local_alloc %\S+ : \([^)]*\) -> (!ttg\.memdesc<[^>]*>)", ttgir)
    return {"rows": rows, "bits": bits, "wgmma": len(operands),
            "wgmma_weights_in_registers": sum(a.startswith("tensor<") and "dot_op<{opIdx = 0" in a
                                              for a, _ in operands),
            "wgmma_x_operands": sorted({b for _, b in operands}), "tiles_stored": sorted(set(stored))}


def measure(bits_list: list[int], rows_list: list[int], xperm_too: bool) -> list[dict]:
    from engine_gpu import packed_like
    from gpu_script import graph_time
    from qrobust.kernels.packed_matmul import matmul_locks, packed_matmul
    from qrobust.quant.qlinear import FORMAT_OFFSET

    rows = []
    for (name, (K, N)), bits in itertools.product(SHAPES.items(), bits_list):
        dense = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = packed_like(dense, bits, GROUP_SIZE)
        w = layer.dequantized_weight().cuda()
        zeros, locks, ours_locks = unpacked_zeros(layer), torch.zeros(N, dtype=torch.int32, device="cuda"), \
            matmul_locks(N, "cuda")
        for M in rows_list:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.t()
            with torch.no_grad():
                us_bf16 = 1e6 * graph_time(functools.partial(dense, x))
                us_current = 1e6 * graph_time(functools.partial(
                    packed_matmul, x, layer.qweight, layer.scales, layer.qzeros, None, bits, GROUP_SIZE,
                    FORMAT_OFFSET[layer.format], locks=ours_locks))
            for block_n, xperm, split in itertools.product((64, 128), (False, True) if xperm_too else (False,),
                                                           (1, 2, 4, 8, 16)):
                if K % (split * 128) or K // split > 1024 or (split > 1 and K // split < 256):
                    continue
                fn = functools.partial(swap_matmul, permuted(x, bits, 128) if xperm else x, layer, zeros, locks,
                                       block_n, 128, split, 3, xperm)
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                us = 1e6 * graph_time(fn)
                rows.append({"layer": name, "K": K, "N": N, "bits": bits, "rows": M, "block_n": block_n,
                             "block_k": 128, "split": split, "stages": 3, "xperm": xperm, "us": us,
                             "us_bf16": us_bf16, "us_current": us_current, "max_rel_err": err})
            for xperm in (False, True) if xperm_too else (False,):
                best = min((r for r in rows if (r["layer"], r["bits"], r["rows"], r["xperm"]) == (name, bits, M, xperm)),
                           key=lambda r: r["us"])
                print(f"{name:>10} {bits}b {M:>3} rows x permuted {xperm!s:5}: bf16 {us_bf16:6.2f} current "
                      f"{us_current:6.2f} swap {best['us']:6.2f} us ({us_current / best['us']:.2f}x current) "
                      f"BN{best['block_n']} S{best['split']} err {best['max_rel_err']:.1e}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="4")
    p.add_argument("--rows", default="32,64")
    p.add_argument("--no-xperm", action="store_true", help="skip the bound with x permuted beforehand")
    p.add_argument("--compile-only", action="store_true", help="print register_operand_facts (no GPU)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.compile_only:
        for bits, rows in itertools.product([int(b) for b in a.bits.split(",")], [int(r) for r in a.rows.split(",")]):
            print(register_operand_facts(rows, bits))
        return
    rows = measure([int(b) for b in a.bits.split(",")], [int(r) for r in a.rows.split(",")], not a.no_xperm)
    if a.out:
        with open(os.path.join(a.out, "swap_matmul_probe.json"), "w") as f:
            json.dump({"torch": torch.__version__, "triton": triton.__version__,
                       "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
