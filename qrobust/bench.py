"""`qrobust bench quantize`: GPTQ speed at real model shapes, random weights, no hub.

Builds a model with a real configuration (e.g. Qwen3-1.7B) and random weights, quantizes it
with qrobust's GPTQ on random-token calibration, and reports wall time per stage, peak GPU
memory and per-layer GPTQ losses; with `--peer gptqmodel`, GPTQModel quantizes the same saved
model with the same calibration and settings in the same run, and the ratio is printed.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from qrobust.errors import QrobustError
from qrobust.models.transformer import TransformerConfig, TransformerLM
from qrobust.sweep import environment

# Real configurations: TransformerConfig's defaults are Qwen3-1.7B's.
SHAPES: dict[str, TransformerConfig] = {
    "qwen3-1.7b": TransformerConfig(),
    "qwen3-0.6b": TransformerConfig(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                                    num_key_value_heads=8, head_dim=128),
    # not a real model: the Qwen3 layout at a size CPU tests can run (group size 128 divides every layer),
    # with the built-in tokenizer's vocabulary
    "tiny": TransformerConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              max_position_embeddings=4096),
}


@dataclass
class QuantBench:
    shape: str = "qwen3-1.7b"
    kind: str = "ar"
    bits: int = 4
    group_size: int = 128
    nsamples: int = 128
    seqlen: int = 2048
    layers: int | None = None  # fewer blocks than the real model, for quick runs on small machines
    vocab_size: int | None = None
    device: str = "cuda"
    seed: int = 0
    peer: str | None = None
    fuse_shared: bool = True
    calib_batch_size: int = 1
    repeats: int = 1


def check_device(device: str) -> None:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise QrobustError(f"device {device} is not available here: run on a GPU machine or pass --device cpu")


def shape_config(bench: QuantBench) -> TransformerConfig:
    if bench.shape not in SHAPES:
        raise QrobustError(f"unknown shape {bench.shape!r}: choose from {', '.join(SHAPES)}")
    if bench.kind not in ("ar", "diffusion"):
        raise QrobustError(f"unknown kind {bench.kind!r}: use ar or diffusion")
    cfg = SHAPES[bench.shape]
    overrides = {"causal": bench.kind == "ar"}
    if bench.layers:
        overrides["num_hidden_layers"] = bench.layers
    if bench.vocab_size:
        overrides["vocab_size"] = bench.vocab_size
    cfg = replace(cfg, **overrides)
    return replace(cfg, mask_token_id=cfg.vocab_size - 1, pad_token_id=cfg.vocab_size - 2,
                   eos_token_id=cfg.vocab_size - 3, bos_token_id=cfg.vocab_size - 3)


def random_lm(cfg: TransformerConfig, device: str | torch.device, seed: int,
              dtype: torch.dtype = torch.float16) -> TransformerLM:
    """A TransformerLM with random weights (std 0.02) built directly on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = TransformerLM(cfg).to(dtype)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return model


def build_random_model(cfg: TransformerConfig, out_dir: Path, seed: int, device: str = "cpu") -> Path:
    """Random float16 weights (drawn on `device`, faster on a GPU) saved as a native model; the
    tokenizer is a stand-in."""
    from qrobust.models.files import save_native
    from qrobust.models.tiny import train_tokenizer

    model = random_lm(cfg, device, seed).cpu()
    tokenizer = train_tokenizer(["def f(x):\n    return x\n"] * 4, vocab_size=300)
    return save_native(model, tokenizer, out_dir)


