import gzip
import json
from pathlib import Path

import pytest
import torch

from qrobust.cli import main
from qrobust.errors import QrobustError
from qrobust.models import MODELS, load_model
from qrobust.zoo.card import completes_to_python, function_headers, sample_loss
from qrobust.zoo.corpus import Document, benchmark_overlap, build_corpus, read_split
from qrobust.zoo.train import ZooConfig, init_weights, model_config, train_zoo
from qrobust.models.transformer import TransformerLM


@pytest.fixture(scope="module")
def builtin():
    return {name: load_model(name) for name in ("tiny-ar", "tiny-dllm")}


def test_builtin_models_are_listed(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-ar" in out and "tiny-dllm" in out and {"tiny-ar", "tiny-dllm"} <= set(MODELS)


def test_builtin_models_load_offline_and_generate(builtin):
    ar, dllm = builtin["tiny-ar"], builtin["tiny-dllm"]
    assert ar.kind == "ar" and dllm.kind == "diffusion"
    for adapter in (ar, dllm):
        gen = adapter.generate(["def add(a, b):\n    "], max_new_tokens=16)[0]
        assert gen.num_tokens > 0 and isinstance(gen.text, str)
    assert ar.model.config.hidden_size == dllm.model.config.hidden_size  # the same architecture


@pytest.mark.parametrize("name", ["tiny-ar", "tiny-dllm"])
def test_builtin_loss_matches_model_card(builtin, name):
    adapter = builtin[name]
    card = json.loads((Path(MODELS[name].source) / "card.json").read_text())
    expected = card["quality"]["val_sample_loss"]
    cfg = card["config"]
    got = sample_loss(adapter, cfg["seq_len"], cfg["elbo_samples"], cfg["seed"])
    assert got == pytest.approx(expected, rel=0.01)
    assert card["val_loss"] < card["unigram_val_nll"] - 2.0  # far below the unigram baseline


def test_corpus_is_deduplicated_split_and_hashed(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    for i in range(40):
        (root / "pkg" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (root / "dup.py").write_text("def f0(x):\n    return x + 0\n")
    (root / "bad.py").write_bytes(b"\xff\xfe not utf-8")
    m1 = build_corpus(tmp_path / "c1", root=root, overlap=False)
    m2 = build_corpus(tmp_path / "c2", root=root, overlap=False)
    assert m1["file_list_sha256"] == m2["file_list_sha256"]
    assert m1["files"]["train"] + m1["files"]["val"] == 40  # one duplicate, one undecodable
    train, val = read_split(tmp_path / "c1", "train"), read_split(tmp_path / "c1", "val")
    assert not {d.path for d in train} & {d.path for d in val}


def test_overlap_detects_a_copied_solution():
    from harness.tasks import MBPP

    p = MBPP().problems(limit=1)[0]
    docs = [Document("copied.py", "# copied\n" + p.reference), Document("other.py", "x = 1\n")]
    report = benchmark_overlap(docs, ns=(10,))
    assert p.task_id in report["mbpp"]["10"]["examples"]


def test_both_kinds_start_from_identical_weights(tokenizer):
    cfg = ZooConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=32)
    a, d = (TransformerLM(model_config(cfg, tokenizer, causal=c)) for c in (True, False))
    init_weights(a, 0)
    init_weights(d, 0)
    for (name, x), (_, y) in zip(a.state_dict().items(), d.state_dict().items()):
        assert torch.equal(x, y), name


def test_training_writes_both_models_with_cards(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20 for i in range(30)]
    for split, rows in (("train", texts[:25]), ("val", texts[25:])):
        with gzip.open(corpus / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"path": f"{split}{i}.py", "text": t}) + "\n" for i, t in enumerate(rows))
    (corpus / "manifest.json").write_text(json.dumps({"source": "test", "python_version": "x",
                                                      "file_list_sha256": "0", "files": {"train": 25, "val": 5}}))
    cfg = ZooConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=32, seq_len=32, batch_size=4, steps=6, warmup=2, eval_windows=4,
                    elbo_samples=2, log_every=3)
    torch.use_deterministic_algorithms(False)  # torch's default, which training must leave as it was
    written = train_zoo(corpus, tmp_path / "zoo", cfg, device="cpu", progress=False)
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
    for kind, path in written.items():
        card = json.loads((path / "card.json").read_text())
        assert (card["kind"] == kind and card["val_loss"] > 0
                and len((path / "train_log.csv").read_text().splitlines()) == 3)
        assert load_model(str(path)).kind == kind
    cards = {kind: (path / "card.json").read_text() for kind, path in written.items()}
    with pytest.raises(QrobustError, match="already holds a trained model.*--overwrite"):
        train_zoo(corpus, tmp_path / "zoo", cfg, device="cpu", kinds=("diffusion",), progress=False)
    assert cards == {kind: (path / "card.json").read_text() for kind, path in written.items()}


def test_parse_check_needs_a_written_body():
    docs = [Document("m.py", 'def f(x):\n    """Double."""\n    return 2 * x\n')]
    header = function_headers(docs, 5)[0]
    assert header.endswith('"""Double."""')  # no trailing newline: the model writes it with the indentation
    assert completes_to_python(header, "\n    return x\nprint(1)")
    assert not completes_to_python(header, "")
    assert not completes_to_python(header, "\n    return (\nprint(1)")
    # cut by the token budget: only the complete lines are judged
    assert completes_to_python(header, "\n    y = x\n    return (")
    assert not completes_to_python(header, "\n    return (")
