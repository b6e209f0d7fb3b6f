"""`qrobust bench generate`: batch-1 generation speed and memory, fp16 against packed bit widths.

Each bit width gets a fresh random-weight model at a real shape, quantized round-to-nearest
(speed does not depend on how the codes were chosen) into packed QuantLinear layers, which on
CUDA run qrobust's Triton kernels (at 4 bits PyTorch's int4 tinygemm kernel, unless
tinygemm=False or pdl, but for the fused SwiGLU layer); AR decoding's attention runs qrobust's
decode kernel where kernels run, with pdl as programmatic dependent launches and fuse_norms
with the residual adds and norms inside the fused layers' GEMVs. Decoding replays
CUDA graphs (qrobust.models.decode), so the numbers measure the kernels and the memory traffic
rather than Python's launch overhead. The fraction of the bandwidth floor divides tokens/s by
what streaming every weight byte once per token at the copy bandwidth measured in the same run
would allow. On CUDA each width runs in a process of its own (GenerateBench.isolate).
"""
from __future__ import annotations

import gc
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qrobust.bench import (QuantBench, allocated_gib, check_device, model_dtype, peak_gib, random_lm, reset_peak,
                           shape_config)
from qrobust.errors import QrobustError
from qrobust.kernels import kernels_enabled
from qrobust.kernels.tinygemm import TinyGemmLinear, repack_int4
from qrobust.models.decode import (GraphedForward, GreedyDecoder, fuse_norms, fuse_projections, sync,
                                   use_attention_kernel, use_half2, use_pdl)
from qrobust.models.diffusion import SamplerConfig, diffusion_generate
from qrobust.models.transformer import TransformerConfig, TransformerLM
from qrobust.quant.grid import QuantSpec, rtn
from qrobust.quant.qlinear import QuantLinear, replace_linear
from qrobust.sweep import environment

FULL_PRECISION = 16


@dataclass
class GenerateBench:
    shape: str = "qwen3-1.7b"
    kind: str = "ar"
    bits: tuple[int, ...] = (16, 8, 4, 3, 2)
    group_size: int = 128
    prompt_len: int = 32
    new_tokens: int = 128
    repeats: int = 5
    layers: int | None = None
    vocab_size: int | None = None
    device: str = "cuda"
    seed: int = 0
    compile: bool = False  # torch.compile each step before capturing it
    fuse: bool = False  # q/k/v as one layer, gate/up as one SwiGLU layer (models.decode.fuse_projections)
    # AR decoding: 4-bit layers on PyTorch's int4 kernel where it applies (kernels.tinygemm); None: unless pdl,
    # since tinygemm cannot start before the kernel ahead of it finishes, and our GEMV then was as fast or
    # faster (README: GPU performance)
    tinygemm: bool | None = None
    # the fused SwiGLU layer (fuse) on tinygemm plus a separate activation, rather than on our GEMV,
    # which applies the activation as it stores
    tinygemm_swiglu: bool = False
    attention_kernel: bool = True  # AR decoding: one kernel per layer's attention where kernels run (decode_attention)
    # the output layer quantized too (untied from the embedding, which stays fp16) at this width,
    # for the packed widths; None keeps it fp16, as qrobust's checkpoints do
    lm_head_bits: int | None = None
    # AR decoding on Hopper or later: kernels launch as programmatic dependent launches (models.decode.use_pdl,
    # and Inductor's with compile), each reading its weights while the one before it finishes
    pdl: bool = False
    # AR decoding with fuse: the packed q/k/v and SwiGLU GEMVs add the residual and normalize in their prologue
    # (models.decode.fuse_norms)
    fuse_norms: bool = False
    # the packed GEMVs sum codes two at a time in float16 (models.decode.use_half2)
    half2: bool = False
    # each width measured in a fresh process, so that nothing an earlier width leaves behind (memory still
    # allocated, compiled code, allocator state) touches it; None: on CUDA, where a 4-bit run after fp16 in the
    # same process decoded about 2% slower than alone on an H100 (README: GPU performance)
    isolate: bool | None = None

    @property
    def uses_tinygemm(self) -> bool:
        return not self.pdl if self.tinygemm is None else self.tinygemm

    @property
    def isolates(self) -> bool:
        return torch.device(self.device).type == "cuda" if self.isolate is None else self.isolate

    def __post_init__(self) -> None:
        bad = [b for b in self.bits if b != FULL_PRECISION and b not in (2, 3, 4, 8)]
        if bad or not self.bits:
            raise QrobustError(f"bad bit widths {bad or list(self.bits)}: use 16 (fp16) and any of 2,3,4,8")
        if self.lm_head_bits is not None and self.lm_head_bits not in (2, 3, 4, 8):
            raise QrobustError(f"bad lm_head width {self.lm_head_bits}: use one of 2,3,4,8")
        if self.fuse_norms and not self.fuse:
            raise QrobustError("--fuse-norms puts the norms into the fused q/k/v and gate/up layers: add --fuse")
        if self.repeats < 1 or self.new_tokens < 2 or self.prompt_len < 1:
            raise QrobustError("repeats, prompt length and new tokens must be positive (new tokens at least 2)")


