import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("bergson")

from qrobust.attribution import (  # noqa: E402
    AttributionConfig, Document, GradientConfig, Query, analyse, attribute, bm25_scores, compare_attributions,
    load_corpus, stdlib_labels,
)
from qrobust.attribution.analysis import bin_shares, group_contrast, source_metrics  # noqa: E402
from qrobust.attribution.gradients import collect_features  # noqa: E402
from qrobust.cli import main  # noqa: E402
from qrobust.models import load_model  # noqa: E402

SMALL = AttributionConfig(limit=16, query_limit=3, top_k=5, gradients=GradientConfig(max_tokens=256,
                                                                                     normalizer_windows=8))


def quantized(base, method: str, bits: int):
    from qrobust.sweep import Job, SweepConfig, quantize_for

    config = SweepConfig(models=("m",), group_size=32, nsamples=2, seqlen=64)
    return quantize_for(Job("m", method, bits, 0), base, config, Path("."))[0]


@pytest.fixture(scope="module")
def builtin_runs(tmp_path_factory):
    """The shipped tiny-ar: full precision twice, RTN 8-bit and 2-bit, same corpus, queries and seeds."""
    root = tmp_path_factory.mktemp("attribution")
    base = load_model("tiny-ar")
    runs = {}
    for name, make in [("fp", lambda: copy.deepcopy(base)), ("fp_again", lambda: copy.deepcopy(base)),
                       ("rtn8", lambda: quantized(base, "rtn", 8)), ("rtn2", lambda: quantized(base, "rtn", 2))]:
        attribute(make(), name, SMALL, root / name, progress=False)
        runs[name] = root / name
    return runs


def test_same_model_twice_gives_identical_scores(builtin_runs):
    a = np.load(builtin_runs["fp"] / "scores.npy")
    b = np.load(builtin_runs["fp_again"] / "scores.npy")
    assert a.shape == (6, 16) and np.array_equal(a, b)
    assert np.all(np.abs(a) <= 1 + 1e-5) and a.std() > 0  # cosines, and not all alike


def test_eight_bit_keeps_the_ranking_and_two_bit_changes_it(builtin_runs):
    eight = compare_attributions(builtin_runs["fp"], builtin_runs["rtn8"])["metrics"]
    two = compare_attributions(builtin_runs["fp"], builtin_runs["rtn2"])["metrics"]
    assert eight["spearman"]["value"] > 0.95
    assert two["spearman"]["value"] < eight["spearman"]["value"] - 0.1
    assert eight["gradient_cosine"]["value"] > 0.95 > two["gradient_cosine"]["value"]
    assert (builtin_runs["rtn2"] / "compare-fp" / "compare.png").exists()


def test_run_writes_analyses_and_bm25(builtin_runs):
    run = builtin_runs["fp"]
    meta = json.loads((run / "attribution.json").read_text())
    assert meta["bytes_per_example"] == 28 * 16 * 16 * 4  # 28 layers, 16 × 16 projection, float32
    for sub in ("influence", "bm25"):
        top = pd.read_csv(run / sub / "top_k.csv")
        assert len(top) == 6 * 5 and {"topic", "kind"} <= set(top.columns)
        assert (run / sub / "bins.png").exists()
    assert meta["summary"]["influence"]["contrast"]["groups"] == ["humaneval", "mbpp"]


def test_diffusion_attribution_is_deterministic(tmp_path, tiny_dirs):
    texts = ["def f(x):\n    return x * 2\n" * 3, "import os\nprint(os.sep)\n" * 4]
    cfg = GradientConfig(projection_dim=8)
    feats = [collect_features(load_model(str(tiny_dirs["diffusion"])), texts, cfg, None, progress=False).values
             for _ in range(2)]
    assert np.array_equal(feats[0], feats[1])
    other_masks = collect_features(load_model(str(tiny_dirs["diffusion"])), texts,
                                   GradientConfig(projection_dim=8, mask_seed=5), None, progress=False).values
    assert not np.allclose(feats[0], other_masks)  # the fixed seeds are what makes runs agree


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_unprojected_feature_is_the_gradient_of_the_summed_loss(tiny_dirs, kind):
    """Windows are summed: a text longer than the window gets its whole-text loss gradient."""
    adapter = load_model(str(tiny_dirs[kind]))
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
    ids = adapter.tokenizer(text)["input_ids"]
    cfg = GradientConfig(projection_dim=0, window=len(ids), max_tokens=None)
    feature = collect_features(adapter, [text], cfg, None, progress=False).values[0]
    adapter.model.zero_grad(set_to_none=True)
    adapter.loss(torch.tensor([ids]), seed=cfg.mask_seed, reduction="sum").backward()
    names = sorted(adapter.linear_layer_names())
    grad = torch.cat([adapter.model.get_submodule(n).weight.grad.flatten() for n in names])
    grad = (grad / grad.norm()).numpy()
    assert np.allclose(feature, grad, atol=1e-5)


