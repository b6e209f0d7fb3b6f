"""The Hopper product of 2-, 3-, 4- and 8-bit layers (--bits) in the fragments layout
(kernels.fragments_matmul) at each K-split (and, at more than 32 rows, in one program of all rows
or programs of 32; with --warpgroups, in programs of that many warpgroups, 64 outputs each; with
--load-ahead, at each distance of a step's loads from its use, which a split of fewer steps caps),
against bf16
nn.Linear and the product the GPTQ layout takes for as many rows (kernels.packed_matmul; for 1-4
rows kernels.gemv's GEMV, its default tiling), at Qwen3-1.7B's layer shapes (and the fused q/k/v
and gate/up) and the engine's row counts: the data behind fragments_matmul.fragments_tiling,
whose choice each row marks. Each product is timed
as a CUDA graph of 20 calls (its weights partly stay in L2; the engine reads them cold).

    cd benchmarks && PYTHONPATH=..:. python3 fragments_splits.py --out "$OUT"     # on a Hopper GPU
    cd benchmarks && PYTHONPATH=..:. python3 fragments_splits.py --rows 64,32 --load-ahead 1,2,3 --out "$OUT"
    cd benchmarks && PYTHONPATH=..:. python3 fragments_splits.py --rows 64,32 --warpgroups 1,2,4 --out "$OUT"
    cd benchmarks && PYTHONPATH=..:. python3 fragments_splits.py --compile-only   # its SASS, no GPU
    cd benchmarks && PYTHONPATH=..:. python3 fragments_splits.py --compile-only --warpgroups 1,2,4 --swiglu
"""
from __future__ import annotations

import functools
import itertools
from typing import Iterator

import torch

from engine_gpu import Plan, config, layer_shapes, packed_like
from gpu_script import graph_time, probe_arguments, run_probe
from qrobust.kernels import gemv_config, gemv_locks
from qrobust.kernels.fragments import TILE_K, TILE_N, to_fragments
from qrobust.kernels.fragments_matmul import (LOAD_AHEAD, ROW_BLOCK, compile_fragments_matmul_for,
                                              fragments_locks, fragments_matmul, fragments_tiling)
from qrobust.kernels.gemv import gptq_gemv
from qrobust.kernels.packed_matmul import matmul_locks, packed_matmul
from qrobust.quant.kernel_choice import GEMV_MAX_ROWS
from qrobust.quant.qlinear import FORMAT_OFFSET


def effective_ahead(ahead: int, steps: int) -> int:
    """The load distance a split of `steps` steps runs: loads further ahead than its last step are
    all issued first, the same kernel."""
    return min(ahead, max(1, steps - 1))


