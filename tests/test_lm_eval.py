"""The lm-evaluation-harness backend: QrobustLM on both kinds, the diffusion estimator, the code tasks."""
import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from qrobust.cli import main  # noqa: E402
from qrobust.lm_eval import TASKS_DIR, QrobustLM, qrobust_task_names, task_manager  # noqa: E402
from qrobust.lm_eval.likelihood import ESTIMATORS, DiffusionScorer  # noqa: E402
from qrobust.lm_eval.task_data import code_pass_at_1  # noqa: E402
from qrobust.models import MODELS, load_model  # noqa: E402

JSON_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def _request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture
def json_tasks(tmp_path):
    docs = [{"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "gold": 0, "answer": "a"},
            {"question": "import os\nimport", "choices": [" sys", " (("], "gold": 0, "answer": "sys"}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_choice.yaml").write_text(JSON_TASK.format(data=data))
    (folder / "tiny_gen.yaml").write_text(GEN_TASK.format(data=data))
    return folder


@pytest.mark.parametrize("kind,quantized", [("ar", False), ("diffusion", True)])
def test_json_task_runs_end_to_end_from_the_cli(tmp_path, tiny_dirs, json_tasks, kind, quantized, capsys):
    """Both kinds through `qrobust lm-eval` on a local-JSON task; the diffusion one from a checkpoint."""
    model = str(tiny_dirs[kind])
    target = []
    if quantized:
        assert main(["quantize", "--model", model, "--method", "rtn", "--bits", "4", "--group-size", "32",
                     "--out", str(tmp_path / "q")]) == 0
        target = ["--quantized", str(tmp_path / "q")]
    out = tmp_path / "out"
    assert main(["lm-eval", "--model", model, *target, "--tasks", "tiny_choice,tiny_gen", "--include-path",
                 str(json_tasks), "--mc-samples", "4", "--bootstrap-iters", "0", "--out", str(out)]) == 0
    import pandas as pd

    rows = pd.read_csv(out / "results.csv")
    assert set(rows.benchmark) == {"tiny_choice", "tiny_gen"}
    assert set(rows.kind) == {kind}
    assert (rows.method.iloc[0], rows.bits.iloc[0]) == (("rtn", 4) if quantized else ("fp32", 32))
    assert rows[rows.metric == "acc"].value.between(0, 1).all()
    lm_eval_json = json.loads(next(out.glob("*/results_*.json")).read_text())
    assert set(lm_eval_json["results"]) == {"tiny_choice", "tiny_gen"}
    samples = [json.loads(x) for x in next(out.glob("*/samples_tiny_choice_*.jsonl")).read_text().splitlines()]
    scores = [r[0][0] for s in samples for r in s["resps"]]
    assert len(scores) == 4 and all(float(v) < 0 for v in scores)


def test_ar_loglikelihood_equals_lm_evals_hf_model():
    from lm_eval.models.huggingface import HFLM

    ours = QrobustLM(model="tiny-ar", batch_size=3)
    theirs = HFLM(pretrained=MODELS["tiny-ar"].source, dtype="float32", device="cpu", batch_size=3)
    pairs = [("def add(a, b):\n    return", " a + b"), ("import", " os\n"), ("", "class Foo:\n    pass"),
             ("for i in range(10):\n", "    print(i)"), ("x = ", "1")]
    requests = [_request("loglikelihood", *p) for p in pairs]
    a, b = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert [g for _, g in a] == [g for _, g in b]
    assert [s for s, _ in a] == pytest.approx([s for s, _ in b], rel=1e-5, abs=1e-4)
    text = [_request("loglikelihood_rolling", "def f(x):\n    return x * 2\n" * 60)]  # > 512 tokens: windows
    assert ours.loglikelihood_rolling(text) == pytest.approx(theirs.loglikelihood_rolling(text), rel=1e-5)


def test_diffusion_estimates_are_seeded_and_converge(tiny_dirs):
    adapter = load_model(str(tiny_dirs["diffusion"]))
    ids = adapter.tokenizer.encode("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n")
    context, continuation = ids[:6], ids[6:]

    def estimate(estimator, samples, seed):
        scorer = DiffusionScorer(adapter.logits, adapter.mask_token_id, adapter.shift_logits, estimator, samples,
                                 batch_size=96, seed=seed)
        return scorer.score(context, continuation, adapter.device, greedy=False)[0]

    for estimator in ESTIMATORS:
        assert estimate(estimator, 8, 3) == estimate(estimator, 8, 3)
        few = torch.tensor([estimate(estimator, 2, s) for s in range(12)])
        many = torch.tensor([estimate(estimator, 96, s) for s in range(12)])
        assert (few < 0).all() and (many < 0).all()
        assert many.std() < few.std() / 2.5, estimator  # sqrt(96 / 2) ≈ 7 in expectation
        # Both sample sizes estimate the same ELBO.
        assert abs(many.mean() - few.mean()) < 3 * few.std() / 12 ** 0.5, estimator


class _ReferenceModel(LM):
    """Answers every code task with the problem's reference solution."""

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for r in requests:
            doc = r.doc
            if doc["benchmark"] == "humaneval":
                out.append(doc["reference"][len(doc["text"].rstrip()):])
            else:
                out.append(doc["reference"])
        return out

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_sandboxed_code_tasks_pass_reference_solutions():
    code_tasks = ["qrobust_humaneval", "qrobust_humaneval_instruct", "qrobust_mbpp", "qrobust_mbpp_instruct"]
    assert set(code_tasks) < set(qrobust_task_names())
    results = lm_eval.simple_evaluate(model=_ReferenceModel(), tasks=code_tasks, limit=3, bootstrap_iters=0,
                                      task_manager=task_manager(include_defaults=False),
                                      confirm_run_unsafe_code=True, log_samples=True)
    assert {t: r["pass@1,none"] for t, r in results["results"].items()} == {t: 1.0 for t in code_tasks}
    doc = results["samples"]["qrobust_mbpp"][0]["doc"]
    assert code_pass_at_1(doc, ["def nothing():\n    pass\n"]) == {"pass@1": 0.0}


def test_code_task_stops_are_the_harness_stops():
    import yaml

    from harness.tasks import get_task

    for path in TASKS_DIR.glob("qrobust_*.yaml"):
        text = path.read_text()
        if "code_docs" not in text:
            continue
        config = yaml.safe_load("\n".join(line for line in text.splitlines() if "!function" not in line))
        kwargs = config["dataset_kwargs"]
        stops = get_task(kwargs["benchmark"]).stop(kwargs["style"])
        assert config["generation_kwargs"]["until"] == stops, path.name


def test_report_shows_lm_eval_runs(tmp_path):
    import pandas as pd

    from qrobust.report import lm_eval_section

    assert lm_eval_section(tmp_path) == []
    for name, bits, value in (("fp16", 16, 0.5), ("gptq-4", 4, 0.25)):
        (tmp_path / "lm-eval" / name).mkdir(parents=True)
        pd.DataFrame([{"model": "m", "method": name.split("-")[0], "bits": bits, "benchmark": "qrobust_mbpp_choice",
                       "metric": "acc", "value": value}]).to_csv(tmp_path / "lm-eval" / name / "results.csv")
    text = "\n".join(lm_eval_section(tmp_path))
    assert "qrobust_mbpp_choice acc" in text and "0.2500" in text and "0.5000" in text


def test_bad_task_fails_clearly(tiny_dirs, tmp_path, capsys):
    assert main(["lm-eval", "--model", str(tiny_dirs["ar"]), "--tasks", "qrobust_nope",
                 "--out", str(tmp_path)]) == 2
    assert "unknown lm-eval task(s) qrobust_nope" in capsys.readouterr().err


def test_launcher_adds_qrobust_tasks(monkeypatch):
    import sys

    import lm_eval.__main__ as lm_main

    from qrobust.lm_eval.__main__ import main as launcher

    seen = []
    monkeypatch.setattr(lm_main, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["x", "run", "--model", "qrobust", "--tasks", "qrobust_mbpp"])
    launcher()
    assert seen[0][-2:] == ["--include_path", str(Path(TASKS_DIR))]
    from lm_eval.api.registry import get_model

    assert get_model("qrobust") is QrobustLM


def test_cuda_default_of_lm_evals_cli_falls_back_to_cpu():
    from qrobust.lm_eval.model import _device

    assert _device("cuda") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _device("cpu") == "cpu"


def test_results_csv_keeps_earlier_runs_rows(tmp_path):
    """A second lm-eval run into the same OUT adds its rows; only a row of the same config, task and
    metric is replaced (lm-eval's own files are timestamped, so nothing else is lost either)."""
    import pandas as pd

    from qrobust.lm_eval.run import merge_rows

    def rows(config, task, value):
        return pd.DataFrame([{"config_id": config, "benchmark": task, "metric": m, "value": value}
                             for m in ("acc", "acc_norm")])

    path = tmp_path / "results.csv"
    merge_rows(path, rows("tiny-ar__fp32__32__s0", "task_a", 0.1))
    merge_rows(path, rows("tiny-ar__fp32__32__s0", "task_b", 0.2))
    merge_rows(path, rows("tiny-ar__rtn__4__s0", "task_a", 0.3))
    merge_rows(path, rows("tiny-ar__fp32__32__s0", "task_a", 0.4))  # a rerun replaces its own rows
    table = pd.read_csv(path).set_index(["config_id", "benchmark", "metric"]).value
    assert len(table) == 6
    assert table["tiny-ar__fp32__32__s0", "task_a"].tolist() == [0.4, 0.4]
    assert table["tiny-ar__fp32__32__s0", "task_b"].tolist() == [0.2, 0.2]
    assert table["tiny-ar__rtn__4__s0", "task_a"].tolist() == [0.3, 0.3]


def test_every_run_into_an_out_stays_described(tmp_path):
    """qrobust_lm_eval.json lists each run's model and settings, the first run's too."""
    from qrobust.lm_eval.run import record_run

    path = tmp_path / "qrobust_lm_eval.json"
    record_run(path, {"model": "tiny-ar", "config": {"tasks": ("task_a",)}})
    record_run(path, {"model": "tiny-dllm", "config": {"tasks": ("task_b",)}})
    runs = json.loads(path.read_text())["runs"]
    assert [(r["model"], r["config"]["tasks"]) for r in runs] == [("tiny-ar", ["task_a"]), ("tiny-dllm", ["task_b"])]

    single = tmp_path / "single.json"  # one run's record alone, as written before the list
    single.write_text(json.dumps({"model": "tiny-ar", "config": {}}))
    record_run(single, {"model": "tiny-dllm", "config": {}})
    assert [r["model"] for r in json.loads(single.read_text())["runs"]] == ["tiny-ar", "tiny-dllm"]
