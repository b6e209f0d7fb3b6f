"""What the packed products compile to, without a GPU: Triton compiles qrobust's kernels for a CUDA
target (sm_90, the H100, by default) on any machine, with the ptxas and cuobjdump it ships.

For the GEMV (`_gemv_kernel`) this prints per width what decides the kernel's cost when products
are a few microseconds: layout conversions (Triton moves data through shared memory for each),
barriers, registers and spills, and the SASS instructions per code a thread unpacks (all of the
kernel's static instructions over the codes one thread handles in one tile; the loop runs once
when every program gets one tile, as the default tiling arranges).

With --matmul ROWS,N,K, for the batched product (`_split_matmul_kernel`, its default tiling) it
prints which tensor-core instructions it runs (HGMMA: Hopper's wgmma; HMMA: mma.sync), the
asynchronous copies into shared memory (LDGSTS), the stores to and matrix loads from shared
memory (STS, LDSM) and the barriers: how each dequantized weight tile reaches the tensor cores.

    python benchmarks/kernel_asm.py [--bits 2,3,4,8] [--block-n 32] [--block-k 2048] [--warps 8]
                                    [--splits 1] [--swiglu] [--pdl] [--norm] [--half2] [--arch 90]
                                    [--out FILE.json]
    python benchmarks/kernel_asm.py --matmul 32,6144,2048 [64,2048,2048 ...] [--bits 4] [--pairs] [--arch 90]

The kernel comes from whichever qrobust is imported (qrobust.kernels.compile_gemv_for), so
PYTHONPATH=<another checkout> compares another version of it (one from before the kernels were
split into modules, which had them in qrobust/kernels/gptq_matmul.py, with its own copy of this
script).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import triton

from qrobust.kernels import compile_gemv_for, half2_applies
from qrobust.kernels.packed_matmul import arch_runs_wgmma, compile_packed_matmul_for, packed_matmul_tiling
from qrobust.quant.pack import LAYOUTS, layout_applies

# an instruction's opcode (group 1) and its modifiers (group 2: ".U16", ".E.BYPASS.128")
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")


def compile_gemv(bits: int, block_n: int, block_k: int, warps: int, arch: int, splits: int = 1,
                 swiglu: bool = False, pdl: bool = False, norm: bool = False, half2: bool = False,
                 layout: str = "gptq"):
    """The GEMV as the default path launches it (one tile per program, no act-order, no bias,
    K-splits summed by the last split; with `swiglu`, the activation applied as it stores; with
    `pdl`, as a programmatic dependent launch; with `norm`, the residual add and RMSNorm in its
    prologue; with `half2`, float16 sums, for widths with a plan), for qweight in `layout`, compiled
    for sm_<arch>."""
    constants = dict(BITS=bits, LAYOUT=layout, OFFSET=1, GS=128, ACT_ORDER=False, HAS_BIAS=False, BLOCK_N=block_n,
                     BLOCK_K=block_k, SPLITS=splits, LAST_SUMS=True, SWIGLU=swiglu, ONE_TILE=True, PDL=pdl,
                     NORM=norm, HAS_RES=norm, K_POW2=triton.next_power_of_2(block_k * splits), X_SPLITS=1,
                     HALF2=half2, ASM=True)
    return compile_gemv_for(arch, constants, num_warps=warps)


def nvidia_tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvidia_tool("cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def sass_facts(cubin: bytes, modifiers: bool = False) -> tuple[collections.Counter, dict]:
    """Opcode counts of the kernel's SASS (with `modifiers`, per opcode and modifiers: STS.U16 and
    STS.128 apart), and its registers / stack from cuobjdump -res-usage."""
    sass, usage = cuobjdump(cubin, "-sass"), cuobjdump(cubin, "-res-usage")
    ops = collections.Counter(m.group(1) + (m.group(2) if modifiers else "")
                              for m in map(INSTRUCTION.match, sass.splitlines()) if m)
    resources = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return ops, resources


def describe(bits: int, block_n: int, block_k: int, warps: int, splits: int, arch: int, swiglu: bool = False,
             pdl: bool = False, norm: bool = False, half2: bool = False, layout: str = "gptq") -> dict:
    layout = layout if layout_applies(bits, layout) else "gptq"
    half2 = half2 and half2_applies(bits, False, torch.float16, layout)
    kernel = compile_gemv(bits, block_n, block_k, warps, arch, splits, swiglu, pdl, norm, half2, layout)
    ops, resources = sass_facts(kernel.asm["cubin"])
    codes_per_thread = block_n * block_k // (32 * warps)
    alu = sum(n for op, n in ops.items() if op in ("FFMA", "FADD", "FMUL", "LOP3", "SHF", "SGXT", "PRMT", "I2FP",
                                                   "IMAD", "IADD3", "LEA", "BFE"))
    return {"bits": bits, "block_n": block_n, "block_k": block_k, "warps": warps, "splits": splits, "swiglu": swiglu,
            "pdl": pdl, "norm": norm, "half2": half2, "layout": layout, "arch": f"sm_{arch}",
            "layout_conversions": kernel.asm["ttgir"].count("ttg.convert_layout"),
            "barriers": kernel.asm["ptx"].count("bar.sync"), **resources,
            "sass_instructions": sum(ops.values()), "codes_per_thread": codes_per_thread,
            "sass_per_code": sum(ops.values()) / codes_per_thread, "alu_per_code": alu / codes_per_thread,
            "top_opcodes": dict(ops.most_common(8))}


# SASS opcodes that say how a matmul's operands reach the tensor cores
MATMUL_OPCODES = ("HGMMA", "HMMA", "LDGSTS", "LDG", "STS", "LDS", "LDSM", "BAR")


def main_loop(sass: str) -> list[str]:
    """The instructions (text, predicate included) between the target of the longest backward
    branch and that branch: a kernel's main loop."""
    listing = [(int(m.group(1), 16), m.group(2).strip())
               for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;/]+);", sass)]
    spans = [(int(b.group(1), 16), address) for address, text in listing
             if (b := re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)) and int(b.group(1), 16) < address]
    if not spans:
        return []
    first, last = max(spans, key=lambda span: span[1] - span[0])
    return [text for address, text in listing if first <= address <= last]


