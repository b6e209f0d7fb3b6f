"""Where a batched decoding step of the engine spends its time, on one GPU (~2 minutes on an H200).

engine_gpu.py measures whole generations; this script says what to speed up next:

(a) profile: the CUDA kernels of engine decoding steps (batch 64 greedy, or with --study-settings
    batch 32 as `qrobust sweep` samples; random-weight Qwen3-1.7B shape, bf16 dense and packed 4-bit
    RTN), grouped into linear products, attention, sampling and the rest, with each group's share;
(b) tiles: the packed matmul alone at the given rows (--rows, default 64) against bf16 nn.Linear,
    both timed inside a CUDA graph of 20 calls (so launch overhead does not count), for the
    default tiling (kernels.packed_matmul.packed_matmul_tiling) and a grid of others.

Rows go to --out (default $OUT) as engine_profile.json and engine_tiles.json.

    python benchmarks/engine_breakdown.py --out "$OUT"
    python benchmarks/engine_breakdown.py --parts tiles --rows 16,64 --out "$OUT"
    python benchmarks/engine_breakdown.py --parts tiles --rows 32,64 --num-warps 4,8 --num-stages 2,3,4 --out "$OUT"
    python benchmarks/engine_breakdown.py --parts tiles --rows 16,32,64 --bits 2,4 --block-n -1 --block-k -1 \
        --split-k -1 --codes-in-thread 0,1 --half-pairs 0,1 --out "$OUT"      # the default tiling, switches flipped
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from engine_gpu import Plan, build, config, layer_shapes, packed_like, random_prompts, release
from gpu_script import graph_time, require_cuda, write_rows
from qrobust.kernels.packed_matmul import (MatmulTiling, matmul_locks, packed_matmul, packed_matmul_tiling,
                                          runs_wgmma)
from qrobust.models.engine import AREngine, DecodeSettings, StopRule
from qrobust.quant.qlinear import FORMAT_OFFSET

# sampling first (its softmax is not attention's), then attention: its CUTLASS kernels' names also hold "cutlass"
GROUPS = (("sampling", ("scatter", "scan", "radix", "sort", "cumsum")),
          ("attention", ("attention", "fmha", "flash", "softmax", "sdpa", "efficient")),
          ("linear", ("gemm", "gemv", "matmul", "dequant", "nvjet", "cutlass", "xmma", "ampere")))


def kernel_group(name: str) -> str:
    lowered = name.lower()
    return next((g for g, keys in GROUPS if any(k in lowered for k in keys)), "other")


def profile_steps(plan: Plan, bits: int, batch: int, tokens: int, study: bool = False) -> list[dict]:
    """Kernel times over one generation of `tokens` forced tokens at `batch` rows (graphs warm);
    study: as `qrobust sweep` generates (192-token prompts, temperature 0.1, top-p 0.9, the layers
    as for_generation readies them: fused projections, one attention kernel per layer)."""
    from torch.profiler import ProfilerActivity, profile

    from qrobust.models.decode import generation_layers

    model = build(plan, "ar", bits, "cuda")
    if study:
        generation_layers(model)
    engine = AREngine(model)
    rule = StopRule(frozenset([model.config.eos_token_id]), min_new_tokens=tokens)
    settings = DecodeSettings(tokens, temperature=0.1 if study else 0.0, top_p=0.9 if study else 1.0,
                              min_new_tokens=tokens)
    prompts = random_prompts(batch, 192 if study else plan.prompt_len, model.config.vocab_size)
    engine.generate(prompts, settings, rule, batch)  # capture the graphs outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate(prompts, settings, rule, batch)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    rows = [{"bits": bits, "batch": batch, "tokens": tokens, "study_settings": study, "kernel": e.key[:120], "group": kernel_group(e.key),
             "cuda_us": e.device_time_total, "calls": e.count, "wall_s": wall}
            for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(r["cuda_us"] for r in rows)
    for r in rows:
        r["share"] = r["cuda_us"] / total if total else None
    del model, engine
    release()
    return sorted(rows, key=lambda r: -r["cuda_us"])


@dataclass(frozen=True)
class TileGrid:
    """The tilings tried besides the default (the defaults: the grid of results/engine/engine_tiles.json);
    -1 stands for the default tiling's own value of a field (0/1 for the two switches)."""
    block_n: tuple[int, ...] = (64, 128)
    block_k: tuple[int, ...] = (64, 128)
    split_k: tuple[int, ...] = (1, 4, 8, 16)
    num_warps: tuple[int, ...] = (4,)
    num_stages: tuple[int, ...] = (3,)
    codes_in_thread: tuple[int, ...] = (-1,)
    half_pairs: tuple[int, ...] = (-1,)


def tilings(M: int, N: int, K: int, group_size: int, bits: int, grid: TileGrid = TileGrid()) -> list[MatmulTiling]:
    default = packed_matmul_tiling(M, N, K, group_size, False, bits, runs_wgmma(torch.device("cuda")))
    names = list(vars(grid))
    others = []
    for values in itertools.product(*(getattr(grid, name) for name in names)):
        fields = {name: type(getattr(default, name))(v) if v != -1 else getattr(default, name)
                  for name, v in zip(names, values)}
        if K % (fields["block_k"] * fields["split_k"]) == 0 and group_size % fields["block_k"] == 0:
            others.append(replace(default, **fields))
    return [default] + [t for i, t in enumerate(others) if t != default and t not in others[:i]]


