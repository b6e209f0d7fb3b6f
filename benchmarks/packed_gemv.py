"""Products with packed weights at Qwen3-1.7B's layer shapes, all in one run, each call replayed
50 times inside a CUDA graph (as decoding runs them). The calls cycle through copies of the
weights that together fill twice the L2 cache, so that every call reads its weights from memory
as decoding does (a single weight replayed would stay in L2):

- one row (batch-1 decoding): fp16 cuBLAS, qrobust's packed GEMV at 2/3/4/8 bits (its default
  tiling and the ones asked for), PyTorch's int4 tinygemm kernel (the one torchao's int4
  weight-only layout runs) as the best existing alternative at 4 bits, and with --marlin
  GPTQModel's Marlin kernel at 4 and 8 bits (GPTQModel installed; it compiles Marlin on first
  use, which took 4 minutes on the H100 machine);
- --rows R (prefill, diffusion steps): fp16 cuBLAS, dequantize-then-matmul (what QuantLinear does
  now) and the fused dequantize-and-matmul kernel.

Every kernel's output is checked against the torch dequantization first; a wrong one is
reported, not timed.

    python benchmarks/packed_gemv.py [--splits 16,48] [--block-n 32,64] [--block-k 64,128]
                                     [--warps 1,2] [--half2 0,1] [--rows 16,96,256] [--marlin]
                                     [--layers down_proj,...]
                                     [--out FILE.json]

Several values of --splits/--block-n/--block-k/--warps time every combination whose tile fits
in registers; the last lines print the fastest per layer and width.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from qrobust.models.decode import capture, sync
from qrobust.kernels.tinygemm import TinyGemmLinear
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.pack import repack_qweight
from qrobust.quant.qlinear import FORMAT_OFFSET, QuantLinear

SHAPES = {"q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (1024, 2048), "gate/up_proj": (6144, 2048),
          "down_proj": (2048, 6144), "qkv (fused)": (4096, 2048), "gate_up (fused)": (12288, 2048)}
CALLS = 50


def copies(nbytes: int, device) -> int:
    """How many copies of a weight of `nbytes` fill twice the L2 cache (at most CALLS; 1 on CPU)."""
    if device.type != "cuda":
        return 1
    return min(CALLS, max(1, math.ceil(2 * torch.cuda.get_device_properties(device).L2_cache_size / nbytes)))


def replicas(operands, n: int) -> list:
    """`operands` and n − 1 deep copies of it (tensors, modules or tuples of them)."""
    return [operands] + [copy.deepcopy(operands) for _ in range(n - 1)]


def graph_us(fns, device, repeats: int = 20) -> float:
    """Median µs per call, CALLS calls per CUDA-graph replay cycling through `fns` (the same
    product on different copies of its weights); on CPU one call, once."""
    calls = CALLS if device.type == "cuda" else 1
    repeats = repeats if device.type == "cuda" else 1

    def many():
        for i in range(calls):
            out = fns[i % len(fns)]()
        return out

    replay = capture(many, device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        replay()
        sync(device)
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def checked(row: dict, fns, ref: torch.Tensor, base: float, device, tol: float = 1e-2) -> dict:
    """`row` with the product's largest error relative to the reference and, where that is within
    `tol`, its time (graph_us over `fns`) and its speed against the fp16 product (`base` µs). A
    wrong kernel is not timed."""
    row["max_rel_err"] = float((fns[0]().float() - ref).abs().max() / ref.abs().max())
    row["weight_copies"] = len(fns)
    if row["max_rel_err"] < tol:
        row["us"] = graph_us(fns, device)
        row["vs_fp16"] = base / row["us"]
    print(f"{row['layer']:<14} {row['kernel']:<44} {row.get('us', float('nan')):8.2f} µs", file=sys.stderr, flush=True)
    return row


def packed(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> tuple[QuantLinear, int]:
    """w rounded to nearest as a packed layer, and the bytes its product reads."""
    layer = QuantLinear.from_result(rtn(w, QuantSpec(bits, group_size, sym=True)), None, dtype)
    return layer, sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales))


def dense_us(w: torch.Tensor, x: torch.Tensor, device) -> float:
    """The fp16 (cuBLAS) product's µs per call, L2-cold like the others."""
    weights = replicas(w.to(x.dtype), copies(w.numel() * 2, device))
    return graph_us([lambda w=c: F.linear(x, w) for c in weights], device)