def measure(bits_list: tuple[int, ...], rows_list: tuple[int, ...], splits: tuple[int, ...],
            load_ahead: tuple[int, ...] = (LOAD_AHEAD,), warpgroups: tuple[int, ...] = (1,)) -> Iterator[dict]:
    for bits, (name, (K, N)) in itertools.product(bits_list, layer_shapes(config(Plan(), "ar")).items()):
        dense = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = packed_like(dense, bits, 128)
        offset = FORMAT_OFFSET[layer.format]
        words = to_fragments(layer.qweight, K, bits)
        w = layer.dequantized_weight().to(torch.bfloat16).float()
        locks, gptq_locks = fragments_locks(N, "cuda"), matmul_locks(N, "cuda")
        gptq = (layer.qweight, layer.scales, layer.qzeros, None, bits, 128, offset)
        gemv = gemv_config(K, 128, False)
        tiling = dict(block_n=gemv.block_n, block_depth=gemv.block_depth, splits=gemv.splits, num_warps=gemv.num_warps)
        for m in rows_list:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                us_bf16 = 1e6 * graph_time(functools.partial(dense, x))
                ref = x.float() @ w.t()
                if m <= GEMV_MAX_ROWS:
                    us_gptq = 1e6 * graph_time(functools.partial(
                        gptq_gemv, x, *gptq, **tiling, locks=gemv_locks(N, x.device, m, gemv.block_n)))
                else:
                    us_gptq = 1e6 * graph_time(functools.partial(packed_matmul, x, *gptq, locks=gptq_locks))
                rows, chosen_split, chosen_wg = fragments_tiling(m, N, K)
                programs = sorted({min(rows, ROW_BLOCK), max(rows, m)})  # as chosen, and one program for all
                measured = set()
                for split, per_program, asked, wg in itertools.product(splits, programs, load_ahead, warpgroups):
                    steps = K // TILE_K // split if (K // TILE_K) % split == 0 else 0
                    ahead = effective_ahead(asked, steps)
                    if not steps or N % (TILE_N * wg) or (split, per_program, ahead, wg) in measured:
                        continue
                    measured.add((split, per_program, ahead, wg))
                    fn = functools.partial(fragments_matmul, x, words, layer.scales, layer.qzeros, bits, offset,
                                           locks=locks, split_k=split, rows_per_program=per_program, load_ahead=ahead,
                                           warpgroups=wg)
                    err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                    us = 1e6 * graph_time(fn)
                    chosen = (split, per_program, ahead, wg) == (chosen_split, rows, effective_ahead(LOAD_AHEAD, steps),
                                                                 chosen_wg)
                    row = {"layer": name, "K": K, "N": N, "bits": bits, "rows": m, "split_k": split,
                                "rows_per_program": per_program, "warpgroups": wg, "load_ahead": ahead,
                                "chosen": chosen, "max_rel_error": err, "us_fragments": us, "us_bf16": us_bf16,
                                "us_gptq_layout": us_gptq}
                    print(f"{name:>12} {bits} bits {m:>3} rows ({per_program:>2} a program, {wg} warpgroups) split "
                          f"{split:>2} ahead {ahead}{'*' if chosen else ' '}: fragments {us:6.2f} us ({us_bf16 / us:.2f}x "
                          f"bf16), bf16 {us_bf16:6.2f}, GPTQ layout {us_gptq:6.2f} ({us_bf16 / us_gptq:.2f}x), "
                          f"error {err:.1e}",
                          flush=True)
                    yield row
        del layer, words, w, dense


def compile_only(bits_list: tuple[int, ...], rows_list: tuple[int, ...], warpgroups: tuple[int | None, ...] = (None,),
                 swiglu: bool = False) -> None:
    """The chosen kernel of each width, shape and row count (in programs of each of `warpgroups`,
    None: the chosen; with `swiglu` as the fused gate/up layer runs it) compiled for sm_90:
    registers, spills, wgmma and the instructions that move data."""
    from kernel_asm import sass_facts

    for bits, (name, (K, N)), wg in itertools.product(bits_list, layer_shapes(config(Plan(), "ar")).items(), warpgroups):
        for m in rows_list:
            cubin = compile_fragments_matmul_for(m, N, K, bits=bits, warpgroups=wg,
                                                 swiglu=swiglu and name == "gate_up_proj").asm["cubin"]
            ops, resources = sass_facts(cubin)
            _, split, chosen_wg = fragments_tiling(m, N, K)
            print({"layer": name, "bits": bits, "rows": m, "split_k": split, "warpgroups": wg or chosen_wg, **resources,
                   **{op: ops.get(op, 0) for op in ("HGMMA", "LDGSTS", "LDG", "STS", "STG")}}, flush=True)


def main() -> None:
    args = probe_arguments(__doc__.splitlines()[0], bits="4", rows="64,32,8,4,1", splits="1,2,4,8",
                           load_ahead=str(LOAD_AHEAD), warpgroups="1", flags=("swiglu",))
    if args.compile_only:
        compile_only(args.bits, args.rows, args.warpgroups, args.swiglu)
        return
    run_probe(args, "fragments_splits", functools.partial(measure, load_ahead=args.load_ahead,
                                                         warpgroups=args.warpgroups))


if __name__ == "__main__":
    main()