def tile_rows(plan: Plan, rows: tuple[int, ...], bits_list: tuple[int, ...], grid: TileGrid = TileGrid()) -> list[dict]:
    """The packed matmul at each row count and tiling against bf16 nn.Linear."""
    shapes = layer_shapes(config(plan, "ar"))
    out = []
    for name, (K, N) in shapes.items():
        dense = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        xs = {m: torch.randn(m, K, device="cuda", dtype=torch.bfloat16) for m in rows}
        with torch.no_grad():
            t_dense = {m: graph_time(functools.partial(dense, x)) for m, x in xs.items()}
        locks = matmul_locks(N, "cuda")
        for bits in bits_list:
            layer = packed_like(dense, bits, plan.group_size)
            args = (layer.qweight, layer.scales, layer.qzeros, None, bits, plan.group_size, FORMAT_OFFSET[layer.format])
            for rows_m, x in xs.items():
                for k, t in enumerate(tilings(rows_m, N, K, plan.group_size, bits, grid)):
                    try:
                        seconds = graph_time(functools.partial(packed_matmul, x, *args, tiling=t, locks=locks))
                    except Exception as e:  # a tiling Triton cannot compile (registers, shared memory) is skipped
                        out.append({"layer": name, "bits": bits, "rows": rows_m, "tiling": vars(t),
                                    "error": str(e)[:200]})
                        continue
                    out.append({"layer": name, "K": K, "N": N, "bits": bits, "rows": rows_m, "default": k == 0,
                                "tiling": vars(t), "us_bf16": 1e6 * t_dense[rows_m], "us_packed": 1e6 * seconds,
                                "speedup": t_dense[rows_m] / seconds})
            del layer
        del dense
        release()
    return out


def summary(profile_rows: list[dict], tile_rows_: list[dict]) -> list[str]:
    lines = ["decoding step by kernel group (share of CUDA time)"]
    for bits in sorted({r["bits"] for r in profile_rows}):
        mine = [r for r in profile_rows if r["bits"] == bits]
        total = sum(r["cuda_us"] for r in mine)
        shares = {g: sum(r["cuda_us"] for r in mine if r["group"] == g) / total
                  for g in ("linear", "attention", "sampling", "other")}
        lines.append(f"  {bits:>2} bits: " + ", ".join(f"{g} {s:.0%}" for g, s in shares.items())
                     + f"; wall {mine[0]['wall_s']:.2f} s; top: " + "; ".join(
                         f"{r['kernel'][:40]} {r['share']:.0%}" for r in mine[:4]))
    lines.append("packed product against bf16 Linear, in CUDA graphs (default tiling, best tiling)")
    ok = [r for r in tile_rows_ if "error" not in r]
    for (layer, rows, bits) in sorted({(r["layer"], r["rows"], r["bits"]) for r in ok}):
        mine = [r for r in ok if r["layer"] == layer and r["rows"] == rows and r["bits"] == bits]
        default = next(r for r in mine if r["default"])
        best = max(mine, key=lambda r: r["speedup"])
        lines.append(f"  {layer:>12} {rows:>3} rows {bits} bits: default {default['speedup']:.2f}x, "
                     f"best {best['speedup']:.2f}x {best['tiling']}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--parts", default="profile,tiles", help="profile, tiles or both")
    parser.add_argument("--profile-tokens", type=int, default=64)
    parser.add_argument("--study-settings", action="store_true",
                        help="profile: batch 32 at the sweep's settings and layers (profile_steps) instead of batch 64 "
                             "greedy")
    parser.add_argument("--rows", default="64", help="the tiles' row counts, comma-separated")
    parser.add_argument("--bits", default="4", help="the tiles' widths, comma-separated")
    for name, default in vars(TileGrid()).items():
        parser.add_argument("--" + name.replace("_", "-"), default=",".join(map(str, default)),
                            help=f"tiles: the grid's {name} values (default {','.join(map(str, default))})")
    args = parser.parse_args()
    require_cuda("engine_breakdown.py")
    plan = Plan()
    os.makedirs(args.out, exist_ok=True)
    parts = args.parts.split(",")
    prof, tiles = [], []
    if "profile" in parts:
        batch = 32 if args.study_settings else 64
        prof = [r for bits in (16, 4) for r in profile_steps(plan, bits, batch, args.profile_tokens,
                                                             args.study_settings)]
        write_rows(os.path.join(args.out, "engine_profile.json"), prof, part="profile")
    if "tiles" in parts:
        grid = TileGrid(**{name: tuple(int(v) for v in getattr(args, name).split(",")) for name in vars(TileGrid())})
        tiles = tile_rows(plan, tuple(int(r) for r in args.rows.split(",")),
                          tuple(int(b) for b in args.bits.split(",")), grid)
        write_rows(os.path.join(args.out, "engine_tiles.json"), tiles, part="tiles")
    print("\n".join(summary(prof, tiles)))


if __name__ == "__main__":
    main()
