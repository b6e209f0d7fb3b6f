"""Turn raw model output into a clean solution module, separately from running it.

1. cut at the task's stop sequences; 2. take the code out of a Markdown fence if there is
one; 3. keep the longest prefix that parses; 4. keep imports and the definitions the entry
point needs (transitively), dropping stray top-level statements such as prints or asserts.
"""
from __future__ import annotations

import ast
import re
import warnings
from typing import Sequence

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to the first of the stop sequences in it (all of it if none is)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def strip_fences(text: str) -> str:
    blocks = _FENCE.findall(text)
    return "\n".join(blocks) if blocks else text


def _parse(code: str) -> ast.Module:
    with warnings.catch_warnings():  # invalid escape sequences in model or reference code
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
        return ast.parse(code)


def longest_parsable_prefix(code: str) -> str:
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:end])
        try:
            _parse(candidate)
            return candidate
        except SyntaxError:
            continue
    return ""


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def keep_needed_definitions(code: str, entry_point: str | None, also_needed: frozenset[str] = frozenset()) -> str:
    """Imports plus the definitions reachable from entry_point and from names the tests use
    (all definitions if the entry point is absent)."""
    tree = _parse(code)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    defs = [n for n in tree.body if _defined_names(n)]
    by_name: dict[str, list[ast.stmt]] = {}
    for node in defs:
        for name in _defined_names(node):
            by_name.setdefault(name, []).append(node)
    if entry_point and entry_point in by_name:
        keep, todo = set(), [entry_point, *(n for n in also_needed if n in by_name)]
        while todo:
            name = todo.pop()
            for node in by_name.get(name, []):
                if id(node) in keep:
                    continue
                keep.add(id(node))
                todo.extend(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in by_name)
                todo.extend(n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr in by_name)
        kept_defs = [n for n in defs if id(n) in keep]
    else:
        kept_defs = defs
    body = sorted(imports + kept_defs, key=lambda n: n.lineno)
    lines = code.splitlines()
    return "\n".join("\n".join(lines[_start(n) - 1:n.end_lineno]) for n in body) + "\n"


def _start(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators])


def names_used(code: str) -> frozenset[str]:
    """Identifiers a piece of test code refers to."""
    return frozenset(re.findall(r"[A-Za-z_]\w*", code))


def sanitize(solution: str, entry_point: str | None, stop: list[str] | tuple[str, ...] = (),
             also_needed: frozenset[str] = frozenset()) -> str:
    """A clean module from a raw solution (for HumanEval: prompt + completion)."""
    code = longest_parsable_prefix(strip_fences(cut_at_stop(solution, stop) if stop else solution))
    if not code.strip():
        return ""
    return keep_needed_definitions(code, entry_point, also_needed)
