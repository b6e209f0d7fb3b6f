"""Which tests can judge a solution from another process, and what they need there.

The rule is static and reads only trusted text: the benchmark's test code and its reference
solution, never the candidate's (a candidate must not be able to choose where it is judged).
A name the tests use but do not bind themselves, and that the reference binds at top level:
- a function (the entry point always is one): called through a proxy;
- an import (`math` in HumanEval/32's tests comes from the prompt): the import statement is
  replayed in the trusted process ahead of the tests;
- anything else (a class the tests build objects from, as in MBPP/367's tree, or a constant):
  the tests need the solution's own objects, so they run in-process.
Tests that read an attribute of a called function (`candidate.__doc__`) inspect the candidate
object itself and run in-process too.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

from harness.sanitize import _parse

_FUNCTION = "function"
_IMPORT = "import"


@dataclass(frozen=True)
class SplitTests:
    code: str  # what the trusted process runs: replayed imports, then the tests unchanged
    calls: tuple[str, ...]  # names bound to proxies for the solution's functions
    fallback: str = ""  # why the tests must run in the solution's process; "" if they need not

    @property
    def isolated(self) -> bool:
        return not self.fallback


def split_tests(reference: str, entry_point: str, tests: str) -> SplitTests:
    try:
        ref, test_tree = _parse(reference), _parse(tests)
    except SyntaxError as e:
        return SplitTests(tests, (), f"the reference or the tests do not parse ({e.msg})")
    bound = _top_level_bindings(ref)
    own = {n.id for n in ast.walk(test_tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    own |= {n.name for n in ast.walk(test_tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used = {n.id for n in ast.walk(test_tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - own
    needed = {entry_point} | (used & set(bound))
    calls, imports = [], []
    for name in sorted(needed):
        kind, node = bound.get(name, (None, None))
        if kind == _FUNCTION:
            calls.append(name)
        elif kind == _IMPORT:
            imports.append(node)
        else:
            what = "is not defined" if kind is None else f"is a {kind}"
            return SplitTests(tests, (), f"the tests use {name}, which in the reference solution {what}")
    inspected = sorted({n.value.id for n in ast.walk(test_tree) if isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name) and n.value.id in {*calls, "candidate"}})
    if inspected:
        return SplitTests(tests, (), f"the tests read attributes of {inspected[0]} itself")
    replayed = "".join(ast.unparse(node) + "\n" for node in sorted(set(imports), key=lambda n: n.lineno))
    return SplitTests(replayed + tests, tuple(calls))


def _top_level_bindings(tree: ast.Module) -> dict[str, tuple[str, ast.stmt]]:
    """name -> (kind, statement) for what a module binds at top level (the last binding wins)."""
    out: dict[str, tuple[str, ast.stmt]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = (_FUNCTION, node)
        elif isinstance(node, ast.ClassDef):
            out[node.name] = ("class", node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*":
                    out[(alias.asname or alias.name).split(".")[0]] = (_IMPORT, node)
        else:
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    out[n.id] = ("value", node)
    return out
