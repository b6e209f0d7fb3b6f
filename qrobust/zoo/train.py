"""Train the built-in model pair: an AR model and its masked-diffusion sibling that differ only
in the attention mask and the objective (same architecture, size, tokenizer, initialisation,
data order, optimizer and steps).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qrobust.errors import QrobustError
from qrobust.models.diffusion import masked_diffusion_loss
from qrobust.models.files import save_native
from qrobust.models.tiny import train_tokenizer
from qrobust.models.transformer import TransformerConfig, TransformerLM
from qrobust.zoo.corpus import Document, read_split
from qrobust.zoo.metrics import ar_nll, diffusion_nelbo, unigram_nll, windows

KINDS = {"ar": "tiny-ar", "diffusion": "tiny-dllm"}


@dataclass
class ZooConfig:
    vocab_size: int = 4096
    hidden_size: int = 384
    intermediate_size: int = 896
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int = 64
    seq_len: int = 512
    batch_size: int = 64
    steps: int = 3000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3  # smallest mask ratio of the diffusion objective
    seed: int = 0
    eval_windows: int = 256
    elbo_samples: int = 8
    log_every: int = 50


def tokenize_docs(tokenizer, docs: list[Document]) -> torch.Tensor:
    """One token stream, documents separated by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for row in tokenizer([d.text for d in docs[start:start + 256]])["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def model_config(cfg: ZooConfig, tokenizer, causal: bool) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_len,
        rope_theta=10_000.0, tie_word_embeddings=True, causal=causal, shift_logits=True,
        mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )


def init_weights(model: TransformerLM, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
            std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers) if residual_out else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def lr_at(step: int, cfg: ZooConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one(kind: str, cfg: ZooConfig, tokenizer, train_tokens: torch.Tensor, device: str,
              progress: bool = True) -> tuple[TransformerLM, list[dict], float]:
    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_config(cfg, tokenizer, causal=(kind == "ar")))
    init_weights(model, cfg.seed)  # identical initial weights for both kinds
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.startswith("cuda"))
    data_g = torch.Generator().manual_seed(cfg.seed)  # the same windows, in the same order, for both kinds
    mask_g = torch.Generator().manual_seed(cfg.seed + 1)
    tokens = train_tokens.to(device)
    offsets = torch.arange(cfg.seq_len, device=device)
    log, window = [], []
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else torch.autocast("cpu", enabled=False))
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {KINDS[kind]}", disable=not progress)
    for step in bar:
        starts = torch.randint(0, tokens.numel() - cfg.seq_len, (cfg.batch_size,), generator=data_g).to(device)
        ids = tokens[starts[:, None] + offsets].long()
        t = cfg.eps + (1 - cfg.eps) * torch.rand(cfg.batch_size, generator=mask_g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast:
            if kind == "ar":
                logits = model(ids)[:, :-1].float()
                loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:])
            else:
                loss = masked_diffusion_loss(model, ids, t, model.config.mask_token_id, True, mask_g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        window.append(loss.detach())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = float(torch.stack(window).mean())
            window = []
            log.append({"step": step + 1, "loss": mean, "lr": lr_at(step, cfg), "seconds": time.perf_counter() - t0})
            bar.set_postfix(loss=f"{mean:.3f}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model.eval(), log, time.perf_counter() - t0


def validation_loss(kind: str, model: TransformerLM, val: torch.Tensor, cfg: ZooConfig) -> float:
    if kind == "ar":
        return ar_nll(model, val)
    return diffusion_nelbo(model, val, model.config.mask_token_id, True, cfg.elbo_samples, seed=cfg.seed)


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


@contextlib.contextmanager
def deterministic_algorithms():
    """torch's deterministic kernels for the training below, restoring the caller's setting after."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def train_zoo(corpus_dir: str | Path, out_dir: str | Path, cfg: ZooConfig = ZooConfig(), device: str = "cuda",
              kinds: tuple[str, ...] = ("ar", "diffusion"), progress: bool = True,
              overwrite: bool = False) -> dict[str, Path]:
    """Train each kind and write it with its card into OUT/<name>. A model already trained there is
    kept unless overwrite: a retrain costs the GPU time of the first one."""
    out = Path(out_dir)
    trained = [str(out / KINDS[k]) for k in kinds if (out / KINDS[k] / "card.json").exists()]
    if trained and not overwrite:
        raise QrobustError(f"{', '.join(trained)} already holds a trained model: choose another --out or pass --overwrite")
    with deterministic_algorithms():
        return _train_kinds(corpus_dir, out, cfg, device, kinds, progress)


def _train_kinds(corpus_dir, out: Path, cfg: ZooConfig, device: str, kinds: tuple[str, ...],
                 progress: bool) -> dict[str, Path]:
    train_docs, val_docs = read_split(corpus_dir, "train"), read_split(corpus_dir, "val")
    manifest = json.loads((Path(corpus_dir) / "manifest.json").read_text())
    t0 = time.perf_counter()
    tokenizer = train_tokenizer([d.text for d in train_docs], vocab_size=cfg.vocab_size)
    train_tokens, val_tokens = tokenize_docs(tokenizer, train_docs), tokenize_docs(tokenizer, val_docs)
    tokenizer_seconds = time.perf_counter() - t0
    val = windows(val_tokens, cfg.seq_len, cfg.eval_windows).to(device)
    baseline = unigram_nll(train_tokens, val_tokens, len(tokenizer))
    written = {}
    for kind in kinds:
        model, log, seconds = train_one(kind, cfg, tokenizer, train_tokens, device, progress)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            val_loss = validation_loss(kind, model, val, cfg)
        target = save_native(model.half(), tokenizer, out / KINDS[kind])
        with open(target / "train_log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(log[0]))
            w.writeheader()
            w.writerows(log)
        card = {
            "name": KINDS[kind], "kind": kind, "parameters": sum(p.numel() for p in model.parameters()),
            "config": asdict(cfg), "corpus": manifest, "train_tokens": int(train_tokens.numel()),
            "val_tokens_used": int(val.numel()), "tokenizer_seconds": tokenizer_seconds,
            "train_seconds": seconds, "environment": environment(device),
            "final_train_loss": log[-1]["loss"],
            "val_loss": val_loss,
            "val_loss_kind": "exact NLL" if kind == "ar" else "negative ELBO (upper bound on NLL)",
            "unigram_val_nll": baseline,
        }
        (target / "card.json").write_text(json.dumps(card, indent=2))
        written[kind] = target
    return written
