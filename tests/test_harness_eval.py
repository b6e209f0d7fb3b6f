import json

import pytest

from harness import EvalConfig, evaluate, execute_samples, get_task, score
from harness.sanitize import sanitize
from harness.tasks import MBPP
from qrobust.cli import main


def test_reference_solutions_all_pass():
    """The users' soundness check: 164/164 HumanEval and 500/500 MBPP test through the pipeline."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        # 30 s, not 10: MBPP/123's reference (divisor sums up to 9999) takes 10-15 s on a loaded 2-core machine
        total = evaluate(None, EvalConfig(workers=2, timeout=30), out, "reference", progress=False)
    he, mbpp = total["benchmarks"]["humaneval"], total["benchmarks"]["mbpp"]
    assert (he["problems"], he["statuses"]) == (164, {"passed": 164})
    assert (mbpp["problems"], mbpp["statuses"]) == (500, {"passed": 500})
    assert he["pass@1"]["value"] == 1.0 == mbpp["pass@1"]["value"]
    # every verdict is decided apart from the solution's process, but MBPP/367's (its tests
    # build a tree from the solution's own Node class)
    assert he["isolation"] == {"isolated": 164} and mbpp["isolation"] == {"isolated": 499, "in-process": 1}


def test_mbpp_split_and_prompts():
    task = MBPP()
    problems = task.problems()
    assert [problems[0].task_id, problems[-1].task_id] == ["mbpp/11", "mbpp/510"]
    assert all(p.entry_point and f"def {p.entry_point}" in p.reference for p in problems)
    three = task.prompt(problems[0], "3shot")
    assert three.count("[BEGIN]") == 4 and three.endswith("[BEGIN]\n") and "remove_Occ" in three
    zero = task.prompt(problems[0], "zeroshot")
    assert zero.startswith('"""\n') and problems[0].examples[0] in zero
    chat = task.prompt(problems[0], "instruct", chat=lambda m, pre: f"<user>{m}<assistant>{pre}")
    assert chat.startswith("<user>") and chat.endswith("```python\n")


def test_sanitizer_keeps_what_the_entry_point_needs():
    raw = ("Sure!\n```python\nimport math\nK = 2\ndef helper(x):\n    return x * K\n"
           "def f(a):\n    return helper(a) + math.pi\nprint(f(2))\nassert f(1)\ndef unused():\n    pass\n```\nDone")
    clean = sanitize(raw, "f")
    assert "def f" in clean and "def helper" in clean and "K = 2" in clean and "import math" in clean
    assert "print(" not in clean and "unused" not in clean and "assert" not in clean
    assert sanitize("def f(x):\n    return x\n  broken(", "f") == "def f(x):\n    return x\n"


def test_execute_scores_humaneval_style_samples(tmp_path, capsys):
    task = get_task("humaneval")
    problems = task.problems(limit=3)
    samples = []
    for p in problems:
        body = p.reference[len(p.text):]
        samples += [{"task_id": p.task_id, "completion": body},
                    {"task_id": p.task_id, "completion": "    import sys\n    sys.exit(0)\n"}]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    assert main(["execute", str(path), "--benchmark", "humaneval"]) == 0
    results = [json.loads(line) for line in (tmp_path / "samples_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False] * 3
    summary = score(results)
    assert summary["pass@1"]["value"] == pytest.approx(0.5)


def test_execute_rejects_unknown_task_ids(capsys, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    assert main(["execute", str(path), "--benchmark", "humaneval"]) == 2
    assert "not in humaneval" in capsys.readouterr().err


def test_mbpp_setup_code_follows_the_solution():
    task = MBPP()
    p = next(p for p in task.problems() if p.task_id == "mbpp/367")
    program = task.program(p, p.reference)
    assert program.index("class Node") < program.index("root = Node(1)")
    res = execute_samples([{"task_id": p.task_id, "solution": sanitize(p.reference, p.entry_point,
                                                                         also_needed=frozenset({"Node"}))}],
                          task, [p], progress=False)
    assert res[0]["passed"] and res[0]["isolation"] == "in-process" and "Node" in res[0]["isolation_reason"]


def test_compare_two_runs(tmp_path, capsys):
    for run, passed in (("a", [True, True, True, False]), ("b", [False, False, True, False])):
        d = tmp_path / run / "mbpp"
        d.mkdir(parents=True)
        rows = [{"task_id": f"mbpp/{11 + i}", "sample_idx": 0, "passed": p, "status": "passed" if p else "failed"}
                for i, p in enumerate(passed)]
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from harness import compare_runs

    result = compare_runs(tmp_path / "a", tmp_path / "b")["mbpp"]
    assert result["problems"] == 4 and result["diff_value"] == pytest.approx(-0.5)
    assert (result["only_a"], result["only_b"]) == (2, 0) and result["p_value"] == pytest.approx(0.5)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "mbpp" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path)]) == 2


def test_a_run_directory_resumes_only_the_run_that_made_it(tmp_path):
    """Samples are resumed from an output folder only for the model and generation settings that
    made them; execution settings may change."""
    from harness.errors import HarnessError
    from harness.evaluate import claim_run_dir

    config = EvalConfig(limit=2, max_new_tokens=16)
    claim_run_dir(tmp_path, "tiny-ar", config)
    claim_run_dir(tmp_path, "tiny-ar", EvalConfig(limit=2, max_new_tokens=16, workers=1, timeout=3.0))
    with pytest.raises(HarnessError, match="another model 'tiny-ar'"):
        claim_run_dir(tmp_path, "tiny-dllm", config)
    with pytest.raises(HarnessError, match="another max_new_tokens"):
        claim_run_dir(tmp_path, "tiny-ar", EvalConfig(limit=2, max_new_tokens=32))
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(HarnessError, match="is damaged"):
        claim_run_dir(tmp_path, "tiny-ar", config)
