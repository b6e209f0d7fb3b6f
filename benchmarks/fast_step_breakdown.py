"""Where one step of the fast diffusion sampler goes, at the real shape on a GPU: the block forward
(the graph replayed alone), the token choice at greedy and at CoDA's sampling settings, and whole
generations with each, so that sampler overhead shows against the model's own cost.

    PYTHONPATH=. python3 benchmarks/fast_step_breakdown.py --out FILE.json [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gpu_script import median_seconds
from qrobust.bench import QuantBench, random_lm, shape_config
from qrobust.models.diffusion import SamplerConfig, choose
from qrobust.models.decode import sync
from qrobust.models.fast_dllm import fast_diffusion_generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-1.7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = shape_config(QuantBench(shape=args.shape, kind="diffusion", layers=args.layers, vocab_size=args.vocab_size))
    model = random_lm(cfg, device, 0, dtype).eval()
    B, T, V = args.batch, args.block, cfg.vocab_size
    mask_id = V - 1
    ids = torch.randint(0, V - 1, (B, args.prompt), device=device)
    attn = torch.ones_like(ids)
    sampled = SamplerConfig(mode="fast", block_length=T, temperature=0.1, top_p=0.9, alg="entropy")
    greedy = SamplerConfig(mode="fast", block_length=T, alg="entropy")
    logits = torch.randn(B * T, V, device=device, dtype=dtype) * 0.5
    g = torch.Generator().manual_seed(0)
    rows = {"choose_greedy_s": median_seconds(lambda: choose(logits, greedy, g), device, args.repeats),
            "choose_sampled_s": median_seconds(lambda: choose(logits, sampled, g), device, args.repeats)}
    steps = {}
    for name, sc in (("greedy", greedy), ("sampled", sampled)):
        t0 = time.perf_counter()
        _, passes = fast_diffusion_generate(model, ids, attn, args.new_tokens, mask_id, True, sc, g)
        sync(device)
        seconds = time.perf_counter() - t0
        steps[name] = {"seconds": seconds, "passes": passes, "per_pass_s": seconds / passes}
    # the model's own cost: one block forward over a cache (what each step replays)
    with torch.no_grad():
        L = args.prompt + args.new_tokens
        caches = model.new_caches(B, L, torch.arange(T, device=device))
        x = torch.randint(0, V - 1, (B, T), device=device)
        pos = torch.arange(T, device=device)[None].expand(B, T)
        keys = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
        block_forward = median_seconds(lambda: model.forward_slots(x, caches, pos, keys), device, args.repeats)
        full = torch.randint(0, V - 1, (B, L), device=device)
        full_forward = median_seconds(lambda: model(full, torch.ones_like(full), sync_free=True), device, args.repeats)
    result = {"args": vars(args), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "torch": torch.__version__, **rows, "block_forward_eager_s": block_forward,
              "full_forward_eager_s": full_forward, "generate": steps}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
