"""The batched generation engine (qrobust.models.engine) on one GPU, in one process (~5 minutes
on an H200), on random-weight models of the real shapes in bfloat16:

(a) AR throughput at batch 64 and 8 × 512 new tokens, every row forced to full length
    (min_new_tokens), for bf16 dense and packed RTN 8/4/3/2-bit layers (group 128), with each
    width's ratio to bf16 measured in the same run; plus the packed products alone at the
    engine's row counts against bf16 nn.Linear at Qwen3-1.7B's layer shapes (kernel table check);
(b) greedy agreement of the engine with transformers' generate on the same random Qwen3-1.7B
    model: per row the first position where the tokens differ and, there, the gap between the
    two largest logits of transformers' model (random weights give near-ties early; a
    difference at a tiny gap is rounding, not a bug);
(c) diffusion on the CoDA-shaped model (causal=False) at batch 8 × 256 tokens: the exact
    sampler (one token per step) against the fast sampler (blocks of 32, threshold 0.9).

Rows go to $OUT (or --out) as JSON files as each part finishes: engine_ar.json,
engine_kernels.json, engine_agreement.json, engine_diffusion.json; a summary table is printed.

    python benchmarks/engine_gpu.py --out "$OUT"          # on a CUDA machine
    python benchmarks/engine_gpu.py --tiny --out /tmp/x   # small shapes, also on CPU (checks it runs)
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from gpu_script import median_seconds, write_rows
from qrobust.bench import QuantBench, random_lm, shape_config
from qrobust.bench_generate import model_bytes, quantize_blocks_rtn
from qrobust.models.decode import sync
from qrobust.models.engine import AREngine, DecodeSettings, StopRule
from qrobust.models.transformer import RMSNorm, TransformerConfig, TransformerLM
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.qlinear import QuantLinear

TINY = TransformerConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32)


@dataclass
class Plan:
    batches: tuple[int, ...] = (64, 8)
    new_tokens: int = 512
    prompt_len: int = 128
    bits: tuple[int, ...] = (16, 8, 4, 3, 2)
    group_size: int = 128
    agreement_rows: int = 8
    agreement_tokens: int = 128
    diffusion_batch: int = 8
    diffusion_tokens: int = 256
    diffusion_block: int = 32
    kernel_rows: tuple[int, ...] = (8, 16, 64)
    tiny: bool = False


def tiny_plan() -> Plan:
    return Plan(batches=(8, 3), new_tokens=12, prompt_len=6, group_size=32, agreement_rows=3, agreement_tokens=8,
                diffusion_batch=2, diffusion_tokens=16, diffusion_block=8, kernel_rows=(8,), tiny=True)


def config(plan: Plan, kind: str) -> TransformerConfig:
    cfg = shape_config(QuantBench(kind=kind))
    if plan.tiny:
        cfg = replace(TINY, causal=kind == "ar", mask_token_id=TINY.vocab_size - 1, pad_token_id=TINY.vocab_size - 2,
                      eos_token_id=TINY.vocab_size - 3, bos_token_id=TINY.vocab_size - 3)
    return cfg


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build(plan: Plan, kind: str, bits: int, device: str, dtype: torch.dtype | None = None) -> TransformerLM:
    model = random_lm(config(plan, kind), device, seed=0, dtype=dtype or dtype_for(device)).eval()
    if bits != 16:
        quantize_blocks_rtn(model, QuantSpec(bits, plan.group_size, sym=True))
    return model


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 3, (n, length), generator=g).tolist()


def release() -> None:
    """Return the memory of what the caller just deleted to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- (a) AR throughput ---------------------------------------------------------------------------
def ar_throughput(plan: Plan, device: str, norm_kernel: bool = True) -> list[dict]:
    rows = []
    for bits in plan.bits:
        model = build(plan, "ar", bits, device)
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.kernel = norm_kernel
        engine = AREngine(model)
        rule = StopRule(frozenset([model.config.eos_token_id]), min_new_tokens=plan.new_tokens)
        settings = DecodeSettings(plan.new_tokens, min_new_tokens=plan.new_tokens)
        for batch in plan.batches:
            prompts = random_prompts(batch, plan.prompt_len, model.config.vocab_size)
            engine.generate(prompts, settings, rule, batch)  # warm-up: graphs of every length bucket
            out = engine.generate(prompts, settings, rule, batch)
            seconds = sum(b.seconds for b in out.batches)
            tokens = sum(len(t) for t in out.tokens)
            rows.append({"bits": bits, "batch": batch, "norm_kernel": norm_kernel, "new_tokens": plan.new_tokens,
                         "tokens": tokens,
                         "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "forward_passes": sum(b.forward_passes for b in out.batches),
                         "weights_gib": model_bytes(model) / 2**30})
            print(f"  ar {bits:>2}-bit batch {batch:>3}: {tokens / seconds:9.1f} tok/s", flush=True)
        del model, engine
        release()
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["bits"] == 16}
    for r in rows:
        r["ratio_to_bf16"] = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else None
    return rows


