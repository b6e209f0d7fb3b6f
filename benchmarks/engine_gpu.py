"""The batched generation engine (qrobust.models.engine) on one GPU, in one process, on
random-weight models of the real shapes in bfloat16. Parts (--parts, all by default):

- ar: AR throughput at batch 64 and 8 × 512 new tokens, every row forced to full length
  (min_new_tokens), for bf16 dense and packed RTN 8/4/3/2-bit layers (group 128), with each
  width's ratio to bf16 measured in the same run;
- norms: the same with RMSNorm's torch form against its one kernel;
- products: each packed product alone against bf16 nn.Linear at Qwen3-1.7B's layer shapes and
  the engine's row counts (CUDA graphs of 20 calls): the table's product, the fused matmul with
  its K-splits added up afterwards, PyTorch's int4 tinygemm at 4 bits, and with --marlin
  GPTQModel's Marlin at 4 and 8 bits;
- variants: the engine's throughput with the rewrites that could become its defaults (K-splits
  added up afterwards, fused q/k/v and gate/up, tinygemm at 4 bits, one fragments program for all
  of a call's 33-64 rows, the residual adds and SwiGLU in torch ops instead of their kernels
  ("torch element-wise"), SwiGLU in the fragments product's epilogue, the fragments products and
  the attention and norm kernels as programmatic dependent launches ("dependent launches", every
  width; "dependent launches but norms");
  --variants picks some; --tiling FILE adds the fastest tilings a
  fragments_splits.py file found), each against bf16 in the run,
  and at bf16 with every block's product replaced by one kernel that writes zeros: the ceiling on
  what any quantized product could gain over bf16 in this engine;
- agreement: greedy agreement of the engine (on CUDA with its layers as `for_generation` readies
  them: fused projections, the attention kernel) with transformers' generate on the same random
  Qwen3-1.7B model, in two calls of one engine (the second replays the graphs the first
  captured): per call and row the first position where the tokens differ and, there, the gap
  between the two largest logits of transformers' model (random weights give near-ties early; a
  difference at a tiny gap is rounding, not a bug);
- diffusion: the CoDA-shaped model (causal=False) at batch 8 × 256 tokens, the exact sampler (one
  token per step) against the fast sampler (blocks of 32, threshold 0.9);
- diffusion-widths: the fast sampler at batch 32 × 256 tokens, greedy, for bf16 and every packed
  width, with today's layers and with fused q/k/v and gate/up, each against bf16 in the run;
- sampling: the AR engine at the study's settings (batch 32, 192-token prompts, 768 forced tokens,
  temperature 0.1, top-p 0.9, the layers as `for_generation` readies them) for bf16 and every
  width, drawing each token through today's histogram of logit values (models.nucleus, in two
  kernels on CUDA) and through a sort of the whole vocabulary (the draw before it), each against
  bf16 with the same draw; the first call (which captures every graph) and the second apart; and
  each draw alone (also the histogram's torch form) on [rows, vocabulary] bf16 logits in a CUDA graph.

Rows go to $OUT (or --out) as JSON files as each part finishes (engine_<part>.json, engine_ar.json
for ar); a summary table is printed.

    python benchmarks/engine_gpu.py --out "$OUT"          # on a CUDA machine
    python benchmarks/engine_gpu.py --tiny --out /tmp/x   # small shapes, also on CPU (checks it runs)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import os
import time
from unittest import mock
from dataclasses import dataclass, replace

import torch
from torch import nn

from gpu_script import graph_time, median_seconds, write_rows
from qrobust.bench import QuantBench, random_lm, shape_config
from qrobust.bench_generate import model_bytes, quantize_blocks_rtn
from qrobust.kernels import fragments, tinygemm
from qrobust.kernels.packed_matmul import packed_matmul
from qrobust.kernels.tinygemm import TinyGemmLinear, repack_int4
from qrobust.models.decode import fuse_projections, generation_layers, sync, use_attention_kernel, use_engine_pdl
from qrobust.models.engine import AREngine, DecodeSettings, StopRule
from qrobust.models.transformer import RMSNorm, TransformerConfig, TransformerLM, residual_sum
from qrobust.quant import qlinear
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.qlinear import FORMAT_OFFSET, QuantLinear

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
    kernel_rows: tuple[int, ...] = (8, 16, 32, 64, 6144)  # 6144: a batch-32 prefill
    marlin: bool = False  # products: also GPTQModel's Marlin at 4 and 8 bits
    variants: tuple[str, ...] = ()  # variants: the rewrites to time beside "today" (default all)
    tiling: tuple[str, ...] = ()  # variants: fragments_splits.py files whose fastest tilings to time too
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
def engine_rows(model: TransformerLM, plan: Plan, bits: int, **labels) -> list[dict]:
    """Tokens per second of the engine on `model` at each of the plan's batches, forced to full length."""
    engine = AREngine(model)
    rule = StopRule(frozenset([model.config.eos_token_id]), min_new_tokens=plan.new_tokens)
    settings = DecodeSettings(plan.new_tokens, min_new_tokens=plan.new_tokens)
    rows = []
    for batch in plan.batches:
        prompts = random_prompts(batch, plan.prompt_len, model.config.vocab_size)
        engine.generate(prompts, settings, rule, batch)  # warm-up: graphs of every length bucket
        out = engine.generate(prompts, settings, rule, batch)
        seconds = sum(b.seconds for b in out.batches)
        tokens = sum(len(t) for t in out.tokens)
        rows.append({"bits": bits, "batch": batch, **labels, "new_tokens": plan.new_tokens, "tokens": tokens,
                     "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "forward_passes": sum(b.forward_passes for b in out.batches),
                     "weights_gib": model_bytes(model) / 2**30})
        print(f"  ar {bits:>2}-bit batch {batch:>3} {labels}: {tokens / seconds:9.1f} tok/s", flush=True)
    del engine
    release()
    return rows