def test_bins_contrast_and_sources_on_a_known_corpus():
    docs = [Document(f"d{i}", "x", {"topic": t, "kind": "lib", "source": s})
            for i, (t, s) in enumerate([("a", "ft"), ("a", "pt"), ("b", "pt"), ("b", "pt")])]
    queries = [Query("q1", "g1", ""), Query("q2", "g1", ""), Query("q3", "g2", ""), Query("q4", "g2", "")]
    # g1 prefers topic a, g2 topic b; the top document is d0 (ft) for q1 only
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.7, 0.8, 0.1, 0.0], [0.0, 0.1, 0.9, 0.8], [0.1, 0.0, 0.8, 0.9]])
    shares = bin_shares(scores, docs, queries, 2, ["topic", "kind"])
    mean = shares.groupby(["group", "bin"]).share.mean()
    assert mean[("g1", "a | lib")] == 1.0 and mean[("g2", "b | lib")] == 1.0
    contrast = group_contrast(shares)
    assert contrast["bins"] == ["a | lib", "b | lib"] and contrast["interaction"] == pytest.approx(2.0)
    src = source_metrics(scores, docs)
    assert src["sources"]["ft"]["top1_share"] == 0.25 and src["sources"]["pt"]["top1_share"] == 0.75
    assert src["sources"]["ft"]["mean_max"] == pytest.approx((0.9 + 0.7 + 0.0 + 0.1) / 4)
    assert src["ratio"]["value"] == pytest.approx(src["sources"]["ft"]["mean_max"] / src["sources"]["pt"]["mean_max"])


def test_analyse_writes_tables(tmp_path):
    docs = [Document(str(i), "x", {"topic": "ab"[i >= 3], "kind": "k"}) for i in range(6)]
    queries = [Query("q", "g", "")]
    summary = analyse(np.arange(6, dtype=float)[None], docs, queries, 2, tmp_path, "t")
    assert summary["top_bins"][0]["bin"] == "b | k" and summary["top_bins"][0]["enrichment"] == pytest.approx(2.0)
    assert pd.read_csv(tmp_path / "top_k.csv", dtype={"doc": str})["doc"].tolist() == ["5", "4"]


def test_bm25_ranks_the_document_sharing_rare_terms_first():
    docs = ["def parse_header(line): return line.split(':')", "x = 1\ny = 2", "def parse_body(data): pass"]
    scores = bm25_scores(["parse_header returns the split line"], docs)
    assert scores[0].argmax() == 0 and scores[0, 1] == 0.0


def test_stdlib_labels():
    assert stdlib_labels("test/test_asyncio/test_tasks.py") == {"topic": "concurrency", "kind": "tests",
                                                                 "source": "stdlib"}
    assert stdlib_labels("json/decoder.py")["kind"] == "library"
    assert stdlib_labels("idlelib/editor.py") == {"topic": "gui", "kind": "apps and scripts", "source": "stdlib"}