def model_dtype(device: str) -> torch.dtype:
    """float16 as deployed on GPUs; CPUs have no fast float16 matmul, so they get float32."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """CUDA peak allocated since reset_peak, in GiB; None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    """CUDA memory allocated now, in GiB; None on CPU."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_ours(model_dir: Path, bench: QuantBench, calib: torch.Tensor) -> dict:
    from qrobust.models import load_model
    from qrobust.quant import QuantizeConfig, StageTimer, quantize_model

    adapter = load_model(str(model_dir), device=bench.device, dtype=model_dtype(bench.device))
    device = adapter.device
    reset_peak(device)
    weights_gib = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) / 2**30
    config = QuantizeConfig(bits=bench.bits, group_size=bench.group_size, nsamples=bench.nsamples,
                            seqlen=bench.seqlen, seed=bench.seed, fuse_shared=bench.fuse_shared,
                            batch_size=bench.calib_batch_size)
    timer = StageTimer(device)
    t0 = time.perf_counter()
    records = quantize_model(adapter, config, calib, progress=True, timer=timer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return {"tool": "qrobust", "seconds": total, "stages": dict(timer.seconds), "peak_gib": peak_gib(device),
            "model_gib": weights_gib, "layers": len(records),
            "losses": {r.name: r.gptq_loss for r in records}}


def run_gptqmodel(model_dir: Path, bench: QuantBench, calib: torch.Tensor) -> dict:
    """GPTQModel on the same saved model, calibration and settings (damp and order set explicitly;
    its group-aware reordering, on by default since GPTQModel 4, off: the reference GPTQ and ours
    quantize columns in their order)."""
    try:
        from gptqmodel import GPTQModel
        from gptqmodel import QuantizeConfig as PeerConfig
    except ImportError:
        raise QrobustError("--peer gptqmodel needs GPTQModel installed (see README: GPU performance)") from None
    qcfg = PeerConfig(bits=bench.bits, group_size=bench.group_size, sym=True, desc_act=False, damp_percent=0.01,
                      act_group_aware=False)
    device = torch.device(bench.device)
    reset_peak(device)
    model = GPTQModel.load(str(model_dir), qcfg)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    t0 = time.perf_counter()
    model.quantize(data, batch_size=1)
    total = time.perf_counter() - t0
    return {"tool": "gptqmodel", "seconds": total, "peak_gib": peak_gib(device),
            "losses": peer_losses(getattr(model, "quant_log", None) or [], bench.seqlen)}


def peer_losses(quant_log: list[dict], seqlen: int) -> dict[str, float]:
    """GPTQModel's per-module losses in qrobust's units. GPTQModel (7.x) logs entries with 'layer',
    'module', 'loss' (a string) and 'samples' (tokens); it scales H by 2/tokens and divides the loss
    by tokens, where qrobust, like the reference GPTQ, scales H by 2/sequences and does not divide.
    For the same weights and codes, ours = theirs · tokens · seqlen. Entries without a number
    (fallback quantization) are left out."""
    losses = {}
    for entry in quant_log:
        try:
            loss, tokens = float(entry["loss"]), float(entry["samples"])
            name = f"model.layers.{int(entry['layer'])}.{entry['module']}"
        except (KeyError, TypeError, ValueError):
            continue
        losses[name] = loss * tokens * seqlen
    return losses


def bench_quantize(bench: QuantBench, work_dir: str | Path | None = None, out: str | Path | None = None) -> dict:
    """Runs ours, then the peer; with `out`, the JSON is rewritten after each run so a run that
    is stopped keeps what it measured."""
    cfg = shape_config(bench)
    if bench.peer not in (None, "gptqmodel"):
        raise QrobustError(f"unknown peer {bench.peer!r}: the supported peer is gptqmodel")
    if bench.peer and bench.kind != "ar":
        raise QrobustError("GPTQModel cannot load our diffusion models: use --kind ar with --peer")
    check_device(bench.device)
    if bench.repeats < 1:
        raise QrobustError(f"--repeats must be at least 1, got {bench.repeats}")
    if work_dir is None:  # the random model (GBs at the real shape) goes with the run
        with tempfile.TemporaryDirectory(prefix="qrobust-bench-") as tmp:
            return bench_quantize(bench, tmp, out)
    root = Path(work_dir)
    t0 = time.perf_counter()
    model_dir = build_random_model(cfg, root / f"{bench.shape}-{bench.kind}", bench.seed, bench.device)
    build_seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(bench.seed)
    calib = torch.randint(0, cfg.vocab_size - 3, (bench.nsamples, bench.seqlen), generator=g)
    results = {"bench": asdict(bench), "config": cfg.to_dict(), "build_seconds": build_seconds,
               "environment": environment(bench.device), "runs": []}
    for run in [run_ours] * bench.repeats + ([run_gptqmodel] if bench.peer else []):
        results["runs"].append(run(model_dir, bench, calib))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(results, indent=2))
    return results


def summary_lines(results: dict) -> list[str]:
    """One line per tool (the median run where there are several), then ours against the peer."""
    by_tool: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_tool.setdefault(r["tool"], []).append(r)
    median = {tool: sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2] for tool, runs in by_tool.items()}
    lines = []
    for tool, r in median.items():
        losses = [v for v in r["losses"].values() if v is not None]
        med = statistics.median(losses) if losses else float("nan")
        peak = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "n/a"
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(r.get("stages", {}).items(), key=lambda kv: -kv[1]))
        runs = by_tool[tool]
        times = ", ".join(f"{x['seconds']:.1f}" for x in runs)
        spread = f" (median of {len(runs)}: {times})" if len(runs) > 1 else ""
        lines.append(f"{tool:<10} {r['seconds']:8.1f} s{spread}  peak {peak}  median layer loss {med:.4g}"
                     + (f"  [{stages}]" if stages else ""))
    if "qrobust" in median and len(median) == 2:
        ours = median["qrobust"]
        peer = next(r for tool, r in median.items() if tool != "qrobust")
        lines.append(f"speed-up vs {peer['tool']}: {peer['seconds'] / ours['seconds']:.2f}x")
        common = sorted(set(ours["losses"]) & set(peer["losses"]))
        if common:
            ratio = statistics.median(ours["losses"][n] / peer["losses"][n] for n in common if peer["losses"][n])
            lines.append(f"median per-layer loss ratio (ours / {peer['tool']}) over {len(common)} layers: {ratio:.3f}")
    return lines