def ar_throughput(plan: Plan, device: str, norm_kernel: bool = True) -> list[dict]:
    rows = []
    for bits in plan.bits:
        model = build(plan, "ar", bits, device)
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.kernel = norm_kernel
        rows += engine_rows(model, plan, bits, norm_kernel=norm_kernel)
        del model
        release()
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["bits"] == 16}
    for r in rows:
        r["ratio_to_bf16"] = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else None
    return rows


def norm_kernels(plan: Plan, device: str) -> list[dict]:
    """AR throughput with RMSNorm's torch form (seven kernels) and with its one kernel, in the same run."""
    short = replace(plan, bits=(16, 4), new_tokens=min(plan.new_tokens, 256),
                    batches=(64, 32) if not plan.tiny else (3,))
    rows = ar_throughput(short, device, norm_kernel=False) + ar_throughput(short, device, norm_kernel=True)
    torch_form = {(r["bits"], r["batch"]): r["tokens_per_s"] for r in rows if not r["norm_kernel"]}
    for r in rows:
        r["vs_torch_norms"] = r["tokens_per_s"] / torch_form[r["bits"], r["batch"]]
    return rows


def layer_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of Qwen3's linear layers, and of the fused q/k/v and gate/up layers."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "gate_proj": (h, i), "down_proj": (i, h),
            "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i)}


def packed_like(dense: nn.Linear, bits: int, group_size: int) -> QuantLinear:
    """dense's weight rounded to `bits` (RTN, symmetric groups) as a packed layer on its device."""
    spec = QuantSpec(bits, group_size, sym=True)
    return QuantLinear.from_result(rtn(dense.weight.float(), spec), None, dense.weight.dtype).to(dense.weight.device)


@contextlib.contextmanager
def gptq_layout():
    """Packed layers that decide their layout inside keep GPTQ's (4-bit layers on Hopper are
    otherwise repacked for kernels.fragments_matmul): the kernels they had before, for an A/B."""
    saved = fragments.runs_fragments
    fragments.runs_fragments = lambda device: False
    try:
        yield
    finally:
        fragments.runs_fragments = saved


@contextlib.contextmanager
def fragments_product(wrap):
    """kernels.fragments_matmul replaced by wrap(fragments_matmul) wherever the engine calls it,
    for an A/B; given back on leaving."""
    from qrobust.kernels import fragments_matmul as module  # Gluon: imported where it runs

    saved = module.fragments_matmul
    module.fragments_matmul = wrap(saved)
    try:
        yield
    finally:
        module.fragments_matmul = saved


def whole_row_programs():
    """fragments_matmul with one program for all the rows of a call of 33-64 rows, where
    fragments_tiling gives the smaller layers two programs of 32 (at its split for those)."""
    def wrap(saved):
        def one_program(x, *args, rows_per_program=None, **kwargs):
            return saved(x, *args, rows_per_program=rows_per_program or (64 if x.shape[0] > 32 else None), **kwargs)
        return one_program
    return fragments_product(wrap)


