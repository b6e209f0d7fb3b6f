"""Calibration token windows: from a file, the Python standard library, or random tokens."""
from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import torch

from qrobust.errors import QrobustError


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library sources (PSF license), sorted, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


def _texts_from_file(path: Path) -> list[str]:
    if not path.exists():
        raise QrobustError(f"calibration file {path} does not exist: pass a .txt or .jsonl file, 'stdlib' or 'random'")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise QrobustError(f"{path}:{i} is not a JSON object with a 'text' field") from None
        return texts
    return [path.read_text()]


def _stdlib_texts(chars_needed: int, seed: int) -> list[str]:
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= chars_needed:
            break
    return texts


def calibration_tokens(tokenizer, source: str = "stdlib", nsamples: int = 128, seqlen: int = 2048,
                       seed: int = 0, vocab_size: int | None = None) -> torch.Tensor:
    """nsamples windows of seqlen tokens, drawn at random positions of the source text."""
    if nsamples < 1 or seqlen < 2:
        raise QrobustError(f"calibration needs at least 1 sample of 2 tokens, got {nsamples} × {seqlen}")
    g = torch.Generator().manual_seed(seed)
    if source == "random":
        high = vocab_size or len(tokenizer)
        return torch.randint(0, high, (nsamples, seqlen), generator=g)
    if source == "stdlib":
        texts = _stdlib_texts(chars_needed=nsamples * seqlen * 6, seed=seed)
    else:
        texts = _texts_from_file(Path(source))
    sep = tokenizer.eos_token or "\n"
    if not texts:
        ids = torch.empty(0)
    else:
        ids = tokenizer(sep.join(t for t in texts if t.strip()), return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise QrobustError(f"calibration data {source} is empty: give it text")
    if ids.numel() < seqlen:
        raise QrobustError(
            f"calibration data {source} has {ids.numel()} tokens, fewer than one window of {seqlen}: "
            "add text or lower --calib-seqlen"
        )
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
