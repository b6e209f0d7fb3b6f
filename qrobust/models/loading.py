"""Load either kind of code LM from a registered short name, a hub id or a local directory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qrobust.errors import QrobustError
from qrobust.models.adapters import ARAdapter, ModelAdapter
from qrobust.models.diffusion import SamplerConfig
from qrobust.models.files import NATIVE_DIFFUSION_TYPE, diffusion_adapter, load_tokenizer, state_dict_from
from qrobust.models.presets import CODA_PRESET, DEFAULT_PRESET, QWEN3_PRESET, TINY_PRESET, EvalPreset
from qrobust.models.transformer import TransformerConfig, TransformerLM
from qrobust.precision import resolve_dtype
from qrobust.quant.checkpoint import load_quantized

CODA_TYPES = {"coda"}
# causal checkpoints the native TransformerLM runs (and the batched engine decodes, models.engine);
# other architectures load through transformers
NATIVE_CAUSAL_TYPES = {"qwen3"}


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
        raise QrobustError(f"unknown model {name_or_path!r}: use a local model directory, a hub id (org/name) "
                           f"or one of: {known}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name_or_path,
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.jinja"])
    except Exception as e:  # hub errors come in many types; the message is what matters
        raise QrobustError(
            f"could not get {name_or_path} from the model hub ({type(e).__name__}): check the id and your network, "
            "or download it and pass the local directory"
        ) from None
    return Path(local)


def read_json(file: Path) -> dict:
    """A model directory's JSON file (config.json, qrobust.json), or a one-line error if damaged."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise QrobustError(f"{file} is not valid JSON ({e.msg}): re-download or re-save the model") from None


def read_config(path: Path) -> dict:
    return read_json(path / "config.json")


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


def load_native(path: Path, cfg: dict, causal: bool, dtype: torch.dtype, device: str) -> TransformerLM:
    state = state_dict_from(path)
    config = native_config_from(cfg, causal, has_lm_head="lm_head.weight" in state)
    model = TransformerLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QrobustError(
            f"weights in {path} do not match a Qwen3-shaped model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "this architecture is not supported natively"
        )
    return model.to(device=device, dtype=dtype).eval()


def load_model(name_or_path: str, device: str = "cpu", dtype: torch.dtype | None = None,
               remote_code: bool = False, sampler: SamplerConfig | None = None) -> ModelAdapter:
    """Load an AR or masked-diffusion LM by short name, hub id or directory.

    Quantized checkpoints written by `qrobust quantize` load too, with their packed layers.
    remote_code: for CoDA, run its own modeling code instead of the native implementation.
    dtype None: bfloat16 on CUDA and CPUs with native bf16, else float32 (qrobust.precision.default_dtype).
    """
    path = resolve_source(name_or_path)
    if (path / "qrobust.json").exists() and read_json(path / "qrobust.json").get("quantization"):
        return load_quantized(path, device=device, sampler=sampler)
    cfg = read_config(path)
    dtype = resolve_dtype(dtype, device)
    model_type = str(cfg.get("model_type", "")).lower()
    tokenizer = load_tokenizer(path)
    if model_type == NATIVE_DIFFUSION_TYPE or model_type in CODA_TYPES:
        if remote_code and model_type in CODA_TYPES:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(str(path), trust_remote_code=True, dtype=dtype).to(device).eval()
            config = native_config_from(cfg, causal=False, has_lm_head=True)
        else:
            model = load_native(path, cfg, causal=False, dtype=dtype, device=device)
            config = model.config
        return diffusion_adapter(model, tokenizer, name_or_path, config, sampler)
    if model_type in NATIVE_CAUSAL_TYPES:
        model = load_native(path, cfg, causal=True, dtype=dtype, device=device)
        return ARAdapter(model, tokenizer, name_or_path, model.config.num_hidden_layers, generation_eos_ids(path))
    model = load_transformers_causal(path, dtype, device)
    return ARAdapter(model, tokenizer, name_or_path, model.config.num_hidden_layers)


def load_transformers_causal(path: Path, dtype: torch.dtype, device: str):
    """A causal LM through transformers' own modeling code (architectures the native model does
    not cover; also the reference the native model and its engine are checked against)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    except ValueError as e:
        raise QrobustError(f"{path} is not a causal LM that transformers can load ({e})") from None


def generation_eos_ids(path: Path) -> tuple[int, ...]:
    """The end-of-sequence ids generation_config.json lists (Qwen3 stops at <|im_end|> and
    <|endoftext|>), as transformers' generate reads them; () without that file."""
    try:
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (FileNotFoundError, json.JSONDecodeError):
        return ()
    return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
