"""Load either kind of code LM from a registered short name, a hub id or a local directory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qrobust.errors import QrobustError
from qrobust.models.adapters import ARAdapter, DiffusionAdapter, ModelAdapter
from qrobust.models.diffusion import SamplerConfig
from qrobust.models.presets import CODA_PRESET, DEFAULT_PRESET, QWEN3_PRESET, TINY_PRESET, EvalPreset
from qrobust.models.transformer import TransformerConfig, TransformerLM
from qrobust.precision import resolve_dtype

NATIVE_DIFFUSION_TYPE = "qrobust_dllm"
CODA_TYPES = {"coda"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    kind: str
    description: str
    preset: EvalPreset = DEFAULT_PRESET  # how the model is evaluated unless flags say otherwise


def _builtin(name: str) -> str:
    return str(Path(__file__).resolve().parent.parent / "zoo" / "models" / name)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("tiny-ar", _builtin("tiny-ar"), "ar", "built-in AR code model, trained by qrobust (offline)",
                  TINY_PRESET),
        ModelSpec("tiny-dllm", _builtin("tiny-dllm"), "diffusion",
                  "built-in masked-diffusion sibling of tiny-ar (offline)", TINY_PRESET),
        ModelSpec("qwen3-1.7b", "Qwen/Qwen3-1.7B", "ar", "Qwen3 1.7B, the autoregressive reference (hub)",
                  QWEN3_PRESET),
        ModelSpec("coda-instruct", "Salesforce/CoDA-v0-Instruct", "diffusion",
                  "CoDA 1.7B instruct, masked diffusion, loaded natively (hub)", CODA_PRESET),
        ModelSpec("coda-base", "Salesforce/CoDA-v0-Base", "diffusion", "CoDA 1.7B base, masked diffusion (hub)",
                  CODA_PRESET),
    )
}


def preset_for(name_or_path: str) -> EvalPreset:
    """The registered model's evaluation preset; DEFAULT_PRESET for directories and hub ids."""
    spec = MODELS.get(name_or_path)
    return spec.preset if spec else DEFAULT_PRESET


def resolve_source(name_or_path: str) -> Path:
    """A local directory holding config.json, downloading from the hub if needed."""
    if name_or_path in MODELS:
        spec = MODELS[name_or_path]
        if spec.source.startswith("/") and not Path(spec.source).is_dir():
            raise QrobustError(f"built-in model {spec.name} is not installed in {spec.source}: reinstall qrobust")
        name_or_path = spec.source
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise QrobustError(f"{path} has no config.json: point --model at a model directory")
        return path
    if path.exists() or name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        known = ", ".join(MODELS)
        raise QrobustError(f"unknown model {name_or_path!r}: use a local model directory, a hub id (org/name) or one of: {known}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.jinja"])
    except Exception as e:  # hub errors come in many types; the message is what matters
        raise QrobustError(
            f"could not get {name_or_path} from the model hub ({type(e).__name__}): check the id and your network, "
            "or download it and pass the local directory"
        ) from None
    return Path(local)


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise QrobustError(f"{path / 'config.json'} is not valid JSON ({e.msg}): re-download or re-save the model") from None


def native_config_from(cfg: dict, causal: bool, has_lm_head: bool) -> TransformerConfig:
    """A TransformerConfig from a Qwen3-shaped config (ours, Qwen3's or CoDA's)."""
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 1_000_000.0
    base = TransformerConfig.from_dict(cfg)
    base.rope_theta = float(rope)
    base.causal = causal
    base.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base.num_key_value_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    # CoDA's config says tied, but its checkpoint stores its own head: trust the weights.
    base.tie_word_embeddings = not has_lm_head
    return base


def _state_dict_from(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QrobustError(f"{path} has no .safetensors weights: qrobust loads safetensors checkpoints only")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_native(path: Path, cfg: dict, causal: bool, dtype: torch.dtype, device: str) -> TransformerLM:
    state = _state_dict_from(path)
    config = native_config_from(cfg, causal, has_lm_head="lm_head.weight" in state)
    model = TransformerLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QrobustError(
            f"weights in {path} do not match a Qwen3-shaped model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "this architecture is not supported natively"
        )
    return model.to(device=device, dtype=dtype).eval()


def _tokenizer(path: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json and warns about model types it does not know (ours).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise QrobustError(f"could not load the tokenizer in {path} ({type(e).__name__}: {e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def diffusion_adapter(model, tokenizer, name: str, config: TransformerConfig,
                      sampler: SamplerConfig | None = None) -> DiffusionAdapter:
    mask_id = config.mask_token_id
    if mask_id is None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise QrobustError(f"{name} is a diffusion model without a mask token: set mask_token_id in its config.json")
    return DiffusionAdapter(model, tokenizer, name, config.num_hidden_layers, mask_id, config.shift_logits, sampler)


def load_model(name_or_path: str, device: str = "cpu", dtype: torch.dtype | None = None,
               remote_code: bool = False, sampler: SamplerConfig | None = None) -> ModelAdapter:
    """Load an AR or masked-diffusion LM by short name, hub id or directory.

    Quantized checkpoints written by `qrobust quantize` load too, with their packed layers.
    remote_code: for CoDA, run its own modeling code instead of the native implementation.
    dtype None: bfloat16 on CUDA, float32 on CPU (qrobust.precision.default_dtype).
    """
    path = resolve_source(name_or_path)
    if (path / "qrobust.json").exists() and json.loads((path / "qrobust.json").read_text()).get("quantization"):
        from qrobust.quant.checkpoint import load_quantized

        return load_quantized(path, device=device, sampler=sampler)
    cfg = read_config(path)
    dtype = resolve_dtype(dtype, device)
    model_type = str(cfg.get("model_type", "")).lower()
    tokenizer = _tokenizer(path)
    if model_type == NATIVE_DIFFUSION_TYPE or model_type in CODA_TYPES:
        if remote_code and model_type in CODA_TYPES:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(str(path), trust_remote_code=True, dtype=dtype).to(device).eval()
            config = native_config_from(cfg, causal=False, has_lm_head=True)
        else:
            model = load_native(path, cfg, causal=False, dtype=dtype, device=device)
            config = model.config
        return diffusion_adapter(model, tokenizer, name_or_path, config, sampler)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    except ValueError as e:
        raise QrobustError(f"{name_or_path} is not a causal LM that transformers can load ({e})") from None
    return ARAdapter(model, tokenizer, name_or_path, model.config.num_hidden_layers)


def hf_config_dict(config: TransformerConfig) -> dict:
    """config.json for a native model: a Qwen3 config (AR) or Qwen3 plus diffusion fields."""
    d = {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "use_sliding_window": False, "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "dtype": "float32",
    }
    if config.causal:
        d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    else:
        d.update(model_type=NATIVE_DIFFUSION_TYPE, architectures=["TransformerLM"],
                 mask_token_id=config.mask_token_id, shift_logits=config.shift_logits, causal=False)
    return d


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases of tied tensors (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def save_native(model: TransformerLM, tokenizer, out_dir: str | Path) -> Path:
    """Write a native model so that load_model reads it (and transformers, for the AR kind)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.config)
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(unique_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    return out
