"""Where one batch-1 decoding step spends its GPU time, per bit width: the step runs eagerly
under torch.profiler, and its kernels are summed by kind (weight products, attention, the rest).
With --compile the step is compiled first, so the element-wise kernels are fused as they are in
`qrobust bench generate --compile`.

    python benchmarks/profile_decode.py [--bits 16,4] [--compile] [--fuse] [--fuse-norms] [--[no-]tinygemm]
                                        [--steps 20] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from qrobust.bench_generate import GenerateBench, build_model, random_prompt
from qrobust.models.decode import GreedyDecoder, fused, sync

from gpu_script import require_cuda, write_rows

KINDS = {  # substring of a kernel's name → kind, first match wins
    "_gemv_kernel": "products", "_sum_splits": "products", "_weight_int4pack": "products",
    "tinygemm": "products",
    "gemv": "products", "nvjet": "products", "gemm": "products", "xmma": "products", "cutlass": "products",
    "splitk": "products",
    "flash": "attention", "attention": "attention", "fmha": "attention", "softmax": "attention",
}


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for key, k in KINDS.items() if key in low), "other")


def profile_step(bench: GenerateBench, bits: int, steps: int) -> dict:
    model = build_model(bench, bits)
    device = model.device
    decoder = GreedyDecoder(model, bench.prompt_len + steps + 8, graphs=False)
    step = fused(decoder._eager_step, bench.compile)
    with torch.no_grad():
        decoder.generate(random_prompt(bench, model.config.vocab_size), 2)
        t0 = time.perf_counter()
        for _ in range(3):  # compiles, with --compile
            step()
        sync(device)
        warmup_s = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            sync(device)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.device_time / steps
            per_kernel[e.name][1] += 1 / steps
    by_kind: dict[str, float] = defaultdict(float)
    for name, (us, _) in per_kernel.items():
        by_kind[kind_of(name)] += us
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:12]
    del model, decoder
    torch.cuda.empty_cache()
    return {"bits": bits, "warmup_s": warmup_s, "gpu_us_per_step": sum(by_kind.values()), "by_kind_us": dict(by_kind),
            "kernels_per_step": sum(c for _, c in per_kernel.values()),
            "top": [{"kernel": n[:120], "us": us, "calls": c} for n, (us, c) in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="16,4")
    p.add_argument("--shape", default="qwen3-1.7b")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fuse", action="store_true")
    p.add_argument("--fuse-norms", action="store_true", help="as bench generate's (needs --fuse)")
    p.add_argument("--tinygemm", action=argparse.BooleanOptionalAction, default=None, help="as bench generate's")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    require_cuda("profile_decode.py")
    bits = tuple(int(b) for b in args.bits.split(","))
    bench = GenerateBench(shape=args.shape, kind="ar", bits=bits, compile=args.compile, fuse=args.fuse,
                          fuse_norms=args.fuse_norms, tinygemm=args.tinygemm)
    rows = [profile_step(bench, b, args.steps) for b in bits]
    for r in rows:
        kinds = ", ".join(f"{k} {us:.0f}" for k, us in sorted(r["by_kind_us"].items()))
        print(f"{r['bits']:>2}-bit: {r['gpu_us_per_step']:.0f} µs of kernels per step "
              f"({r['kernels_per_step']:.0f} kernels): {kinds}; warm-up {r['warmup_s']:.1f} s")
        for t in r["top"]:
            print(f"    {t['us']:8.1f} µs {t['calls']:5.0f}x  {t['kernel']}")
    write_rows(args.out, rows, bench=vars(args))


if __name__ == "__main__":
    main()
