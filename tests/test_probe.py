import json
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from qrobust.cli import main
from qrobust.probe import (
    FULL, QUANTIZED, QUESTIONS, ProbeConfig, Target, balanced_sets, full_target, parse_bits, parse_state, run_probe,
)

FP32 = full_target(torch.float32)


@pytest.mark.parametrize("text,state", [
    (" FULL", FULL), (" quantized.", QUANTIZED), (" I think it is quantised", QUANTIZED),
    (" Full precision, not quantized", FULL), (" fully sure", None), ("", None), (" ???", None),
])
def test_parse_state(text, state):
    assert parse_state(text) == state


@pytest.mark.parametrize("text,bits", [
    (" 4", 4), (" 4-bit", 4), (" fp16", 16), (" int8 weights", 8), (" 32", None), (" 128", None), (" two", None),
])
def test_parse_bits(text, bits):
    assert parse_bits(text) == bits


def _rows(targets, items=3):
    return pd.DataFrame([{"target": t.label, "state": t.state, "bits": t.bits, "task_id": f"p/{i}", "question": "state",
                          "shots": 0, "truth": t.state, "parsed": t.state, "correct": True, "task_correct": False}
                         for t in targets for i in range(items)])


def test_balanced_sets_have_equal_classes():
    targets = [FP32, Target("gptq-2", QUANTIZED, 2), Target("gptq-4", QUANTIZED, 4)]
    sets = balanced_sets(_rows(targets))
    assert set(sets) == {"gptq-2", "gptq-4", "all"}
    for name, df in sets.items():
        counts = df.state.value_counts()
        assert counts[FULL] == counts[QUANTIZED], name
    assert len(sets["all"]) == 12 and (sets["all"].target == "fp32").sum() == 6  # full rows once per target


@dataclass
class _Gen:
    text: str
    num_tokens: int = 1


class ScriptedModel:
    """Answers GSM8K with 42 and the probe questions by a fixed policy."""

    device = torch.device("cpu")

    def __init__(self, target: Target, policy: str):
        self.target, self.policy = target, policy

    def generate(self, prompts, max_new_tokens=8, stop=(), temperature=0.0, top_p=1.0, seed=0, batch_size=8):
        return [_Gen(self.answer(p)) for p in prompts]

    def answer(self, prompt: str) -> str:
        if not prompt.endswith("Answer:") or prompt.startswith("Question:") and prompt.count("Answer") == 1:
            return " The total is 42."
        if self.policy == "malformed":
            return " hmm?"
        if prompt.endswith(QUESTIONS["bits"] + "\nAnswer:"):
            return f" {self.target.bits}" if self.policy == "oracle" else " 16"
        return f" {self.target.state}" if self.policy == "oracle" else " FULL"


def _gsm8k(tmp_path, n=6):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + {42 - i}?" if i % 2 else f"Q{i}?",
                                        "answer": f"... #### {42 if i % 2 else 7}"}) + "\n" for i in range(n)))
    return str(path)


@pytest.mark.parametrize("policy,accuracy,parse_fail", [("oracle", 1.0, 0.0), ("always-full", 0.5, 0.0),
                                                        ("malformed", 0.0, 1.0)])
def test_scripted_models_score_as_expected(tmp_path, policy, accuracy, parse_fail):
    targets = [FP32, Target("gptq-2", QUANTIZED, 2), Target("gptq-4", QUANTIZED, 4)]
    config = ProbeConfig(tasks=("gsm8k",), shots=(0, 2), gsm8k_path=_gsm8k(tmp_path))
    pairs = [(t, lambda t=t: ScriptedModel(t, policy)) for t in targets]
    run_probe(None, pairs, config, tmp_path / "probe", progress=False)
    scores = pd.read_csv(tmp_path / "probe" / "summary.csv")
    overall = scores[scores.set == "balanced:all"]
    assert len(overall) == 4  # two questions x two shot counts
    assert overall.accuracy.tolist() == pytest.approx([accuracy] * 4)
    assert overall.parse_failure_rate.tolist() == pytest.approx([parse_fail] * 4)
    assert (overall.majority_baseline == 0.5).all() and (overall.always_full_baseline == 0.5).all()
    assert overall.task_accuracy.tolist() == pytest.approx([0.5] * 4)  # 42 is right for half the problems
    if policy == "oracle":
        assert (overall.ci_low == 1.0).all()
    rows = [json.loads(x) for x in (tmp_path / "probe" / "probe" / "gptq-2.jsonl").read_text().splitlines()]
    two_shot = [r for r in rows if r["shots"] == 2]
    assert len(rows) == 6 * 2 * 2 and all(r["truth"] in (QUANTIZED, 2) for r in rows) and two_shot
    assert (tmp_path / "probe" / "probe.md").exists() and (tmp_path / "probe" / "probe.png").exists()