def norm_kernels(plan: Plan, device: str) -> list[dict]:
    """AR throughput with RMSNorm's torch form (seven kernels) and with its one kernel, in the same run."""
    short = replace(plan, bits=(16, 4), new_tokens=min(plan.new_tokens, 256), batches=(64, 32) if not plan.tiny else (3,))
    rows = ar_throughput(short, device, norm_kernel=False) + ar_throughput(short, device, norm_kernel=True)
    torch_form = {(r["bits"], r["batch"]): r["tokens_per_s"] for r in rows if not r["norm_kernel"]}
    for r in rows:
        r["vs_torch_norms"] = r["tokens_per_s"] / torch_form[r["bits"], r["batch"]]
    return rows


def kernel_table_check(plan: Plan, device: str) -> list[dict]:
    """Each packed layer's forward at the engine's row counts (the table's product) against the
    bf16 nn.Linear of the same shape, 20 calls per timing (weights may partly stay in L2)."""
    cfg = config(plan, "ar")
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (h, cfg.num_attention_heads * cfg.head_dim),
              "k_proj": (h, cfg.num_key_value_heads * cfg.head_dim), "gate_proj": (h, i), "down_proj": (i, h)}
    dtype = dtype_for(device)
    rows = []
    for name, (K, N) in shapes.items():
        dense = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        for bits in [b for b in plan.bits if b != 16]:
            layer = QuantLinear.from_result(rtn(dense.weight.float(), QuantSpec(bits, plan.group_size, sym=True)),
                                            None, dtype).to(device)
            for m in plan.kernel_rows:
                x = torch.randn(m, K, device=device, dtype=dtype)
                with torch.no_grad():
                    t_dense = median_seconds(functools.partial(dense, x), device, 20)
                    t_packed = median_seconds(functools.partial(layer, x), device, 20)
                    err = (layer(x).float() - x.float() @ layer.dequantized_weight().t()).abs().max().item()
                rows.append({"layer": name, "K": K, "N": N, "bits": bits, "rows": m,
                             "kernel": layer.packed_kernel(m, x.device) if layer.uses_kernels(x.device) else "torch",
                             "us_bf16": 1e6 * t_dense, "us_packed": 1e6 * t_packed, "speedup": t_dense / t_packed,
                             "max_abs_error": err})
        del dense, layer
        release()
    return rows