@contextlib.contextmanager
def swiglu_epilogue(model: nn.Module):
    """The fused gate/up layers' fragments product applying SwiGLU as it stores the outputs
    (QuantLinear.swiglu_epilogue) instead of a kernel after it; switched back on leaving."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        for m in layers:
            m.swiglu_epilogue = True
        yield
    finally:
        for m in layers:
            m.swiglu_epilogue = False


def fastest_tilings(paths: list[str]) -> dict:
    """(bits, rows, N, K) -> (split, rows per program, warpgroups) of the fastest fragments product
    in fragments_splits.py files (one per width, say; rows without warpgroups had one)."""
    import json

    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)["rows"]
    best: dict = {}
    for r in rows:
        key = (r["bits"], r["rows"], r["N"], r["K"])
        if key not in best or r["us_fragments"] < best[key]["us_fragments"]:
            best[key] = r
    return {key: (r["split_k"], r["rows_per_program"], r.get("warpgroups", 1)) for key, r in best.items()}


def measured_tiling(tilings: dict):
    """fragments_matmul at the split, program rows and warpgroups of `tilings` (fastest_tilings)
    for its width, rows and shape (the chosen tiling elsewhere)."""
    def wrap(saved):
        def tiled(x, qweight, scales, qzeros, bits, *args, **kwargs):
            split, per_program, wg = tilings.get((bits, x.shape[0], qweight.shape[1], x.shape[1]), (None,) * 3)
            return saved(x, qweight, scales, qzeros, bits, *args, split_k=split, rows_per_program=per_program,
                         warpgroups=wg, **kwargs)
        return tiled
    return fragments_product(wrap)


def timer(device: str):
    """Seconds per call: replayed in a CUDA graph of 20 calls on a GPU (launches do not count;
    weights may partly stay in L2), timed alone elsewhere (where this only checks that it runs)."""
    if torch.device(device).type == "cuda":
        return graph_time
    return functools.partial(median_seconds, device=device, repeats=3)


def gptqmodel_marlin(layer: QuantLinear, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """GPTQModel's Marlin layer on `layer`'s symmetric checkpoint, repacked by GPTQModel (which
    must be installed; it builds Marlin on first use), computing in `dtype`."""
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    m = MarlinLinear(bits=layer.spec.bits, group_size=layer.spec.group_size, desc_act=False, sym=True,
                     in_features=layer.in_features, out_features=layer.out_features, bias=False, dtype=dtype)
    m.qweight.data, m.qzeros.data = layer.gptq_qweight().clone(), layer.qzeros.clone()
    m.scales.data, m.g_idx.data = layer.scales.to(dtype).clone(), layer.g_idx.int().clone()
    m = m.to(layer.qweight.device)
    m.post_init()
    return m


def products(plan: Plan, device: str) -> list[dict]:
    """Each packed product alone against the bf16 nn.Linear of its shape at the engine's row
    counts: the table's product (QuantLinear.forward), where that is the fused matmul also the
    same kernel with its K-splits added up afterwards (a sum and a cast, as before the arrival
    counters), at 4 bits PyTorch's int4 tinygemm (kernels.tinygemm), and with plan.marlin GPTQModel's
    Marlin at 4 and 8 bits (with its largest difference from ours, relative to our largest output)."""
    time_of = timer(device)
    dtype = dtype_for(device)
    rows = []
    for name, (K, N) in layer_shapes(config(plan, "ar")).items():
        dense = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        xs = {m: torch.randn(m, K, device=device, dtype=dtype) for m in plan.kernel_rows}
        with torch.no_grad():
            us_bf16 = {m: 1e6 * time_of(functools.partial(dense, x)) for m, x in xs.items()}
            for bits in [b for b in plan.bits if b != 16]:
                layer = packed_like(dense, bits, plan.group_size)
                packed = layer.uses_kernels(torch.device(device))
                gptq_layer = None
                if layer.layout == "fragments":
                    gptq_layer = packed_like(dense, bits, plan.group_size)
                    with gptq_layout():
                        gptq_layer.uses_kernels(torch.device(device))
                marlin = None
                if plan.marlin and bits in (4, 8) and torch.device(device).type == "cuda":
                    try:
                        marlin = gptqmodel_marlin(layer)
                    except Exception as e:  # noqa: BLE001 - an optional peer: any failure is reported, not fatal
                        print(f"  GPTQModel Marlin {bits}-bit: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                candidates, differences = {}, {}
                for m, x in xs.items():
                    kernel = layer.packed_kernel(m, x.device) if packed else "torch"
                    candidates[m] = {kernel: functools.partial(layer, x)}
                    if kernel == "fused_matmul":
                        a = layer._kernel_args
                        candidates[m]["fused_matmul, sums afterwards"] = functools.partial(
                            packed_matmul, x, layer.qweight, layer.scales, layer.qzeros, a.g_idx, bits,
                            a.group_size, FORMAT_OFFSET[layer.format])
                    if gptq_layer is not None:
                        name_before = f"GPTQ layout, {gptq_layer.packed_kernel(m, x.device)}"
                        candidates[m][name_before] = functools.partial(gptq_layer, x)
                    if bits == 4 and tinygemm.applies(layer):
                        candidates[m]["tinygemm"] = functools.partial(TinyGemmLinear.from_quant_linear(layer), x)
                    if marlin is not None:
                        ours = layer(x).float()
                        differences[m, "GPTQModel Marlin"] = ((marlin(x).float() - ours).abs().max()
                                                              / ours.abs().max()).item()
                        candidates[m]["GPTQModel Marlin"] = functools.partial(marlin, x)
                for m, kernels in candidates.items():
                    for kernel, fn in kernels.items():
                        us = 1e6 * time_of(fn)
                        extra = {"max_rel_difference": differences[m, kernel]} if (m, kernel) in differences else {}
                        rows.append({"layer": name, "K": K, "N": N, "bits": bits, "rows": m, "kernel": kernel,
                                     "us_bf16": us_bf16[m], "us_packed": us, "speedup": us_bf16[m] / us, **extra})
                        print(f"  {name:>12} {bits}-bit {m:>5} rows {kernel:>30}: {us:8.2f} us "
                              f"({us_bf16[m] / us:.2f}x bf16)", flush=True)
                del layer, gptq_layer, candidates, marlin
        del dense, xs
        release()
    return rows


def sums_afterwards(model: nn.Module, device: str) -> None:
    """The fused matmul as before its arrival counters: K-splits added up by a sum and a cast."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.uses_kernels(torch.device(device)):
            m._kernel_args = dataclasses.replace(m._kernel_args, matmul_locks=None)


