"""Write and read quantized models in the GPTQ checkpoint layout.

A checkpoint directory holds model.safetensors (qweight/qzeros/scales/g_idx per quantized
layer, everything else as is), config.json with `quantization_config`, quantize_config.json
(both read by GPTQModel and transformers), the tokenizer, qrobust.json (what qrobust needs to
rebuild either model kind) and quant_log.csv (per-layer errors).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from qrobust.errors import QrobustError
from qrobust.models.adapters import ModelAdapter
from qrobust.models.diffusion import SamplerConfig
from qrobust.models.files import diffusion_adapter, hf_config_dict, load_tokenizer, state_dict_from, unique_state_dict
from qrobust.models.transformer import TransformerConfig, TransformerLM
from qrobust.quant.driver import LayerRecord, QuantizeConfig
from qrobust.quant.grid import QuantSpec
from qrobust.quant.qlinear import FORMAT_OFFSET, QuantLinear, checkpoint_format, set_module
from qrobust.version import __version__


def _base_config(adapter: ModelAdapter) -> dict:
    config = adapter.model.config
    if isinstance(config, TransformerConfig):
        return hf_config_dict(config)
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


def gptq_quantization_config(config: QuantizeConfig, layers: dict[str, QuantSpec]) -> dict:
    """The `quantization_config` GPTQ loaders read; mixed bits go in GPTQModel's `dynamic`.
    Mixed checkpoints are gptq_v2 whatever their symmetry: GPTQModel (7.2) turns v1 zero points
    into v2 with the default width's constant for every layer, which corrupts the other widths."""
    default = config.default_spec
    fmt = checkpoint_format(default)
    qc = {
        "quant_method": "gptq", "bits": default.bits, "group_size": default.group_size,
        "desc_act": config.act_order, "sym": default.sym, "static_groups": config.static_groups,
        "damp_percent": config.percdamp, "true_sequential": config.true_sequential, "lm_head": False,
        "checkpoint_format": fmt, "format": fmt,
        "meta": {"quantizer": [f"qrobust:{__version__}"], "method": config.method},
    }
    dynamic = {f"+:^{re.escape(name)}$": {"bits": s.bits, "group_size": s.group_size}
               for name, s in layers.items() if (s.bits, s.group_size) != (default.bits, default.group_size)}
    if dynamic:
        qc["dynamic"] = dynamic
        qc["checkpoint_format"] = qc["format"] = "gptq_v2"
    return qc


def save_quantized(adapter: ModelAdapter, config: QuantizeConfig, records: list[LayerRecord],
                   out_dir: str | Path, base_model: str) -> Path:
    """Write atomically: into a temporary sibling, renamed into place when complete."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        layers = {name: m.spec for name, m in adapter.model.named_modules() if isinstance(m, QuantLinear)}
        qc = gptq_quantization_config(config, layers)
        cfg = _base_config(adapter)
        cfg["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2))
        state = unique_state_dict(adapter.model)
        for name, m in adapter.model.named_modules():  # zero points as the checkpoint's format stores them
            if isinstance(m, QuantLinear):
                state[f"{name}.qzeros"] = m.qzeros_as(qc["checkpoint_format"]).contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        adapter.tokenizer.save_pretrained(str(tmp))
        meta = {
            "qrobust_version": __version__,
            "kind": adapter.kind,
            "base_model": base_model,
            "dtype": str(next(adapter.model.parameters()).dtype).removeprefix("torch."),
            "quantization": config.to_dict(),
            "layers": {name: asdict(spec) for name, spec in layers.items()},
        }
        if adapter.kind == "diffusion":
            meta["diffusion"] = {"mask_token_id": adapter.mask_token_id, "shift_logits": adapter.shift_logits}
        if isinstance(adapter.model.config, TransformerConfig):
            meta["native_config"] = adapter.model.config.to_dict()
        (tmp / "qrobust.json").write_text(json.dumps(meta, indent=2))
        write_layer_log(records, tmp / "quant_log.csv")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_layer_log(records: list[LayerRecord], path: Path) -> None:
    names = list(LayerRecord.__dataclass_fields__)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in records:
            w.writerow(asdict(r))


def _skeleton(path: Path, meta: dict, cfg: dict, dtype: torch.dtype):
    if "native_config" in meta:
        return TransformerLM(TransformerConfig.from_dict(meta["native_config"])).to(dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_quantized(path: str | Path, device: str = "cpu", sampler: SamplerConfig | None = None) -> ModelAdapter:
    from qrobust.models.adapters import ARAdapter

    path = Path(path)
    try:
        meta = json.loads((path / "qrobust.json").read_text())
        cfg = json.loads((path / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise QrobustError(f"{path} is not a readable qrobust checkpoint ({e}): quantize again") from None
    dtype = getattr(torch, meta.get("dtype", "float32"))
    model = _skeleton(path, meta, cfg, dtype)
    fmt = cfg.get("quantization_config", {}).get("checkpoint_format")
    if fmt is not None and fmt not in FORMAT_OFFSET:
        raise QrobustError(f"{path}: checkpoint_format {fmt!r} is neither of {', '.join(FORMAT_OFFSET)}: "
                           "quantize again")
    for name, s in meta["layers"].items():
        old = model.get_submodule(name)
        out_f, in_f = old.weight.shape
        layer = QuantLinear(in_f, out_f, QuantSpec(**s), old.bias is not None, dtype)
        layer.format = fmt or layer.format  # how the stored zero points are offset
        set_module(model, name, layer)
    state = state_dict_from(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise QrobustError(f"{path}: checkpoint does not match its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model = model.to(device).eval()
    tokenizer = load_tokenizer(path)
    name = meta.get("base_model", str(path))
    if meta["kind"] == "diffusion":
        config = TransformerConfig.from_dict(meta.get("native_config") or cfg)
        config.mask_token_id = meta["diffusion"]["mask_token_id"]
        config.shift_logits = meta["diffusion"]["shift_logits"]
        return diffusion_adapter(model, tokenizer, name, config, sampler)
    return ARAdapter(model, tokenizer, name, model.config.num_hidden_layers)