def quantize_blocks_rtn(model: nn.Module, spec: QuantSpec) -> int:
    """Replace every nn.Linear inside the transformer blocks by a packed round-to-nearest QuantLinear."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    for name in names:
        replace_linear(model, name, rtn(model.get_submodule(name).weight, spec, name))
    return len(names)


# A decoder small enough to compile and replay in seconds, for the GPU's reproducibility checks
# (tests/test_engine.py, benchmarks/engine_determinism.py)
SMALL_DECODER = TransformerConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def small_decoder(bits: int, device: str | torch.device = "cuda") -> TransformerLM:
    """The random SMALL_DECODER model in bf16, its blocks' layers packed RTN at `bits` (16: dense)."""
    model = random_lm(SMALL_DECODER, device, seed=0, dtype=torch.bfloat16).eval()
    if bits != 16:
        quantize_blocks_rtn(model, QuantSpec(bits, 128, sym=True))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each storage once (tied embeddings count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def copy_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 10) -> float | None:
    """Bytes/s of a device-to-device copy (read + write), the practical ceiling for streaming weights."""
    if device.type != "cuda":
        return None
    n = int(gib * 2**30) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    del src, dst
    return 2 * n * 4 * repeats / seconds


def build_model(bench: GenerateBench, bits: int) -> nn.Module:
    """The random-weight model one width of the bench runs: packed, fused and repacked as asked."""
    cfg = shape_config(QuantBench(shape=bench.shape, kind=bench.kind, layers=bench.layers, vocab_size=bench.vocab_size))
    model = random_lm(cfg, bench.device, bench.seed, model_dtype(bench.device)).eval()
    if bits != FULL_PRECISION:
        quantize_blocks_rtn(model, QuantSpec(bits, bench.group_size, sym=True))
        if bench.lm_head_bits:
            head = QuantSpec(bench.lm_head_bits, bench.group_size, sym=True)
            replace_linear(model, "lm_head", rtn(model.lm_head.weight, head, "lm_head"))
    if bench.fuse:
        fuse_projections(model)
    if bench.uses_tinygemm and bench.kind == "ar":  # a GEMV kernel: diffusion steps multiply whole sequences
        repack_int4(model, None if bench.tinygemm_swiglu else lambda name: name.endswith(".swiglu.linear"))
    if bench.attention_kernel and bench.kind == "ar" and kernels_enabled(bench.device):
        use_attention_kernel(model)
    if bench.pdl and bench.kind == "ar":
        use_pdl(model)
    if bench.fuse_norms and bench.kind == "ar":
        fuse_norms(model)
    if bench.half2:
        use_half2(model)
    return model