class ZeroProduct(nn.Module):
    """Stands in for a block's linear layer with the least a product must do: one kernel that
    writes its output (zeros). The engine's speed with these bounds any quantized product's gain."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def zero_products(model: TransformerLM) -> int:
    """Replace every linear layer inside the blocks (what quantization replaces; lm_head stays)."""
    swapped = 0
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, (nn.Linear, QuantLinear)):
                    setattr(parent, name, ZeroProduct(child.out_features))
                    swapped += 1
    return swapped


@contextlib.contextmanager
def torch_elementwise():
    """The residual adds and SwiGLU as before their kernels (kernels.rms_norm.add_rms_norm,
    kernels.swiglu): torch's add, then the norm; silu and the product apart."""
    def add_then_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
        h = residual_sum(x, residual)
        return norm(h), h

    with mock.patch.object(RMSNorm, "forward_add", add_then_norm), \
            mock.patch.object(qlinear, "interleaved_swiglu", qlinear.interleaved_swiglu_torch):
        yield


def variants(plan: Plan, device: str) -> list[dict]:
    """The engine's throughput per width with today's layers, and with the rewrites that could
    become its defaults: the fused matmul's K-splits added up afterwards (as before its arrival
    counters), one fragments program for 64 rows instead of two of 32 (whole_row_programs),
    q/k/v and gate/up fused into one product each (models.decode.fuse_projections),
    and at 4 bits those on tinygemm (kernels.tinygemm.repack_int4); each against bf16 with the
    same rewrite, in the same run; and bf16 with zero_products, the ceiling. The fragments
    product's rewrites (64-row programs, --tiling) run on the most rewritten layers asked for:
    fused, with the attention kernel where that is asked for too, as does "SwiGLU epilogue"
    (QuantLinear.swiglu_epilogue on); "dependent launches" (models.decode.use_engine_pdl) and
    "dependent launches but norms" run on those layers at every width."""
    if 16 not in plan.bits:
        raise SystemExit("engine_gpu.py: variants compares with bf16: include 16 in --bits")
    short = replace(plan, new_tokens=min(plan.new_tokens, 256), batches=(64, 32) if not plan.tiny else (3,))

    def wanted(variant: str) -> bool:
        return not plan.variants or variant in plan.variants

    # the fragments product's own rewrites, timed on the most rewritten layers asked for (rewritten_rows)
    kernel_rewrites = [("64-row programs", whole_row_programs)] if wanted("64-row programs") else []
    if plan.tiling:
        tilings = fastest_tilings(plan.tiling)
        kernel_rewrites.append(("measured tiling", lambda: measured_tiling(tilings)))

    def rewritten_rows(model: TransformerLM, bits: int, prefix: str = "") -> list[dict]:
        out = []
        for name, rewrite in kernel_rewrites:
            with rewrite():
                out += engine_rows(model, short, bits, variant=prefix + name)
        if wanted("SwiGLU epilogue"):
            with swiglu_epilogue(model):
                out += engine_rows(model, short, bits, variant=prefix + "SwiGLU epilogue")
        return out

    rows = []
    for bits in short.bits:
        model = build(short, "ar", bits, device)
        rows += engine_rows(model, short, bits, variant="today")
        if any(m.layout == "fragments" for m in model.modules() if isinstance(m, QuantLinear)):
            if not wanted("fused projections"):  # else they are timed on the fused layers (below)
                rows += rewritten_rows(model, bits)
            if wanted("GPTQ layout"):
                with gptq_layout():
                    before = build(short, "ar", bits, device)
                    rows += engine_rows(before, short, bits, variant="GPTQ layout")
                del before
                release()
        if bits == 16 and wanted("products write zeros"):
            ceiling = build(short, "ar", bits, device)
            zero_products(ceiling)
            rows += engine_rows(ceiling, short, bits, variant="products write zeros")
            del ceiling
            release()
        elif bits != 16 and wanted("sums afterwards"):
            sums_afterwards(model, device)
            rows += engine_rows(model, short, bits, variant="sums afterwards")
        if wanted("fused projections"):
            fuse_projections(model)  # new layers, so their matmuls add up their K-splits inside again
            rows += engine_rows(model, short, bits, variant="fused projections")
            if wanted("attention kernel"):
                use_attention_kernel(model)
                rows += engine_rows(model, short, bits, variant="fused projections, attention kernel")
                for variant, norms in (("dependent launches", True), ("dependent launches but norms", False)):
                    if wanted(variant):  # bf16's attention and norm kernels too, the same rewrite
                        use_engine_pdl(model, norms=norms)
                        rows += engine_rows(model, short, bits, variant="fused projections, attention kernel, "
                                                                        + variant)
                        use_engine_pdl(model, on=False)
                if bits != 16:
                    rows += rewritten_rows(model, bits, prefix="fused projections, attention kernel, ")
                if wanted("torch element-wise"):
                    with torch_elementwise():
                        rows += engine_rows(model, short, bits,
                                            variant="fused projections, attention kernel, torch element-wise")
                use_attention_kernel(model, on=False)
            elif bits != 16:
                rows += rewritten_rows(model, bits, prefix="fused projections, ")
            if bits == 4 and torch.device(device).type == "cuda":
                repack_int4(model)
                rows += engine_rows(model, short, bits, variant="fused projections, tinygemm")
        del model
        release()
    base = {(r["batch"], r["variant"]): r["tokens_per_s"] for r in rows if r["bits"] == 16}
    for r in rows:
        rewrite = r["variant"]
        for addition in ["tinygemm", "SwiGLU epilogue"] + [name for name, _ in kernel_rewrites]:
            rewrite = rewrite.replace(", " + addition, "")
        same = base.get((r["batch"], rewrite), base[r["batch"], "today"])
        r["ratio_to_bf16_same_rewrite"] = r["tokens_per_s"] / same
        r["ratio_to_bf16_today"] = r["tokens_per_s"] / base[r["batch"], "today"]
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


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (over their common length), or None."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def agreement(plan: Plan, device: str) -> list[dict]:
    rows = []
    dtypes = [dtype_for(device)] + ([torch.float32] if torch.device(device).type == "cuda" else [])
    for dtype in dtypes:
        model = build(plan, "ar", 16, device, dtype)
        twin = transformers_twin(model)
        if torch.device(device).type == "cuda":
            generation_layers(model)
        lengths = [max(1, plan.prompt_len - 2 * i) for i in range(plan.agreement_rows)]  # a padded batch
        prompts = [p[:n] for p, n in zip(random_prompts(plan.agreement_rows, plan.prompt_len,
                                                         model.config.vocab_size, seed=1), lengths)]
        settings, engine = DecodeSettings(plan.agreement_tokens), AREngine(model)
        # the second call decodes from the graphs the first captured, after a prefill that allocated
        calls = [engine.generate(prompts, settings, StopRule(frozenset()), len(prompts)).tokens for _ in range(2)]
        P = max(lengths)
        ids = torch.zeros(len(prompts), P, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):], mask[r, P - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            theirs = twin.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=plan.agreement_tokens, do_sample=False, temperature=None,
                                   top_p=None, top_k=None, pad_token_id=0)[:, P:].tolist()
        for call, ours in enumerate(calls, 1):
            for r, (a, b) in enumerate(zip(ours, theirs)):
                first = first_difference(a, b)
                gap = None
                if first is not None:
                    with torch.no_grad():
                        seq = torch.tensor([prompts[r] + b[:first]], device=device)
                        top2 = twin(input_ids=seq).logits[0, -1].float().topk(2).values
                    gap = float(top2[0] - top2[1])
                rows.append({"dtype": str(dtype).removeprefix("torch."), "call": call, "row": r,
                             "prompt_len": len(prompts[r]), "tokens": len(a), "first_difference": first,
                             "top2_gap_there": gap})
        del model, twin
        release()
    return rows


