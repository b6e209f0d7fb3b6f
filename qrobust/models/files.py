"""A model directory's files, read and written: safetensors weights, the tokenizer, a native
model's config.json; and the diffusion adapter built from what they hold.

Plain loading (qrobust.models.loading) and quantized checkpoints (qrobust.quant.checkpoint)
both read directories through here, so that neither needs the other.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qrobust.errors import QrobustError
from qrobust.models.adapters import DiffusionAdapter
from qrobust.models.diffusion import SamplerConfig
from qrobust.models.transformer import TransformerConfig, TransformerLM

NATIVE_DIFFUSION_TYPE = "qrobust_dllm"
# What transformers' tokenizers are saved as; a model directory holds at least one of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model")
# Fewer tokens than any tokenizer a model is trained with (a byte-level one has 256 and more).
MIN_VOCAB = 16


def state_dict_from(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QrobustError(f"{path} has no .safetensors weights: qrobust loads safetensors checkpoints only")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error type, a truncated header, an OSError
            raise QrobustError(f"{f} is damaged ({type(e).__name__}): save or download it again") from e
    return state


def load_tokenizer(path: Path):
    """The tokenizer saved in a model directory. Without its files transformers still returns one,
    empty, which only fails later and elsewhere (calibration finds no text): refuse it here."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise QrobustError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                           "copy the tokenizer of the base model into it")
    # AutoTokenizer reads config.json and warns about model types it does not know (ours).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise QrobustError(f"could not load the tokenizer in {path} ({type(e).__name__}: {e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(tokenizer) < MIN_VOCAB:
        raise QrobustError(f"{path} has a tokenizer of {len(tokenizer)} tokens, too few for a language model: "
                           "copy the tokenizer of the base model into it")
    return tokenizer


def diffusion_adapter(model, tokenizer, name: str, config: TransformerConfig,
                      sampler: SamplerConfig | None = None) -> DiffusionAdapter:
    mask_id = config.mask_token_id
    if mask_id is None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise QrobustError(f"{name} is a diffusion model without a mask token: set mask_token_id in its config.json")
    return DiffusionAdapter(model, tokenizer, name, config.num_hidden_layers, mask_id, config.shift_logits, sampler)


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