def describe_matmul(rows: int, N: int, K: int, bits: int, arch: int, half_pairs: bool = False) -> dict:
    tiling = replace(packed_matmul_tiling(rows, N, K, 128, False, bits, wgmma=arch_runs_wgmma(arch)),
                     half_pairs=half_pairs)
    kernel = compile_packed_matmul_for(arch, rows, N, K, bits, tiling=tiling)
    full, resources = sass_facts(kernel.asm["cubin"], modifiers=True)
    ops = collections.Counter()
    for op, n in full.items():
        ops[op.split(".")[0]] += n
    return {"rows": rows, "N": N, "K": K, "bits": bits, "arch": f"sm_{arch}", "tiling": vars(tiling),
            "layout_conversions": kernel.asm["ttgir"].count("ttg.convert_layout"),
            "shared_allocations": kernel.asm["ttgir"].count("ttg.local_alloc"), **resources,
            **{op: ops.get(op, 0) for op in MATMUL_OPCODES}, "sass_instructions": sum(ops.values()),
            "loop_instructions": len(main_loop(cuobjdump(kernel.asm["cubin"], "-sass"))),
            "shared_stores": {op: n for op, n in sorted(full.items()) if op.split(".")[0] == "STS"},
            "top_opcodes": dict(ops.most_common(8))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--block-n", type=int, default=32)
    p.add_argument("--block-k", type=int, default=2048)
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--splits", type=int, default=1, help="K-splits (their partial sums are added in the kernel)")
    p.add_argument("--swiglu", action="store_true", help="the variant that stores silu(gate)·up (fused SwiGLU layers)")
    p.add_argument("--pdl", action="store_true", help="the variant launched as a programmatic dependent launch")
    p.add_argument("--norm", action="store_true", help="the variant with the residual add and RMSNorm in its prologue")
    p.add_argument("--half2", action="store_true", help="the variant that sums two codes at a time in float16")
    p.add_argument("--layout", default="gptq", choices=LAYOUTS,
                   help="qweight's layout where the width has it (pairs: 3 bits), else gptq")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (90: H100)")
    p.add_argument("--matmul", metavar="ROWS,N,K", nargs="+",
                   help="the batched product for ROWS rows of a K → N layer instead (one or more shapes)")
    p.add_argument("--pairs", action="store_true", help="--matmul: with half-precision pairs (MatmulTiling.half_pairs)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not Path(nvidia_tool("cuobjdump")).exists():
        raise SystemExit("kernel_asm.py: this Triton ships no CUDA tools (backends/nvidia/bin); "
                         "install a Linux x86-64 Triton wheel")
    if args.matmul:
        shapes = [tuple(int(v) for v in shape.split(",")) for shape in args.matmul]
        rows = [describe_matmul(*shape, int(b), args.arch, args.pairs)
                for shape in shapes for b in args.bits.split(",")]
        print(f"{'shape':>16} {'bits':>4} {'convert':>7} {'alloc':>5} {'regs':>4} {'loop':>5} "
              + " ".join(f"{op:>6}" for op in MATMUL_OPCODES) + "  tiling")
        for r in rows:
            shape = f"{r['rows']}x{r['K']}->{r['N']}"
            print(f"{shape:>16} {r['bits']:>4} {r['layout_conversions']:>7} {r['shared_allocations']:>5} "
                  f"{r.get('reg', 0):>4} {r['loop_instructions']:>5} "
                  + " ".join(f"{r[op]:>6}" for op in MATMUL_OPCODES) + f"  {r['tiling']}")
        write(args.out, rows)
        return
    rows = [describe(int(b), args.block_n, args.block_k, args.warps, args.splits, args.arch, args.swiglu, args.pdl,
                     args.norm, args.half2, args.layout)
            for b in args.bits.split(",")]
    print(f"{'bits':>4} {'convert':>7} {'bar.sync':>8} {'regs':>4} {'stack':>5} {'SASS':>5} {'/code':>6} "
          f"{'ALU/code':>8}  top opcodes")
    for r in rows:
        top = " ".join(f"{op}:{n}" for op, n in r["top_opcodes"].items())
        print(f"{r['bits']:>4} {r['layout_conversions']:>7} {r['barriers']:>8} {r.get('reg', 0):>4} "
              f"{r.get('stack', 0):>5} {r['sass_instructions']:>5} {r['sass_per_code']:>6.2f} "
              f"{r['alu_per_code']:>8.2f}  {top}")
    write(args.out, rows)


def write(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