# ---- (c) diffusion --------------------------------------------------------------------------------
def timed_sampling(engine, prompts: torch.Tensor, tokens: int, sampler, device: str) -> tuple[torch.Tensor, int, float]:
    """(response ids, forward passes, seconds) of the engine's second run of `sampler` (the first
    captures its graphs)."""
    cfg = engine.model.config
    run = functools.partial(engine.generate, prompts, torch.ones_like(prompts), tokens, cfg.mask_token_id,
                            cfg.shift_logits, sampler)
    run()
    sync(torch.device(device))
    t0 = time.perf_counter()
    out, passes = run()
    sync(torch.device(device))
    return out, passes, time.perf_counter() - t0


def diffusion(plan: Plan, device: str) -> list[dict]:
    from qrobust.models.diffusion import SamplerConfig
    from qrobust.models.engine import DiffusionEngine

    model = build(plan, "diffusion", 16, device)
    engine = DiffusionEngine(model)
    prompts = torch.tensor(random_prompts(plan.diffusion_batch, plan.prompt_len, model.config.vocab_size, seed=2),
                           device=device)
    samplers = {"exact": SamplerConfig(),
                "fast": SamplerConfig(block_length=plan.diffusion_block, mode="fast", threshold=0.9)}
    rows, outputs = [], {}
    for name, sampler in samplers.items():
        out, passes, seconds = timed_sampling(engine, prompts, plan.diffusion_tokens, sampler, device)
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


