"""Imports go one way, harness ← qrobust core ← hawq ← studies, and no modules import each other.

Every import counts, also one inside a function (a lazy import is a dependency all the same),
and a package's lazy re-exports (_EXPORTS) as imports of the submodules they name; all read
with `ast` from the source, so nothing is imported here.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "qrobust", "hawq")

# The layers, lowest first: a module may import modules of its own layer and of the layers below.
LAYERS = ("harness", "core", "hawq", "studies")

# Each unit's layer. A unit is a top-level package (harness, hawq), or qrobust itself or one of
# its top-level modules and packages: a new one must be listed here to pass.
UNITS = {
    "harness": "harness",  # benchmarks, sandbox, pass@k: stands alone
    "qrobust": "core",  # the package's own __init__: re-exports of the core
    "qrobust.errors": "core",
    "qrobust.version": "core",
    "qrobust.plotting": "core",  # writes figures; imports nothing of qrobust, used by hawq and the studies
    "qrobust.calib": "core",
    "qrobust.degradation": "core",  # teacher-forced metrics of a model against its baseline
    "qrobust.precision": "core",  # the default dtype of a device and its label
    "qrobust.resume": "core",  # resuming into an output folder only with its own settings
    "qrobust.kernels": "core",
    "qrobust.models": "core",
    "qrobust.quant": "core",
    "qrobust.zoo": "core",
    "hawq": "hawq",  # mixed-precision plans from the core's quantizers
    "qrobust.attribution": "studies",
    "qrobust.bench": "studies",
    "qrobust.bench_generate": "studies",
    "qrobust.bench_study": "studies",
    "qrobust.cli": "studies",
    "qrobust.lm_eval": "studies",  # the lm-evaluation-harness backend
    "qrobust.probe": "studies",
    "qrobust.report": "studies",
    "qrobust.report_degradation": "studies",
    "qrobust.sampler_cost": "studies",  # what the fast diffusion sampler's cache costs a model
    "qrobust.sweep": "studies",
}

def module_files() -> dict[str, tuple[Path, bool]]:
    """Every module of the three packages: its dotted name -> (file, whether it is a package)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _resolve(name: str, modules) -> str | None:
    """The module that importing `name` runs last: itself, or its closest enclosing module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, is_package: bool, modules) -> set[str]:
    """The project's modules that `module` imports anywhere in its source."""
    here = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from package import name` imports the submodule package.name where there is one
            out.update(_resolve(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source, modules)
                       for alias in node.names)
        elif is_package and isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_EXPORTS":
            # a package's lazy re-exports (qrobust.kernels): the submodules its _EXPORTS names
            named = (f"{module}.{sub}" for sub in ast.literal_eval(node.value).values())
            out.update(name for name in named if name in modules)
    out.discard(None)
    out.discard(module)
    return out


@lru_cache(maxsize=1)
def import_graph() -> dict[str, frozenset[str]]:
    modules = module_files()
    return {m: frozenset(imports_of(m, path, is_package, modules)) for m, (path, is_package) in modules.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    unit = ".".join(parts[:2]) if parts[0] == "qrobust" else parts[0]
    return UNITS[unit]


def cycles(graph: dict[str, frozenset[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unlisted(graph: dict[str, frozenset[str]]) -> list[str]:
    """Modules of no unit in UNITS."""
    out = []
    for module in graph:
        try:
            layer_of(module)
        except KeyError:
            out.append(module)
    return sorted(out)


def upward_imports(graph: dict[str, frozenset[str]]) -> list[str]:
    """Each import of a module of a higher layer than the importer's."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    listed = set(graph) - set(unlisted(graph))
    return sorted(f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})" for m in listed for t in graph[m] & listed
                  if rank[layer_of(t)] > rank[layer_of(m)])


def test_every_module_has_a_layer():
    missing = unlisted(import_graph())
    assert not missing, f"add these to UNITS in tests/test_layering.py: {missing}"


def test_imports_go_one_way():
    upward = upward_imports(import_graph())
    assert not upward, "imports against the order harness ← core ← hawq ← studies:\n" + "\n".join(upward)


def test_no_import_cycles():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"modules that import each other: {found}"


def test_the_checks_see_what_they_check(tmp_path):
    """Imports inside functions, relative imports, `from package import module` and lazy
    re-exports all count, and a cycle through them is found."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('_EXPORTS = {"f": "a", "x": "c"}\n')
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg.c import x\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    modules = {f"pkg.{n}": (tmp_path / "pkg" / f"{n}.py", False) for n in "abc"}
    modules["pkg"] = (tmp_path / "pkg" / "__init__.py", True)
    graph = {m: frozenset(imports_of(m, path, is_package, modules)) for m, (path, is_package) in modules.items()}
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg"] == {"pkg.a", "pkg.c"}
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.b", "pkg.c"})]
    assert layer_of("qrobust.models.loading") == "core" and layer_of("qrobust.sweep") == "studies"


def test_an_import_against_the_order_is_reported():
    graph = {"harness.tasks": frozenset({"qrobust.errors"}), "qrobust.errors": frozenset(),
             "hawq.plan": frozenset({"qrobust.errors", "qrobust.sweep"}), "qrobust.sweep": frozenset({"hawq.plan"})}
    assert upward_imports(graph) == ["harness.tasks (harness) imports qrobust.errors (core)",
                                     "hawq.plan (hawq) imports qrobust.sweep (studies)"]
    assert unlisted({"qrobust.newmodule": frozenset()}) == ["qrobust.newmodule"]