def batched_rows(name: str, N: int, K: int, args, device) -> list[dict]:
    """fp16 matmul vs dequantize-then-matmul vs the fused kernel, at each --rows batch and width."""
    from qrobust.kernels import gptq_dequantize, gptq_matmul

    out = []
    torch.manual_seed(0)
    w = torch.randn(N, K, device=device) * 0.02
    for M in (int(m) for m in args.rows.split(",") if m):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        x = torch.randn(M, K, device=device, dtype=dtype)
        base = dense_us(w, x, device)
        out.append({"layer": name, "N": N, "K": K, "rows": M, "kernel": f"fp16 cuBLAS, {M} rows", "us": base,
                    "vs_fp16": 1.0, "weight_bytes": N * K * 2})
        for bits in (int(b) for b in args.bits.split(",")):
            layer, nbytes = packed(w, bits, args.group_size, dtype)
            ref = F.linear(x.float(), layer.dequantized_weight())
            operands = replicas((layer.qweight, layer.scales, layer.qzeros), copies(nbytes, device))
            rest = (None, bits, args.group_size, FORMAT_OFFSET[layer.format])
            for label, product in ((f"dequantize+matmul {bits}-bit",
                                    lambda o: x @ gptq_dequantize(*o, *rest, K=K, dtype=x.dtype)),
                                   (f"fused matmul {bits}-bit", lambda o: gptq_matmul(x, *o, *rest))):
                out.append(checked({"layer": name, "N": N, "K": K, "rows": M, "kernel": f"{label}, {M} rows",
                                    "weight_bytes": nbytes}, [lambda o=o, f=product: f(o) for o in operands],
                                   ref, base, device))
    return out