def diffusion_widths(plan: Plan, device: str) -> list[dict]:
    """The fast sampler on the CoDA-shaped model at the study's batch (32, blocks of 32: products of
    about 1,056 rows, which dequantize for cuBLAS) at every width, greedy (so token choice, the same
    at every width, does not dilute the products' share), with today's layers and with fused
    projections; each against bf16 with the same layers, in the same run."""
    from qrobust.models.diffusion import SamplerConfig
    from qrobust.models.engine import DiffusionEngine

    if 16 not in plan.bits:
        raise SystemExit("engine_gpu.py: diffusion-widths compares with bf16: include 16 in --bits")
    batch, tokens = (2, plan.diffusion_tokens) if plan.tiny else (32, 256)
    sampler = SamplerConfig(block_length=plan.diffusion_block, mode="fast", threshold=0.9)
    rows = []
    for bits in plan.bits:
        model = build(plan, "diffusion", bits, device)
        prompts = torch.tensor(random_prompts(batch, plan.prompt_len, model.config.vocab_size, seed=2), device=device)
        today = None
        for variant in ("today", "fused projections"):
            if variant == "fused projections":
                fuse_projections(model)
            out, passes, seconds = timed_sampling(DiffusionEngine(model), prompts, tokens, sampler, device)
            today = out if today is None else today
            rows.append({"bits": bits, "batch": batch, "variant": variant, "new_tokens": tokens,
                         "forward_passes": passes, "seconds": seconds, "tokens_per_s": out.numel() / seconds,
                         "token_agreement_with_today": float((out == today).float().mean()),
                         "weights_gib": model_bytes(model) / 2**30})
            print(f"  diffusion {bits:>2}-bit batch {batch} {variant}: {rows[-1]['tokens_per_s']:9.1f} tok/s, "
                  f"{passes} passes", flush=True)
            release()
        del model
        release()
    base = {r["variant"]: r["tokens_per_s"] for r in rows if r["bits"] == 16}
    for r in rows:
        r["ratio_to_bf16_same_rewrite"] = r["tokens_per_s"] / base[r["variant"]]
        r["ratio_to_bf16_today"] = r["tokens_per_s"] / base["today"]
    return rows


# ---- (d) sampling at the study's settings -----------------------------------------------------------
def full_sort_draw(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """The engine's draw as it was before models.nucleus: every row's whole distribution sorted
    (unstably, as it was; models.nucleus.sorted_draw sorts stably), then nucleus_draw."""
    from qrobust.models.diffusion import nucleus_draw

    sorted_p, order = torch.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)
    return nucleus_draw(sorted_p, order, top_p, uniform)[0]


@contextlib.contextmanager
def sorting_draw():
    """The engine drawing through full_sort_draw, which needs no host sync either."""
    import qrobust.models.engine as engine_module

    with mock.patch.object(engine_module, "nucleus_sample", full_sort_draw):
        yield


