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
from qrobust.models.transformer import TransformerConfig
from qrobust.sweep import environment

# Real configurations: TransformerConfig's defaults are Qwen3-1.7B's.
SHAPES: dict[str, TransformerConfig] = {
    "qwen3-1.7b": TransformerConfig(),
    "qwen3-0.6b": TransformerConfig(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                                    num_key_value_heads=8, head_dim=128),
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


def build_random_model(cfg: TransformerConfig, out_dir: Path, seed: int) -> Path:
    """Random float16 weights (std 0.02) saved as a native model; the tokenizer is a stand-in."""
    from qrobust.models.loading import save_native
    from qrobust.models.tiny import train_tokenizer
    from qrobust.models.transformer import TransformerLM

    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = TransformerLM(cfg).half()
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    tokenizer = train_tokenizer(["def f(x):\n    return x\n"] * 4, vocab_size=300)
    return save_native(model, tokenizer, out_dir)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_ours(model_dir: Path, bench: QuantBench, calib: torch.Tensor) -> dict:
    from qrobust.models import load_model
    from qrobust.quant import QuantizeConfig, StageTimer, quantize_model

    # float16 as deployed on GPUs; CPUs have no fast float16 matmul, so they get float32
    dtype = torch.float16 if bench.device.startswith("cuda") else torch.float32
    adapter = load_model(str(model_dir), device=bench.device, dtype=dtype)
    device = adapter.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
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
    return {"tool": "qrobust", "seconds": total, "stages": dict(timer.seconds), "peak_gib": _peak_gib(device),
            "model_gib": weights_gib, "layers": len(records),
            "losses": {r.name: r.gptq_loss for r in records}}


def run_gptqmodel(model_dir: Path, bench: QuantBench, calib: torch.Tensor) -> dict:
    """GPTQModel on the same saved model, calibration and settings (damp and order set explicitly)."""
    try:
        from gptqmodel import GPTQModel
        from gptqmodel import QuantizeConfig as PeerConfig
    except ImportError:
        raise QrobustError("--peer gptqmodel needs GPTQModel installed (see README: GPU performance)") from None
    qcfg = PeerConfig(bits=bench.bits, group_size=bench.group_size, sym=True, desc_act=False, damp_percent=0.01)
    device = torch.device(bench.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = GPTQModel.load(str(model_dir), qcfg)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    t0 = time.perf_counter()
    log = model.quantize(data, batch_size=1)
    total = time.perf_counter() - t0
    losses = {}
    for entry in log or getattr(model, "quant_log", []) or []:
        if isinstance(entry, dict) and "module" in entry and "loss" in entry:
            losses[f"model.layers.{entry.get('layer')}.{entry['module']}"] = float(entry["loss"])
    return {"tool": "gptqmodel", "seconds": total, "peak_gib": _peak_gib(device), "losses": losses}


def bench_quantize(bench: QuantBench, work_dir: str | Path | None = None, out: str | Path | None = None) -> dict:
    """Runs ours, then the peer; with `out`, the JSON is rewritten after each run so a run that
    is stopped keeps what it measured."""
    cfg = shape_config(bench)
    if bench.peer not in (None, "gptqmodel"):
        raise QrobustError(f"unknown peer {bench.peer!r}: the supported peer is gptqmodel")
    if bench.peer and bench.kind != "ar":
        raise QrobustError("GPTQModel cannot load our diffusion models: use --kind ar with --peer")
    root = Path(work_dir or tempfile.mkdtemp(prefix="qrobust-bench-"))
    t0 = time.perf_counter()
    model_dir = build_random_model(cfg, root / f"{bench.shape}-{bench.kind}", bench.seed)
    build_seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(bench.seed)
    calib = torch.randint(0, cfg.vocab_size - 3, (bench.nsamples, bench.seqlen), generator=g)
    results = {"bench": asdict(bench), "config": cfg.to_dict(), "build_seconds": build_seconds,
               "environment": environment(bench.device), "runs": []}
    for run in (run_ours, run_gptqmodel if bench.peer else None):
        if run is not None:
            results["runs"].append(run(model_dir, bench, calib))
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(json.dumps(results, indent=2))
    return results


def summary_lines(results: dict) -> list[str]:
    runs = results["runs"]
    lines = []
    for r in runs:
        losses = [v for v in r["losses"].values() if v is not None]
        med = statistics.median(losses) if losses else float("nan")
        peak = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "n/a"
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(r.get("stages", {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"{r['tool']:<10} {r['seconds']:8.1f} s  peak {peak}  median layer loss {med:.4g}"
                     + (f"  [{stages}]" if stages else ""))
    if len(runs) == 2:
        ours, peer = runs
        lines.append(f"speed-up vs {peer['tool']}: {peer['seconds'] / ours['seconds']:.2f}x")
        common = sorted(set(ours["losses"]) & set(peer["losses"]))
        if common:
            ratio = statistics.median(ours["losses"][n] / peer["losses"][n] for n in common if peer["losses"][n])
            lines.append(f"median per-layer loss ratio (ours / {peer['tool']}) over {len(common)} layers: {ratio:.3f}")
    return lines
