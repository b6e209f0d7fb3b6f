"""Whether the decode-attention kernel changes what the model computes, at Qwen3-1.7B's shape:
two copies of the KV cache are fed the same tokens (greedy from the torch path), one step through
the torch attention path (repeat + mask + SDPA) and one through qrobust's kernel, and each step's
last-position logits are compared: their largest difference relative to the largest logit, and
the steps whose argmax differs with the torch path's top-2 margin there (random-weight models
have nearly flat logits, so a margin of an fp16 rounding step or two flips greedy decoding).

    python benchmarks/attention_agreement.py [--bits 16,2] [--steps 128] [--out FILE.json]
"""
from __future__ import annotations

import argparse

import torch

from qrobust.bench_generate import GenerateBench, build_model, random_prompt
from qrobust.models.decode import greedy_token, use_attention_kernel

from gpu_script import require_cuda, write_rows


def compare(bench: GenerateBench, bits: int, steps: int) -> dict:
    model = build_model(bench, bits)
    device = model.device
    prompt = random_prompt(bench, model.config.vocab_size).to(device)
    P = prompt.numel()
    caches = [model.new_caches(1, P + steps, torch.arange(P, device=device)) for _ in range(2)]
    rel, margins, flips = [], [], []
    with torch.no_grad():
        token = greedy_token(model.forward_cached(prompt[None], caches[0])[:, -1])
        model.forward_cached(prompt[None], caches[1])
        for t in range(P, P + steps):
            position = torch.tensor([t], device=device)
            logits = []
            for kernel, cache in zip((False, True), caches):
                for layer in cache:
                    layer.positions = position
                use_attention_kernel(model, kernel)
                logits.append(model.forward_cached(token, cache)[0, -1].float())
            ref, out = logits
            rel.append(float((ref - out).abs().max() / ref.abs().max()))
            top = ref.topk(2).values
            margins.append(float(top[0] - top[1]))
            if ref.argmax() != out.argmax():
                flips.append({"position": t, "top2_margin": margins[-1]})
            token = greedy_token(ref[None])
    return {"bits": bits, "steps": steps, "max_rel_logit_diff": max(rel),
            "median_rel_logit_diff": sorted(rel)[steps // 2], "argmax_flips": flips,
            "smallest_top2_margins": sorted(margins)[:5], "logit_scale": float(ref.abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="16,2")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    require_cuda("attention_agreement.py")
    bench = GenerateBench(fuse=True, attention_kernel=False)  # the kernel is switched per step
    rows = [compare(bench, int(b), args.steps) for b in args.bits.split(",")]
    for r in rows:
        flips = ", ".join(f"{f['position']} (margin {f['top2_margin']:.4f})" for f in r["argmax_flips"]) or "none"
        print(f"{r['bits']:>2}-bit: logits differ by at most {100 * r['max_rel_logit_diff']:.2f}% of the largest "
              f"({r['logit_scale']:.2f}), median {100 * r['median_rel_logit_diff']:.2f}%; argmax differs at {flips}; "
              f"smallest top-2 margins {r['smallest_top2_margins']}")
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