def gemv_rows(name: str, N: int, K: int, bits: int, layer: QuantLinear, nbytes: int, x: torch.Tensor,
              ref: torch.Tensor, base: float, args, device) -> list[dict]:
    """Our GEMV at the default tiling and at every combination asked for."""
    from qrobust.kernels import gemv_config, gemv_locks, gptq_gemv

    # the half2 sums read 3-bit codes in the pairs layout (qrobust.quant.pack), as QuantLinear.half2 repacks them
    layouts = {"gptq": layer.qweight, "pairs": repack_qweight(layer.qweight, bits, K, "gptq", "pairs")} \
        if bits == 3 else {"gptq": layer.qweight}
    operands = {name: replicas((words, layer.scales, layer.qzeros), copies(nbytes, device))
                for name, words in layouts.items()}
    rest = (None, bits, args.group_size, FORMAT_OFFSET[layer.format])
    d = gemv_config(K, args.group_size, False)
    combos = [(d.splits, d.block_n, d.block_depth, d.num_warps, 3, 1)]
    combos += itertools.product(*([int(v) for v in getattr(args, a).split(",")] for a in
                                  ("splits", "block_n", "block_k", "warps", "stages", "locks")))
    out = []
    for i, (splits, bn, bk, warps, stages, locks) in enumerate(combos):
        if K % (splits * bk) or (splits == 1 and locks == 0):
            continue
        if (bk // 32) * bn > 512 * warps:
            continue  # more than 16 codes per thread and chunk of 32 inputs spill registers
        for half2 in (bool(int(h)) for h in args.half2.split(",")):
            layout = "pairs" if half2 and "pairs" in layouts else "gptq"
            cfg = {"splits": splits, "block_n": bn, "block_depth": bk, "num_warps": warps, "num_stages": stages,
                   "locks": gemv_locks(N, device, 1, bn) if locks else None, "half2": half2, "layout": layout}
            label = ("default " if i == 0 else "") + ("half2 " if half2 else "")
            kernel = f"qrobust {bits}-bit {label}s{splits} n{bn} k{bk} w{warps} p{stages} l{locks}"
            out.append(checked({"layer": name, "N": N, "K": K, "bits": bits, "default": i == 0, "half2": half2,
                                "config": {**cfg, "locks": bool(locks)}, "weight_bytes": nbytes, "kernel": kernel},
                               [lambda o=o, cfg=cfg: gptq_gemv(x, *o, *rest, **cfg) for o in operands[layout]], ref,
                               base, device))
    return out


def tinygemm_row(name: str, N: int, K: int, layer: QuantLinear, x: torch.Tensor, ref: torch.Tensor, base: float,
                 args, device) -> dict:
    row = {"layer": name, "N": N, "K": K, "bits": 4, "kernel": "torch int4 tinygemm (bf16)"}
    try:
        t = TinyGemmLinear.from_quant_linear(layer)
        nbytes = t.weight_int4.numel() * t.weight_int4.element_size() + t.scales_and_zeros.numel() * 2
        operands = replicas((t.weight_int4, t.scales_and_zeros), copies(nbytes, device))
        xb = x.bfloat16()
        return checked({**row, "weight_bytes": nbytes},
                       [lambda o=o: torch.ops.aten._weight_int4pack_mm(xb, o[0], args.group_size, o[1])
                        for o in operands], ref, base, device, tol=2e-2)
    except (RuntimeError, NotImplementedError) as e:
        return {**row, "error": str(e).splitlines()[0][:200]}


def marlin_row(name: str, N: int, K: int, bits: int, layer: QuantLinear, x: torch.Tensor, ref: torch.Tensor,
               base: float, args, device) -> dict:
    """GPTQModel's Marlin kernel on the same (symmetric) checkpoint, repacked by GPTQModel."""
    row = {"layer": name, "N": N, "K": K, "bits": bits, "kernel": f"GPTQModel Marlin {bits}-bit"}
    try:
        from engine_gpu import gptqmodel_marlin

        m = gptqmodel_marlin(layer, torch.float16)
        nbytes = sum(t.numel() * t.element_size() for t in (m.qweight, m.scales))
        layers = replicas(m, copies(nbytes, device))
        return checked({**row, "weight_bytes": nbytes}, [lambda m=m: m(x) for m in layers], ref, base, device)
    except Exception as e:  # noqa: BLE001 - an optional peer: any failure is reported, not fatal
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--splits", default="16", help="K-splits of the GEMV to time, besides the default tiling")
    p.add_argument("--block-n", default="64", help="output tile widths of the GEMV")
    p.add_argument("--block-k", default="128", help="tile depths of the GEMV (multiples of 32)")
    p.add_argument("--warps", default="2", help="warps per GEMV program")
    p.add_argument("--stages", default="3", help="software-pipelining stages of the GEMV's loop")
    p.add_argument("--locks", default="1", help="1: the last K-split adds the partial sums; 0: a second kernel does")
    p.add_argument("--half2", default="0", help="0: float32 sums; 1: codes summed two at a time in float16 (0,1: both)")
    p.add_argument("--layers", default=",".join(SHAPES), help="which layer shapes, comma separated")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rows", default="16,96,256", help="batch sizes for the matmul comparison ('' to skip)")
    p.add_argument("--marlin", action="store_true", help="also time GPTQModel's Marlin kernel at 4 and 8 bits")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true",
                   help="shapes 16x smaller, on CPU under TRITON_INTERPRET=1: checks the script, times nothing useful")
    args = p.parse_args()
    layers = args.layers.split(",")
    unknown = set(layers) - set(SHAPES)
    if unknown:
        raise SystemExit(f"packed_gemv.py: unknown --layers {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    shapes = {name: shape for name, shape in SHAPES.items() if name in layers}
    if args.smoke:
        device = torch.device("cpu")
        shapes = {name: (N // 16, K // 16) for name, (N, K) in shapes.items()}
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise SystemExit("packed_gemv.py: needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    rows = []
    for name, (N, K) in shapes.items():
        torch.manual_seed(0)
        w = torch.randn(N, K, device=device) * 0.02
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        x = torch.randn(1, K, device=device, dtype=dtype)
        base = dense_us(w, x, device)
        rows.append({"layer": name, "N": N, "K": K, "kernel": "fp16 cuBLAS", "us": base, "vs_fp16": 1.0,
                     "weight_bytes": N * K * 2})
        for bits in (int(b) for b in args.bits.split(",")):
            layer, nbytes = packed(w, bits, args.group_size, dtype)
            ref = F.linear(x.float(), layer.dequantized_weight())
            rows += gemv_rows(name, N, K, bits, layer, nbytes, x, ref, base, args, device)
            if bits == 4:
                rows.append(tinygemm_row(name, N, K, layer, x, ref, base, args, device))
            if args.marlin and bits in (4, 8):
                rows.append(marlin_row(name, N, K, bits, layer, x, ref, base, args, device))
    for name, (N, K) in shapes.items():
        rows += batched_rows(name, N, K, args, device)
    for r in rows:
        if "us" in r:
            gbs = r["weight_bytes"] / r["us"] / 1e3
            print(f"{r['layer']:<14} {r['kernel']:<44} {r['us']:8.2f} µs  {r['vs_fp16']:5.2f}x fp16  {gbs:7.0f} GB/s")
        else:
            why = r.get("error") or "max rel. error %.3g" % r["max_rel_err"]
            print(f"{r['layer']:<14} {r['kernel']:<44} not timed: {why}")
    print("fastest per layer and width (one row):")
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["layer"], r.get("bits", 16))
        if "us" in r and "rows" not in r and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    defaults = {(r["layer"], r["bits"]): r for r in rows if r.get("default") and not r.get("half2") and "us" in r}
    for (layer, bits), r in best.items():
        d = defaults.get((layer, bits))
        note = f"  (default tiling {d['us']:.2f} µs)" if d is not None and d is not r else ""
        print(f"{layer:<16} {bits:>2}-bit {r['kernel']:<40} {r['us']:8.2f} µs  {r['vs_fp16']:5.2f}x fp16{note}")
    if args.out:
        env = {"torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "calls_per_graph": CALLS, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
