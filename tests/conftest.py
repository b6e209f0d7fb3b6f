import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPUs with native bfloat16 default to it (qrobust.precision); the numerical checks here are
# written for float32 on every machine
os.environ.setdefault("QROBUST_CPU_DTYPE", "float32")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under Triton's interpreter; this must be set before
    # Triton is first imported. Production code only picks the kernels on CUDA.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from qrobust.calib import stdlib_files  # noqa: E402
from qrobust.models.tiny import build_tiny, train_tokenizer  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def code_texts():
    files = stdlib_files()[:40]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.fixture(scope="session")
def tokenizer(code_texts):
    return train_tokenizer(code_texts, vocab_size=384)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """Saved tiny models of both kinds: {'ar': path, 'diffusion': path}."""
    root = tmp_path_factory.mktemp("models")
    return {kind: build_tiny(kind, tokenizer, root / kind, seed=1) for kind in ("ar", "diffusion")}


@pytest.fixture(scope="session")
def calib(tokenizer, code_texts):
    ids = tokenizer("\n".join(code_texts[:20]), return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - 64, (16,), generator=g)
    return torch.stack([ids[s:s + 64] for s in starts.tolist()])


@pytest.fixture
def forced_fusion(monkeypatch):
    """ModelAdapter.for_generation fusing on CPU too (it fuses on CUDA alone): the list it fills with
    each call's count of fused layer groups."""
    from qrobust.models.adapters import ModelAdapter

    fused, original = [], ModelAdapter.for_generation
    monkeypatch.setattr(ModelAdapter, "for_generation", lambda self, fuse=None: fused.append(original(self, True)))
    return fused