def test_corpus_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(Exception, match="bad.jsonl:2 is not JSON"):
        load_corpus(str(bad))
    assert main(["attribute", "--model", "tiny-ar", "--corpus", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert main(["attribute", "--model", "tiny-ar", "--corpus", "nope", "--out", str(tmp_path / "o")]) == 2
    assert main(["attribute-compare", str(tmp_path), str(tmp_path)]) == 2


def test_jsonl_corpus_labels_and_mismatched_runs(tmp_path, tiny_dirs):
    corpus = tmp_path / "c.jsonl"
    rows = [{"id": f"d{i}", "text": f"def f{i}(x):\n    return x + {i}\n", "format": "fn", "topic": "math",
             "source": "ft" if i < 2 else "pt"} for i in range(5)]
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "q", "group": "g", "text": "def g(y):\n    return y + 1\n"}))
    args = ["attribute", "--model", str(tiny_dirs["ar"]), "--corpus", str(corpus), "--queries", str(queries),
            "--top-k", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "attribution.json").read_text())
    assert meta["summary"]["influence"]["bin_fields"] == ["topic", "format"]
    assert set(meta["summary"]["influence"]["sources"]["sources"]) == {"ft", "pt"}
    assert main([*args, "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "b")]) == 0
    assert main(["attribute-compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "gradient_cosine" in json.loads((tmp_path / "b" / "compare-a" / "compare.json").read_text())["metrics"]
    assert main([*args, "--projection-seed", "7", "--out", str(tmp_path / "seed7")]) == 0
    assert main(["attribute-compare", str(tmp_path / "a"), str(tmp_path / "seed7")]) == 0  # ranks still compare
    other = json.loads((tmp_path / "seed7" / "compare-a" / "compare.json").read_text())
    assert "gradient_cosine" not in other["metrics"] and "spearman" in other["metrics"]
    assert "projection_seed" in other["gradient_cosine_left_out"]  # features of another space: said, not dropped
    ckpt = tmp_path / "ckpt"  # the same RTN model written as a GPTQ checkpoint and loaded back
    assert main(["quantize", "--model", str(tiny_dirs["ar"]), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(ckpt)]) == 0
    assert main([*args, "--quantized", str(ckpt), "--out", str(tmp_path / "from-ckpt")]) == 0
    assert np.allclose(np.load(tmp_path / "from-ckpt" / "scores.npy"), np.load(tmp_path / "b" / "scores.npy"),
                       atol=1e-4)
    assert main([*args[:-2], "--top-k", "2", "--queries", "humaneval", "--query-limit", "1",
                 "--out", str(tmp_path / "c")]) == 0
    assert main(["attribute-compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2  # other queries


def test_validation_removes_the_top_bin_and_a_random_set_of_the_same_size():
    import random

    from qrobust.attribution.validate import random_removal, top_bin

    shares = pd.DataFrame({"query": ["q1", "q1", "q2", "q2", "q3", "q3"], "group": ["he", "he", "he", "he", "mb", "mb"],
                           "bin": ["a", "b", "a", "b", "a", "b"], "share": [0.2, 0.8, 0.4, 0.6, 1.0, 0.0]})
    assert top_bin(shares, "he") == ("b", pytest.approx(0.7)) and top_bin(shares, "mb")[0] == "a"
    counts = np.array([100, 50, 50, 200, 10, 40])
    chosen = random_removal(counts, 150, random.Random(0))
    assert counts[list(chosen)].sum() >= 150 and counts[list(chosen)].sum() - 150 < counts.max()
    assert chosen == random_removal(counts, 150, random.Random(0))  # a seeded draw


def test_validation_plans_shared_and_separate_top_bins_with_the_minimal_tests_first():
    from qrobust.attribution.validate import plan_variants

    counts = np.array([100, 50, 50, 200, 10, 40, 80, 70])
    shared = plan_variants({"fp": {0, 1}, "gptq4": {0, 1}}, counts, draws=3)
    assert [v.kind for v in shared] == ["full", "top bin", "random", "random", "random"]
    assert all(v.targets == ("fp", "gptq4") for v in shared)
    split = plan_variants({"fp": {0, 1}, "gptq4": {3}}, counts, draws=3)
    assert [(v.kind, v.targets) for v in split[:7]] == [
        ("full", ("fp", "gptq4")), ("top bin", ("fp",)), ("random", ("fp",)), ("random", ("fp",)),
        ("top bin", ("gptq4",)), ("random", ("gptq4",)), ("random", ("gptq4",))]
    assert len(split) == 9 and split[1].removed == {0, 1} and split[4].removed == {3}
    for v in split:  # each random draw matches its own bin's tokens
        if v.kind == "random":
            target = 150 if v.targets == ("fp",) else 200
            assert target <= counts[list(v.removed)].sum() < target + counts.max()


def test_validation_summary_compares_the_top_bin_rise_with_the_random_draws():
    from qrobust.attribution.validate import plan_variants, summarize

    counts = np.array([100, 50, 50, 200, 10, 40, 80, 70])
    variants = plan_variants({"fp": {0, 1}}, counts, draws=2)
    base = np.array([1.0, 2.0, 3.0, 4.0])
    rises = {"full": 0.0, "top bin": 0.5}
    random_rises = iter([0.1, 0.2])
    done = {}
    for v in variants:
        shift = rises[v.kind] if v.kind in rises else next(random_rises)
        done[v.name] = {"per_query": {"fp:humaneval": (base + shift).tolist()}}
    summary = summarize(variants, dict(list(done.items())[:2]), {"fp": {"top_bin": "a"}}, "humaneval")
    assert summary["fp"]["rise_without_top_bin"] == pytest.approx(0.5) and "passed" not in summary["fp"]
    fp = summarize(variants, done, {"fp": {"top_bin": "a"}}, "humaneval")["fp"]
    assert fp["random_rises"] == pytest.approx([0.1, 0.2]) and fp["passed"] is True
    assert fp["rise_without_top_bin_ci"] == pytest.approx([0.5, 0.5])
    assert fp["z_over_random"] == pytest.approx((0.5 - 0.15) / np.std([0.1, 0.2], ddof=1))


def test_batched_ar_features_equal_one_window_at_a_time(tiny_dirs):
    adapter = load_model(str(tiny_dirs["ar"]))
    texts = ["def f(x):\n    return x * 2\n", "import os\nprint(os.sep)\n" * 5, "class A:\n    pass\n" * 3]
    feats = {b: collect_features(adapter, texts, GradientConfig(projection_dim=8, window=24, batch_size=b), None,
                                 progress=False).values for b in (1, 4)}
    assert np.allclose(feats[1], feats[4], atol=1e-4)


def test_validation_can_test_the_quantized_target_alone():
    from qrobust.attribution.validate import parse_args, target_names
    from qrobust.errors import QrobustError

    assert target_names(4, only_quantized=False) == ["fp", "gptq4"]
    assert target_names(0, only_quantized=False) == ["fp"]
    assert target_names(4, only_quantized=True) == ["gptq4"]
    with pytest.raises(QrobustError, match="--gptq-bits"):
        parse_args(["--only-quantized", "--gptq-bits", "0"])