DRAWS = {"histogram": contextlib.nullcontext, "sort": sorting_draw}


def sampling(plan: Plan, device: str) -> list[dict]:
    """The AR engine as `qrobust sweep` runs it (see the module docstring), and each draw alone."""
    from qrobust.models.nucleus import histogram_draw, histogram_draw_torch

    batch, prompt_len, tokens = (3, plan.prompt_len, plan.new_tokens) if plan.tiny else (32, 192, 768)
    settings = DecodeSettings(tokens, temperature=0.1, top_p=0.9, min_new_tokens=tokens)
    rows = []
    for bits in plan.bits:
        model = build(plan, "ar", bits, device)
        generation_layers(model)
        rule = StopRule(frozenset([model.config.eos_token_id]), min_new_tokens=tokens)
        prompts = random_prompts(batch, prompt_len, model.config.vocab_size, seed=3)
        for draw, context in DRAWS.items():
            with context():
                engine = AREngine(model)
                first = engine.generate(prompts, settings, rule, batch)  # compiles and captures every graph
                out = engine.generate(prompts, settings, rule, batch)
            seconds = sum(b.seconds for b in out.batches)
            n = sum(len(t) for t in out.tokens)
            rows.append({"bits": bits, "batch": batch, "draw": draw, "prompt_len": prompt_len, "new_tokens": tokens,
                         "first_call_seconds": sum(b.seconds for b in first.batches), "seconds": seconds,
                         "tokens_per_s": n / seconds, "same_tokens_as_first_call": out.tokens == first.tokens})
            print(f"  sampled ar {bits:>2}-bit batch {batch} {draw:>9}: {n / seconds:9.1f} tok/s "
                  f"(first call {rows[-1]['first_call_seconds']:.2f} s, second {seconds:.2f} s)", flush=True)
            del engine
            release()
        del model
        release()
    base = {r["draw"]: r["tokens_per_s"] for r in rows if r["bits"] == 16}
    for r in rows:
        r["ratio_to_bf16_same_draw"] = r["tokens_per_s"] / base[r["draw"]] if base else None
    if torch.device(device).type == "cuda":
        vocab = config(plan, "ar").vocab_size
        for n in (32, 64):
            logits = torch.randn(n, vocab, device=device).mul(2).bfloat16()
            u = torch.rand(n, device=device)
            timed = {"sort": graph_time(functools.partial(full_sort_draw, logits, 0.1, 0.9, u)), "histogram": graph_time(functools.partial(histogram_draw, logits, 0.1, 0.9, u)),
                     "histogram_torch": graph_time(functools.partial(histogram_draw_torch, logits, 0.1, 0.9, u)),
                     "greedy": graph_time(functools.partial(torch.argmax, logits, -1))}
            rows.append({"part": "draw alone", "rows": n, "vocab": vocab,
                         **{f"{k}_us": 1e6 * v for k, v in timed.items()}})
            print(f"  draw alone, {n} rows: " + ", ".join(f"{k} {1e6 * v:.1f} us" for k, v in timed.items()),
                  flush=True)
    return rows