# ---- (b) agreement with transformers -------------------------------------------------------------
def transformers_twin(model: TransformerLM):
    """transformers' Qwen3ForCausalLM holding the native model's weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qrobust.models.files import hf_config_dict

    cfg = hf_config_dict(model.config)
    cfg.pop("model_type", None), cfg.pop("architectures", None), cfg.pop("dtype", None)
    dtype = model.model.embed_tokens.weight.dtype
    with torch.device(model.device):
        twin = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(dtype)
    twin.load_state_dict(model.state_dict(), strict=False)
    twin.tie_weights()
    return twin.eval()


def agreement(plan: Plan, device: str) -> list[dict]:
    rows = []
    dtypes = [dtype_for(device)] + ([torch.float32] if torch.device(device).type == "cuda" else [])
    for dtype in dtypes:
        model = build(plan, "ar", 16, device, dtype)
        twin = transformers_twin(model)
        lengths = [max(1, plan.prompt_len - 2 * i) for i in range(plan.agreement_rows)]  # a padded batch
        prompts = [p[:n] for p, n in zip(random_prompts(plan.agreement_rows, plan.prompt_len,
                                                         model.config.vocab_size, seed=1), lengths)]
        settings = DecodeSettings(plan.agreement_tokens)
        ours = AREngine(model).generate(prompts, settings, StopRule(frozenset()), len(prompts)).tokens
        P = max(lengths)
        ids = torch.zeros(len(prompts), P, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):], mask[r, P - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            theirs = twin.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=plan.agreement_tokens, do_sample=False, temperature=None,
                                   top_p=None, top_k=None, pad_token_id=0)[:, P:].tolist()
        for r, (a, b) in enumerate(zip(ours, theirs)):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            gap = None
            if first is not None:
                with torch.no_grad():
                    seq = torch.tensor([prompts[r] + b[:first]], device=device)
                    top2 = twin(input_ids=seq).logits[0, -1].float().topk(2).values
                gap = float(top2[0] - top2[1])
            rows.append({"dtype": str(dtype).removeprefix("torch."), "row": r, "prompt_len": len(prompts[r]),
                         "tokens": len(a), "first_difference": first, "top2_gap_there": gap})
        del model, twin
        release()
    return rows


# ---- (c) diffusion --------------------------------------------------------------------------------
def diffusion(plan: Plan, device: str) -> list[dict]:
    from qrobust.models.diffusion import SamplerConfig
    from qrobust.models.engine import DiffusionEngine

    model = build(plan, "diffusion", 16, device)
    engine = DiffusionEngine(model)
    cfg = model.config
    prompts = torch.tensor(random_prompts(plan.diffusion_batch, plan.prompt_len, cfg.vocab_size, seed=2),
                           device=device)
    attn = torch.ones_like(prompts)
    samplers = {"exact": SamplerConfig(),
                "fast": SamplerConfig(block_length=plan.diffusion_block, mode="fast", threshold=0.9)}
    rows, outputs = [], {}
    for name, sampler in samplers.items():
        run = functools.partial(engine.generate, prompts, attn, plan.diffusion_tokens, cfg.mask_token_id,
                                cfg.shift_logits, sampler)
        run()  # warm-up: graphs
        sync(torch.device(device))
        t0 = time.perf_counter()
        out, passes = run()
        sync(torch.device(device))
        seconds = time.perf_counter() - t0
        outputs[name] = out
        tokens = out.numel()
        rows.append({"sampler": name, "batch": plan.diffusion_batch, "new_tokens": plan.diffusion_tokens,
                     "forward_passes": passes, "seconds": seconds, "tokens_per_s": tokens / seconds})
        print(f"  diffusion {name}: {tokens / seconds:9.1f} tok/s, {passes} forward passes", flush=True)
    agree = float((outputs["fast"] == outputs["exact"]).float().mean())
    for r in rows:
        r["token_agreement_with_exact"] = agree if r["sampler"] == "fast" else 1.0
    del model, engine
    release()
    return rows


def summary(results: dict[str, list[dict]]) -> list[str]:
    lines = ["AR (forced full length)", f"{'bits':>5} {'batch':>6} {'tok/s':>10} {'x bf16':>7}"]
    lines += [f"{r['bits']:>5} {r['batch']:>6} {r['tokens_per_s']:>10.1f} {r['ratio_to_bf16'] or 0:>7.2f}"
              for r in results.get("ar", [])]
    lines += ["AR with RMSNorm's one kernel against its torch form", f"{'bits':>5} {'batch':>6} {'kernel':>6} "
              f"{'tok/s':>10} {'x torch':>8} {'x bf16':>7}"]
    lines += [f"{r['bits']:>5} {r['batch']:>6} {str(r['norm_kernel']):>6} {r['tokens_per_s']:>10.1f} "
              f"{r['vs_torch_norms']:>8.2f} {r['ratio_to_bf16'] or 0:>7.2f}" for r in results.get("norms", [])]
    lines += ["packed layer vs bf16 Linear", f"{'layer':>10} {'bits':>4} {'rows':>4} {'kernel':>15} {'speedup':>8}"]
    lines += [f"{r['layer']:>10} {r['bits']:>4} {r['rows']:>4} {r['kernel']:>15} {r['speedup']:>8.2f}"
              for r in results.get("kernels", [])]
    lines += ["agreement with transformers generate (first differing position, top-2 gap there)"]
    lines += [f"  {r['dtype']:>8} row {r['row']}: {r['first_difference']} / {r['tokens']}, gap {r['top2_gap_there']}"
              for r in results.get("agreement", [])]
    lines += ["diffusion"] + [f"  {r['sampler']:>6}: {r['tokens_per_s']:.1f} tok/s, {r['forward_passes']} passes, "
                              f"agreement {r['token_agreement_with_exact']:.3f}" for r in results.get("diffusion", [])]
    return lines


PARTS = {"ar": (ar_throughput, "engine_ar.json"), "norms": (norm_kernels, "engine_norms.json"),
         "kernels": (kernel_table_check, "engine_kernels.json"),
         "agreement": (agreement, "engine_agreement.json"), "diffusion": (diffusion, "engine_diffusion.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--tiny", action="store_true", help="small shapes and lengths (runs on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args()
    if torch.device(args.device).type != "cuda" and not args.tiny:
        raise SystemExit("engine_gpu.py: needs a CUDA device (or --tiny)")
    plan = tiny_plan() if args.tiny else Plan()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for part in args.parts.split(","):
        fn, filename = PARTS[part]
        t0 = time.perf_counter()
        print(f"{part} ...", flush=True)
        results[part] = fn(plan, args.device)
        fields = {"part": part, "plan": vars(plan), "device": args.device, "seconds": time.perf_counter() - t0}
        if torch.cuda.is_available():
            write_rows(os.path.join(args.out, filename), results[part], **fields)
        else:
            import json

            with open(os.path.join(args.out, filename), "w") as f:
                json.dump({**fields, "torch": torch.__version__, "rows": results[part]}, f, indent=2)
    print("\n".join(summary(results)))


if __name__ == "__main__":
    main()