def test_shots_are_labelled_with_the_producers_truth(tmp_path):
    targets = [FP32, Target("rtn-3", QUANTIZED, 3)]
    seen = []

    class Recorder(ScriptedModel):
        def generate(self, prompts, *a, **k):
            seen.extend(prompts)
            return super().generate(prompts, *a, **k)

    config = ProbeConfig(tasks=("gsm8k",), shots=(2,), questions=("state",), gsm8k_path=_gsm8k(tmp_path, 4))
    run_probe(None, [(t, lambda t=t: Recorder(t, "oracle")) for t in targets], config, tmp_path / "p", progress=False)
    probes = [p for p in seen if p.endswith(QUESTIONS["state"] + "\nAnswer:")]
    assert probes and all(p.count(f"Answer: {FULL}\n") == 1 and p.count(f"Answer: {QUANTIZED}\n") == 1 for p in probes)


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_probe_runs_offline_on_a_tiny_model_and_resumes(tmp_path, tiny_dirs, kind):
    out = tmp_path / "probe"
    argv = ["probe", "--model", str(tiny_dirs[kind]), "--method", "rtn", "--bits", "4", "--tasks", "humaneval",
            "--limit", "2", "--shots", "0,1", "--max-new-tokens", "8", "--group-size", "32", "--out", str(out)]
    assert main(argv) == 0
    scores = pd.read_csv(out / "summary.csv")
    assert set(scores.question) == {"state", "bits"} and set(scores.shots) == {0, 1}
    assert {"balanced:rtn-4", "balanced:all", "target:fp32", "target:rtn-4"} <= set(scores.set)
    first = (out / "probe" / "rtn-4.jsonl").read_text()
    assert main(argv) == 0 and (out / "probe" / "rtn-4.jsonl").read_text() == first  # resumed, not redone


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "gsm8k", "--gsm8k", "/nonexistent.jsonl"], "does not exist"),
    (["--tasks", "hellaswag"], "unknown probe task"),
    (["--shots", "x"], "bad --shots"),
    ([], "nothing to compare with"),
])
def test_probe_bad_input_fails_clearly(tmp_path, tiny_dirs, capsys, extra, message):
    code = main(["probe", "--model", str(tiny_dirs["ar"]), "--out", str(tmp_path / "p"), *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_sweep_with_probe_reports_it(tmp_path, tiny_dirs):
    out = tmp_path / "sweep"
    argv = ["sweep", "--models", str(tiny_dirs["ar"]), "--bits", "4", "--methods", "rtn", "--benchmarks", "humaneval",
            "--seeds", "0", "--limit", "2", "--group-size", "32", "--max-new-tokens", "4", "--probe", "--out", str(out)]
    assert main(argv) == 0
    summaries = list((out / "probe").glob("*/summary.csv"))
    assert len(summaries) == 1 and "balanced:rtn-4" in set(pd.read_csv(summaries[0]).set)
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Probe" in text and "probe.png" in text


def test_last_model_of_the_answer_pass_is_not_built_again(tmp_path):
    built = []
    targets = [FP32, Target("gptq-2", QUANTIZED, 2), Target("gptq-4", QUANTIZED, 4)]

    def factory(t):
        def make():
            built.append(t.label)
            return ScriptedModel(t, "oracle")
        return make

    config = ProbeConfig(tasks=("gsm8k",), shots=(0,), questions=("state",), gsm8k_path=_gsm8k(tmp_path, 2))
    run_probe(None, [(t, factory(t)) for t in targets], config, tmp_path / "p", progress=False)
    assert built == ["fp32", "gptq-2", "gptq-4", "gptq-2", "fp32"]


def test_a_probe_resumes_only_with_its_own_settings(tmp_path):
    from dataclasses import asdict

    from qrobust.errors import QrobustError
    from qrobust.probe import ProbeConfig
    from qrobust.resume import check_same_settings

    (tmp_path / "probe.json").write_text(json.dumps({"config": asdict(ProbeConfig(limit=2))}))
    check_same_settings(tmp_path / "probe.json", asdict(ProbeConfig(limit=2, workers=1)), frozenset({"workers"}))
    with pytest.raises(QrobustError, match=r"holds a probe made with other settings \(limit 2 -> 3\)"):
        check_same_settings(tmp_path / "probe.json", asdict(ProbeConfig(limit=3)), frozenset({"workers"}), "probe")