def random_prompt(bench: GenerateBench, vocab: int) -> torch.Tensor:
    """The bench's prompt: random ids below the special tokens, the same for every width."""
    g = torch.Generator().manual_seed(bench.seed)
    return torch.randint(0, vocab - 3, (bench.prompt_len,), generator=g)


def _seconds(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure_ar(model: nn.Module, bench: GenerateBench) -> dict:
    device = model.device
    prompt = random_prompt(bench, model.config.vocab_size)
    reset_peak(device)
    decoder = GreedyDecoder(model, bench.prompt_len + bench.new_tokens, graphs=device.type == "cuda",
                            compile=bench.compile, pdl=bench.pdl)
    decoder.generate(prompt, bench.new_tokens)  # warm-up: kernel compilation, allocator
    runs = [decoder.generate(prompt, bench.new_tokens) for _ in range(bench.repeats)]
    tps = [r.tokens_per_s for r in runs]
    return {"tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps,
            "ms_per_token": 1000 / statistics.median(tps),
            "ttft_ms": statistics.median(1000 * r.ttft_s for r in runs), "peak_gib": peak_gib(device),
            "tokens": runs[-1].tokens.tolist()}


def measure_diffusion(model: nn.Module, bench: GenerateBench) -> dict:
    device = model.device
    cfg = model.config
    prompt = random_prompt(bench, cfg.vocab_size)[None].to(device)
    attn = torch.ones_like(prompt)
    reset_peak(device)
    forward = GraphedForward(model, (1, bench.prompt_len + bench.new_tokens), graphs=device.type == "cuda",
                             compile=bench.compile)
    step_times = [_seconds(forward.replay, device) for _ in range(max(20, bench.repeats))]
    sampler = SamplerConfig()  # one token per step: new_tokens steps
    seq_times = [_seconds(lambda: diffusion_generate(forward, prompt, attn, bench.new_tokens, cfg.mask_token_id,
                                                     cfg.shift_logits, sampler), device)
                 for _ in range(bench.repeats)]
    return {"ms_per_step": 1000 * statistics.median(step_times), "steps": bench.new_tokens,
            "s_per_sequence": statistics.median(seq_times), "s_per_sequence_runs": seq_times,
            "peak_gib": peak_gib(device)}


def error_text(e: Exception) -> str:
    """A failed width's error for its row: the exception's type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def measure_width(bench: GenerateBench, bits: int, bandwidth: float | None) -> dict:
    """One width's row: a fresh model, its decoding (or diffusion steps) measured, and which
    kernels it ran. leftover_gib is the CUDA memory still allocated before its model is built,
    which earlier widths measured in the same process left behind (on an H100, 0.1 to 0.8 GiB
    after packed widths, that gc and torch._dynamo.reset() do not free); peak_gib is its own peak
    above that. The model is released before it returns."""
    device = torch.device(bench.device)
    leftover = allocated_gib(device)
    model = build_model(bench, bits)
    weight_bytes = model_bytes(model)
    row = {"bits": bits, "weight_gib": weight_bytes / 2**30,
           "lm_head_bits": bench.lm_head_bits if bits != FULL_PRECISION and bench.lm_head_bits else FULL_PRECISION,
           "leftover_gib": leftover}
    try:
        with torch.no_grad():
            row.update(measure_ar(model, bench) if bench.kind == "ar" else measure_diffusion(model, bench))
    except Exception as e:  # noqa: BLE001 - one failing width (e.g. torch.compile) must not lose the others
        row["error"] = error_text(e)
    if row.get("peak_gib") is not None and leftover is not None:
        row["peak_gib"] -= leftover
    on = model.device  # with its index: the layers cached their choice for it
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    row["packed_kernels"] = any(m.uses_kernels(on) for m in packed)
    row["tinygemm_layers"] = sum(isinstance(m, TinyGemmLinear) for m in model.modules())
    row["pdl_gemv_layers"] = sum(m.pdl for m in packed)
    row["norm_gemv_layers"] = sum(m.fuse_norm and m.uses_kernels(on) for m in packed)
    row["split_sum_layers"] = sum(m.leaves_split_sums(on) for m in packed)
    row["half2_gemv_layers"] = sum(m.takes_half2(on) for m in packed)
    row["attention_kernel"] = any(b.self_attn.decode_attention is not None for b in model.model.layers)
    if bandwidth and bench.kind == "ar" and "error" not in row:
        row["bandwidth_floor_fraction"] = row["tokens_per_s"] / (bandwidth / weight_bytes)
    del model, packed
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_width_alone(bench: GenerateBench, bits: int, bandwidth: float | None) -> dict:
    """measure_width in a process of its own (spawned: CUDA cannot be forked); a process that dies
    (killed for memory, a crash in a kernel) or fails (building the model, e.g. out of memory)
    leaves a row with the error, and the widths after it are still measured."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure_width, bench, bits, bandwidth).result()
        except BrokenProcessPool as e:
            return {"bits": bits, "error": f"the process measuring {bits} bits died: {e}"}
        except Exception as e:  # noqa: BLE001 - as measure_width's own: one width must not lose the others
            return {"bits": bits, "error": error_text(e)}


def bench_generate(bench: GenerateBench, out: str | Path | None = None, progress: bool = True) -> dict:
    """Measures every bit width in turn (measure_width), each in a fresh process where
    bench.isolates; with `out`, the JSON is rewritten after each one."""
    check_device(bench.device)
    device = torch.device(bench.device)
    bandwidth = copy_bandwidth(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results = {"bench": asdict(bench), "environment": environment(bench.device), "copy_bandwidth_gbs":
               None if bandwidth is None else bandwidth / 1e9, "isolated": bench.isolates, "runs": []}
    measure = measure_width_alone if bench.isolates else measure_width
    for bits in tqdm(bench.bits, desc=f"bench generate {bench.kind}", disable=not progress):
        results["runs"].append(measure(bench, bits, bandwidth))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(results, indent=2))
    return results


def products_label(row: dict) -> str:
    """Which kernels a width's products ran: fp16 matmuls, tinygemm (4-bit layers), our Triton
    kernels on the packed buffers, or torch's dequantized weights (CPU)."""
    if row["bits"] == FULL_PRECISION:
        return "dense"
    if row["bits"] == 4 and row.get("tinygemm_layers"):  # a 4-bit output layer may be on it at other widths
        return "tinygemm"
    return "triton" if row.get("packed_kernels") else "torch"


def summary_lines(results: dict) -> list[str]:
    runs = results["runs"]
    base = next((r for r in runs if r["bits"] == FULL_PRECISION and "error" not in r), None)
    ar = results["bench"]["kind"] == "ar"
    if ar:
        head = (f"{'bits':>4} {'products':>8} {'weights GiB':>11} {'peak GiB':>8} {'tok/s':>8} {'ms/token':>8} "
                f"{'TTFT ms':>8} {'vs fp16':>7} {'of floor':>8}")
    else:
        head = (f"{'bits':>4} {'products':>8} {'weights GiB':>11} {'peak GiB':>8} {'ms/step':>8} {'s/sequence':>10} "
                f"{'vs fp16':>7}")
    lines = [head]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['bits']:>4} failed: {r['error']}")
            continue
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "n/a"
        lead = f"{r['bits']:>4} {products_label(r):>8} {r['weight_gib']:>11.3f} {peak:>8}"
        if ar:
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
            floor = f"{100 * r['bandwidth_floor_fraction']:.0f}%" if "bandwidth_floor_fraction" in r else "n/a"
            lines.append(f"{lead} {r['tokens_per_s']:>8.1f} {r['ms_per_token']:>8.3f} {r['ttft_ms']:>8.1f} "
                         f"{speed:>7} {floor:>8}")
        else:
            speed = f"{base['ms_per_step'] / r['ms_per_step']:.2f}x" if base else "n/a"
            lines.append(f"{lead} {r['ms_per_step']:>8.3f} {r['s_per_sequence']:>10.3f} {speed:>7}")
    return lines
