"""Products with packed weights at Qwen3-1.7B's layer shapes, all in one run, each call replayed
50 times inside a CUDA graph (as decoding runs them):

- one row (batch-1 decoding): fp16 cuBLAS, qrobust's packed GEMV at 2/3/4/8 bits (several
  K-splits), and PyTorch's int4 tinygemm kernel (the one torchao's int4 weight-only layout runs)
  as the best existing alternative at 4 bits;
- --rows R (prefill, diffusion steps): fp16 cuBLAS, dequantize-then-matmul (what QuantLinear does
  now) and the fused dequantize-and-matmul kernel.

Every kernel's output is checked against the torch dequantization first; a wrong one is
reported, not timed.

    python benchmarks/packed_gemv.py [--splits 2,4,8] [--block-n 64] [--block-k 256] [--warps 4]
                                     [--rows 16,96,256] [--out FILE.json]

Several values of --splits/--block-n/--block-k/--warps time every combination; the last lines
print the fastest per layer and width.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F

from qrobust.models.decode import capture, sync
from qrobust.kernels.tinygemm import TinyGemmLinear
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.qlinear import FORMAT_OFFSET, QuantLinear

SHAPES = {"q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (1024, 2048), "gate/up_proj": (6144, 2048),
          "down_proj": (2048, 6144), "qkv (fused)": (4096, 2048), "gate_up (fused)": (12288, 2048)}
CALLS = 50


def graph_us(fn, device, repeats: int = 20) -> float:
    """Median µs per call of fn, CALLS calls per CUDA-graph replay (one call, once, on CPU)."""
    calls = CALLS if device.type == "cuda" else 1
    repeats = repeats if device.type == "cuda" else 1

    def many():
        for _ in range(calls):
            out = fn()
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


def checked(row: dict, fn, ref: torch.Tensor, base: float, device, tol: float = 1e-2) -> dict:
    """`row` with fn's largest error relative to the reference and, where that is within `tol`,
    its time and its speed against the fp16 product (`base` µs). A wrong kernel is not timed."""
    row["max_rel_err"] = float((fn().float() - ref).abs().max() / ref.abs().max())
    if row["max_rel_err"] < tol:
        row["us"] = graph_us(fn, device)
        row["vs_fp16"] = base / row["us"]
    return row


def packed(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> tuple[QuantLinear, int]:
    """w rounded to nearest as a packed layer, and the bytes its product reads."""
    layer = QuantLinear.from_result(rtn(w, QuantSpec(bits, group_size, sym=True)), None, dtype)
    return layer, sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales))


def batched_rows(name: str, N: int, K: int, args, device) -> list[dict]:
    """fp16 matmul vs dequantize-then-matmul vs the fused kernel, at each --rows batch and width."""
    from qrobust.kernels.gptq_matmul import gptq_dequantize, gptq_matmul

    out = []
    torch.manual_seed(0)
    w = torch.randn(N, K, device=device) * 0.02
    for M in (int(m) for m in args.rows.split(",") if m):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        x = torch.randn(M, K, device=device, dtype=dtype)
        fp16 = w.to(dtype)
        base = graph_us(lambda: F.linear(x, fp16), device)
        out.append({"layer": name, "N": N, "K": K, "rows": M, "kernel": f"fp16 cuBLAS, {M} rows", "us": base,
                    "vs_fp16": 1.0, "weight_bytes": N * K * 2})
        for bits in (int(b) for b in args.bits.split(",")):
            layer, nbytes = packed(w, bits, args.group_size, dtype)
            qargs = (layer.qweight, layer.scales, layer.qzeros, None, bits, args.group_size, FORMAT_OFFSET[layer.format])
            ref = F.linear(x.float(), layer.dequantized_weight())
            for label, fn in ((f"dequantize+matmul {bits}-bit", lambda: x @ gptq_dequantize(*qargs, K=K, dtype=x.dtype)),
                              (f"fused matmul {bits}-bit", lambda: gptq_matmul(x, *qargs))):
                out.append(checked({"layer": name, "N": N, "K": K, "rows": M, "kernel": f"{label}, {M} rows",
                                    "weight_bytes": nbytes}, fn, ref, base, device))
    return out


def main() -> None:
    from qrobust.kernels.gptq_matmul import gemv_config, gemv_locks, gptq_gemv

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--splits", default="2,4,8", help="K-splits of the GEMV to time, besides the default tiling")
    p.add_argument("--block-n", default="64", help="output tile widths of the GEMV")
    p.add_argument("--block-k", default="256", help="tile depths of the GEMV (whole groups or parts of one)")
    p.add_argument("--warps", default="4", help="warps per GEMV program")
    p.add_argument("--stages", default="3", help="software-pipelining stages of the GEMV's loop")
    p.add_argument("--locks", default="1", help="1: the last K-split adds the partial sums; 0: a second kernel does")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rows", default="16,96,256", help="batch sizes for the matmul comparison ('' to skip)")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true",
                   help="shapes 16x smaller, on CPU under TRITON_INTERPRET=1: checks the script, times nothing useful")
    args = p.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        shapes = {name: (N // 16, K // 16) for name, (N, K) in SHAPES.items()}
    elif torch.cuda.is_available():
        device, shapes = torch.device("cuda", torch.cuda.current_device()), SHAPES
    else:
        raise SystemExit("packed_gemv.py: needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    rows = []
    for name, (N, K) in shapes.items():
        torch.manual_seed(0)
        w = torch.randn(N, K, device=device) * 0.02
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        x = torch.randn(1, K, device=device, dtype=dtype)
        fp16 = w.to(dtype)
        base = graph_us(lambda: F.linear(x, fp16), device)
        rows.append({"layer": name, "N": N, "K": K, "kernel": "fp16 cuBLAS", "us": base, "vs_fp16": 1.0,
                     "weight_bytes": N * K * 2})
        for bits in (int(b) for b in args.bits.split(",")):
            layer, nbytes = packed(w, bits, args.group_size, dtype)
            ref = F.linear(x.float(), layer.dequantized_weight())
            gemv_args = (layer.qweight, layer.scales, layer.qzeros, None, bits, args.group_size,
                         FORMAT_OFFSET[layer.format])
            default = gemv_config(N, K, args.group_size, False, device)
            combos = [(str(default.splits), str(default.block_n), str(default.block_depth), str(default.num_warps),
                       "3", "1")]
            combos += itertools.product(*(getattr(args, a).split(",") for a in
                                          ("splits", "block_n", "block_k", "warps", "stages", "locks")))
            for i, (splits, bn, bk, warps, stages, locks) in enumerate(combos):
                s = int(splits)
                if K % (s * int(bk)) or (s == 1 and locks == "0"):
                    continue
                cfg = {"splits": s, "block_n": int(bn), "block_depth": int(bk), "num_warps": int(warps),
                       "num_stages": int(stages), "locks": gemv_locks(N, device, 1, int(bn)) if locks == "1" else None}
                label = "default " if i == 0 else ""
                rows.append(checked({"layer": name, "N": N, "K": K, "bits": bits,
                                     "config": {**cfg, "locks": locks == "1"}, "default": i == 0,
                                     "kernel": f"qrobust {bits}-bit {label}s{splits} n{bn} k{bk} w{warps} p{stages} l{locks}",
                                     "weight_bytes": nbytes}, lambda: gptq_gemv(x, *gemv_args, **cfg), ref, base, device))
            if bits == 4:
                try:
                    t = TinyGemmLinear.from_quant_linear(layer)
                    xb = x.bfloat16()
                    row = checked({"layer": name, "N": N, "K": K, "bits": 4, "kernel": "torch int4 tinygemm (bf16)",
                                   "weight_bytes": t.weight_int4.numel() * t.weight_int4.element_size()
                                   + t.scales_and_zeros.numel() * 2},
                                  lambda: torch.ops.aten._weight_int4pack_mm(xb, t.weight_int4, args.group_size,
                                                                             t.scales_and_zeros),
                                  ref, base, device, tol=2e-2)
                except (RuntimeError, NotImplementedError) as e:
                    row = {"layer": name, "N": N, "K": K, "kernel": "torch int4 tinygemm (bf16)",
                           "error": str(e).splitlines()[0][:200]}
                rows.append(row)
    for name, (N, K) in shapes.items():
        rows += batched_rows(name, N, K, args, device)
    for r in rows:
        if "us" in r:
            gbs = r["weight_bytes"] / r["us"] / 1e3
            print(f"{r['layer']:<14} {r['kernel']:<34} {r['us']:8.2f} µs  {r['vs_fp16']:5.2f}x fp16  {gbs:7.0f} GB/s")
        else:
            print(f"{r['layer']:<14} {r['kernel']:<34} not timed: {r.get('error') or 'max rel. error %.3g' % r['max_rel_err']}")
    print("fastest per layer and width (one row):")
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["layer"], r.get("bits", 16))
        if "us" in r and "rows" not in r and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    defaults = {(r["layer"], r["bits"]): r for r in rows if r.get("default") and "us" in r}
    for (layer, bits), r in best.items():
        d = defaults.get((layer, bits))
        note = f"  (default tiling {d['us']:.2f} µs)" if d is not None and d is not r else ""
        print(f"{layer:<16} {bits:>2}-bit {r['kernel']:<40} {r['us']:8.2f} µs  {r['vs_fp16']:5.2f}x fp16{note}")
    if args.out:
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "calls_per_graph": CALLS, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