def summary(results: dict[str, list[dict]]) -> list[str]:
    lines = ["AR (forced full length)", f"{'bits':>5} {'batch':>6} {'tok/s':>10} {'x bf16':>7}"]
    lines += [f"{r['bits']:>5} {r['batch']:>6} {r['tokens_per_s']:>10.1f} {r['ratio_to_bf16'] or 0:>7.2f}"
              for r in results.get("ar", [])]
    lines += ["AR with RMSNorm's one kernel against its torch form", f"{'bits':>5} {'batch':>6} {'kernel':>6} "
              f"{'tok/s':>10} {'x torch':>8} {'x bf16':>7}"]
    lines += [f"{r['bits']:>5} {r['batch']:>6} {str(r['norm_kernel']):>6} {r['tokens_per_s']:>10.1f} "
              f"{r['vs_torch_norms']:>8.2f} {r['ratio_to_bf16'] or 0:>7.2f}" for r in results.get("norms", [])]
    lines += ["packed product vs bf16 Linear", f"{'layer':>12} {'bits':>4} {'rows':>5} {'kernel':>30} {'speedup':>8}"]
    lines += [f"{r['layer']:>12} {r['bits']:>4} {r['rows']:>5} {r['kernel']:>30} {r['speedup']:>8.2f}"
              for r in results.get("products", [])]
    lines += ["engine variants", f"{'bits':>5} {'batch':>6} {'variant':>30} {'tok/s':>10} {'x bf16 same':>11} "
              f"{'x bf16':>7}"]
    lines += [f"{r['bits']:>5} {r['batch']:>6} {r['variant']:>30} {r['tokens_per_s']:>10.1f} "
              f"{r['ratio_to_bf16_same_rewrite']:>11.2f} {r['ratio_to_bf16_today']:>7.2f}"
              for r in results.get("variants", [])]
    lines += ["agreement with transformers generate (first differing position, top-2 gap there)"]
    lines += [f"  {r['dtype']:>8} call {r.get('call', 1)} row {r['row']}: {r['first_difference']} / {r['tokens']}, "
              f"gap {r['top2_gap_there']}" for r in results.get("agreement", [])]
    lines += ["diffusion"] + [f"  {r['sampler']:>6}: {r['tokens_per_s']:.1f} tok/s, {r['forward_passes']} passes, "
                              f"agreement {r['token_agreement_with_exact']:.3f}" for r in results.get("diffusion", [])]
    lines += ["AR at the study's settings (sampled, fused, attention kernel)", f"{'bits':>5} {'draw':>10} "
              f"{'tok/s':>10} {'x bf16':>7} {'first s':>8}"]
    lines += [f"{r['bits']:>5} {r['draw']:>10} {r['tokens_per_s']:>10.1f} {r['ratio_to_bf16_same_draw'] or 0:>7.2f} "
              f"{r['first_call_seconds']:>8.2f}" for r in results.get("sampling", []) if "draw" in r]
    lines += [f"  draw alone, {r['rows']} rows: sort {r['sort_us']:.1f} us, histogram {r['histogram_us']:.1f} us "
              f"(torch ops {r['histogram_torch_us']:.1f} us), greedy {r['greedy_us']:.1f} us"
              for r in results.get("sampling", []) if "draw" not in r]
    lines += ["diffusion at every width (fast sampler, greedy)", f"{'bits':>5} {'batch':>6} {'variant':>20} "
              f"{'tok/s':>10} {'x bf16 same':>11} {'x bf16':>7}"]
    lines += [f"{r['bits']:>5} {r['batch']:>6} {r['variant']:>20} {r['tokens_per_s']:>10.1f} "
              f"{r['ratio_to_bf16_same_rewrite']:>11.2f} {r['ratio_to_bf16_today']:>7.2f}"
              for r in results.get("diffusion-widths", [])]
    return lines


PARTS = {"ar": (ar_throughput, "engine_ar.json"), "norms": (norm_kernels, "engine_norms.json"),
         "products": (products, "engine_products.json"), "variants": (variants, "engine_variants.json"),
         "agreement": (agreement, "engine_agreement.json"), "diffusion": (diffusion, "engine_diffusion.json"),
         "diffusion-widths": (diffusion_widths, "engine_diffusion_widths.json"),
         "sampling": (sampling, "engine_sampling.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--tiny", action="store_true", help="small shapes and lengths (runs on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--bits", help="widths to run (16 is bf16), comma-separated; default 16,8,4,3,2")
    parser.add_argument("--rows", help="products: row counts, comma-separated; default 8,16,32,64,6144 "
                                       "(1024: the diffusion fast sampler's block of 32 at batch 32)")
    parser.add_argument("--variants", help="variants: the rewrites to time beside today's engine, comma-separated "
                                           "(default all: GPTQ layout, products write zeros, sums afterwards, "
                                           "fused projections, attention kernel (with fused projections), "
                                           "64-row programs, SwiGLU epilogue, dependent launches (but norms; with "
                                           "the attention kernel); the last three also fused)")
    parser.add_argument("--tiling", help="variants: also the fastest tiling per width, rows and shape in these "
                                         "fragments_splits.py files, comma-separated (unfused and with fused "
                                         "projections)")
    parser.add_argument("--marlin", action="store_true",
                        help="products: also GPTQModel's Marlin at 4 and 8 bits (GPTQModel installed; it builds "
                             "Marlin on first use, 86 s on the H200)")
    args = parser.parse_args()
    if torch.device(args.device).type != "cuda" and not args.tiny:
        raise SystemExit("engine_gpu.py: needs a CUDA device (or --tiny)")
    plan = tiny_plan() if args.tiny else Plan()
    if args.bits:
        plan = replace(plan, bits=tuple(int(b) for b in args.bits.split(",")))
    if args.rows:
        plan = replace(plan, kernel_rows=tuple(int(m) for m in args.rows.split(",")))
    plan = replace(plan, marlin=args.marlin, variants=tuple(args.variants.split(",")) if args.variants else (),
                   tiling=tuple(args.tiling.split(",")) if args.tiling else ())
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
