"""Small models of the real architectures, built locally: for tests, examples and the zoo."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from qrobust.models.files import save_native
from qrobust.models.transformer import TransformerConfig, TransformerLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|mask|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer with the special tokens both model kinds need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   mask_token="<|mask|>")


def tiny_config(tokenizer, causal: bool, **overrides) -> TransformerConfig:
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
               tie_word_embeddings=True, causal=causal, mask_token_id=tokenizer.mask_token_id,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.eos_token_id)
    cfg.update(overrides)
    return TransformerConfig(**cfg)


def build_tiny(kind: str, tokenizer, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised tiny model of kind 'ar' or 'diffusion', saved to out_dir."""
    torch.manual_seed(seed)
    model = TransformerLM(tiny_config(tokenizer, causal=(kind == "ar"), **overrides))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.08)
    return save_native(model, tokenizer, out_dir)
