"""The training corpus of the built-in models: the running interpreter's standard library.

Reproducible on any machine with the same Python: every .py file under the stdlib directory
(site-packages excluded), decoded as UTF-8, files over 500 kB (data blobs such as
pydoc_data/topics.py) dropped, exact duplicates removed, and split by file — a file is in the
validation split when sha256(its relative path) mod 100 < 5. The manifest records the Python
version and a hash of the file list, and how much the corpus overlaps HumanEval/MBPP solutions.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from qrobust.errors import QrobustError

MAX_FILE_BYTES = 500_000
VAL_PERCENT = 5
NGRAMS = (10, 20, 30)  # code tokens per n-gram in the overlap check
_CODE_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+|\S")


@dataclass
class Document:
    path: str  # relative to the stdlib root
    text: str

    @property
    def split(self) -> str:
        h = int(hashlib.sha256(self.path.encode()).hexdigest(), 16)
        return "val" if h % 100 < VAL_PERCENT else "train"


def stdlib_documents(root: str | Path | None = None) -> list[Document]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs, seen = [], set()
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if "site-packages" in rel.parts or p.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen or not text.strip():
            continue
        seen.add(digest)
        docs.append(Document(rel.as_posix(), text))
    return docs


def code_tokens(text: str) -> list[str]:
    return _CODE_TOKEN.findall(text)


def benchmark_overlap(docs: list[Document], ns: tuple[int, ...] = NGRAMS) -> dict:
    """For each n: the share of HumanEval/MBPP reference solutions sharing a run of n code
    tokens with the corpus. Short runs (10) catch common idioms; long ones (30) copied code."""
    from harness.tasks import get_task

    solutions = {}
    for name in ("humaneval", "mbpp"):
        for p in get_task(name).problems():
            # HumanEval: the canonical body only (its prompt is a signature and docstring).
            solutions[p.task_id] = p.reference[len(p.text):] if name == "humaneval" else p.reference
    report: dict = {"ngram_tokens": list(ns)}
    for n in ns:
        grams: dict[tuple, set] = {}
        for tid, sol in solutions.items():
            toks = code_tokens(sol)
            for i in range(len(toks) - n + 1):
                grams.setdefault(tuple(toks[i:i + n]), set()).add(tid)
        found = _grams_found(docs, n, set(grams))
        hits = {t for g in found for t in grams[g]}
        for name, prefix in (("humaneval", "HumanEval/"), ("mbpp", "mbpp/")):
            total = sum(t.startswith(prefix) for t in solutions)
            mine = sorted(t for t in hits if t.startswith(prefix))
            report.setdefault(name, {})[f"{n}"] = {"problems_with_overlap": len(mine), "problems": total,
                                                   "share": len(mine) / total, "examples": mine[:5]}
    return report


def _grams_found(docs: list[Document], n: int, wanted: set) -> set:
    found = set()
    for d in docs:
        toks = code_tokens(d.text)
        for i in range(len(toks) - n + 1):
            g = tuple(toks[i:i + n])
            if g in wanted:
                found.add(g)
    return found


def build_corpus(out_dir: str | Path, root: str | Path | None = None, overlap: bool = True) -> dict:
    """Write train.jsonl.gz, val.jsonl.gz and manifest.json; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents(root)
    if not docs:
        raise QrobustError("no standard-library sources found: this Python ships without .py files")
    splits = {"train": [d for d in docs if d.split == "train"], "val": [d for d in docs if d.split == "val"]}
    for split, items in splits.items():
        with gzip.open(out / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in items:
                f.write(json.dumps({"path": d.path, "text": d.text}) + "\n")
    file_list = "\n".join(d.path for d in docs)
    manifest = {
        "source": "Python standard library (PSF License Agreement)",
        "python_version": platform.python_version(),
        "file_list_sha256": hashlib.sha256(file_list.encode()).hexdigest(),
        "files": {k: len(v) for k, v in splits.items()},
        "characters": {k: sum(len(d.text) for d in v) for k, v in splits.items()},
        "rules": {"max_file_bytes": MAX_FILE_BYTES, "val_percent": VAL_PERCENT, "dedup": "exact, by content"},
    }
    if overlap:
        manifest["benchmark_overlap"] = benchmark_overlap(docs)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_split(corpus_dir: str | Path, split: str) -> list[Document]:
    path = Path(corpus_dir) / f"{split}.jsonl.gz"
    if not path.exists():
        raise QrobustError(f"{path} is missing: build the corpus with `qrobust zoo corpus --out {corpus_dir}`")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]
