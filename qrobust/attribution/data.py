"""Training documents and queries for attribution: loading, labels, and the built-in stdlib bins."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qrobust.errors import QrobustError

BUILTIN = "builtin"

# Coarse topics of standard-library modules, so the built-in corpus has bins a reader can name.
TOPICS: dict[str, tuple[str, ...]] = {
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "encodings", "locale", "gettext",
             "html", "pprint", "stringprep", "reprlib"),
    "network": ("email", "http", "urllib", "socket", "ssl", "smtplib", "ftplib", "imaplib", "poplib", "xmlrpc",
                "wsgiref", "ipaddress", "mailbox", "cgi", "cgitb", "socketserver", "webbrowser", "nntplib",
                "telnetlib", "asyncore", "asynchat", "smtpd", "mimetypes", "uu", "quopri"),
    "concurrency": ("asyncio", "concurrent", "multiprocessing", "threading", "queue", "subprocess", "selectors",
                    "signal", "sched", "_threading_local", "subprocessdata"),
    "data formats": ("json", "csv", "xml", "pickle", "pickletools", "copyreg", "zipfile", "tarfile", "gzip", "bz2",
                     "lzma", "zlib", "sqlite3", "dbm", "shelve", "configparser", "tomllib", "plistlib", "base64",
                     "binascii", "struct", "marshal", "netrc", "zipimport", "zipapp", "wave", "aifc", "sunau",
                     "chunk"),
    "language": ("ast", "dis", "inspect", "typing", "importlib", "import", "collections", "functools", "itertools",
                 "dataclasses", "enum", "abc", "types", "tokenize", "lib2to3", "ctypes", "compile", "code", "codeop",
                 "future_stmt", "warnings", "weakref", "copy", "contextlib", "operator", "builtins", "gc", "sys",
                 "symtable", "keyword", "traceback", "linecache", "peg_generator", "capi", "module",
                 "typinganndata", "opcode", "pyclbr", "runpy", "site", "sysconfig", "tokenizedata", "grammar"),
    "files and os": ("os", "pathlib", "shutil", "glob", "tempfile", "io", "stat", "fnmatch", "filecmp", "fileinput",
                     "posixpath", "ntpath", "genericpath", "platform", "getpass", "pty", "tty", "pipes", "shlex",
                     "_osx_support", "_pyio"),
    "dev tools": ("distutils", "ensurepip", "venv", "unittest", "doctest", "pdb", "bdb", "profile", "cProfile",
                  "pstats", "timeit", "trace", "tracemalloc", "logging", "libregrtest", "support", "tools", "pydoc",
                  "pydoc_data", "gdb", "dtracedata", "crashers", "argparse", "optparse", "getopt", "cmd"),
    "gui": ("tkinter", "idlelib", "turtle", "turtledemo", "curses"),
    "math and time": ("math", "statistics", "random", "decimal", "_pydecimal", "fractions", "numbers", "cmath",
                      "datetime", "_strptime", "calendar", "zoneinfo", "time", "heapq", "bisect", "array", "colorsys",
                      "graphlib"),
}
_TOPIC_OF = {module: topic for topic, modules in TOPICS.items() for module in modules}
APPS = ("idlelib", "turtledemo", "lib2to3", "pydoc_data", "ensurepip", "venv", "Tools")


@dataclass
class Document:
    id: str
    text: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Query:
    id: str
    group: str
    text: str


def stdlib_labels(path: str) -> dict[str, str]:
    """Topic (what the code is about) and kind (tests, apps and scripts, library) of a stdlib file."""
    parts = path.split("/")
    name = parts[-1]
    is_test = parts[0] == "test" or "tests" in parts[:-1] or name.startswith("test_")
    if parts[0] == "test" and len(parts) > 1:
        module = parts[1].removeprefix("test_").removesuffix(".py")
    else:
        module = parts[0].removesuffix(".py")
    if is_test:
        kind = "tests"
    elif parts[0] in APPS or name == "__main__.py":
        kind = "apps and scripts"
    else:
        kind = "library"
    return {"topic": _TOPIC_OF.get(module, "other"), "kind": kind, "source": "stdlib"}


def _from_jsonl(path: Path) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise QrobustError(f"{path}:{n} is not JSON ({e.msg}): one object a line with a 'text' field") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise QrobustError(f"{path}:{n} has no 'text' string: one object a line with a 'text' field")
            labels = {k: str(v) for k, v in row.items() if k not in ("text", "id") and isinstance(v, (str, int))}
            docs.append(Document(str(row.get("id", n)), row["text"], labels))
    return docs


def load_corpus(spec: str, limit: int | None = None, seed: int = 0) -> list[Document]:
    """'builtin' (this interpreter's stdlib, the built-in models' train split), a `qrobust zoo corpus`
    directory (its train split), or a JSONL file. limit: an evenly spaced subset of that size."""
    from qrobust.zoo.corpus import read_split, stdlib_documents

    path = Path(spec)
    if spec == BUILTIN:
        docs = [Document(d.path, d.text, stdlib_labels(d.path)) for d in stdlib_documents() if d.split == "train"]
    elif path.is_dir():
        docs = [Document(d.path, d.text, stdlib_labels(d.path)) for d in read_split(path, "train")]
    elif path.is_file():
        docs = _from_jsonl(path)
    else:
        raise QrobustError(f"corpus {spec!r} not found: pass 'builtin', a `qrobust zoo corpus` directory "
                           "or a .jsonl file")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise QrobustError(f"corpus {spec!r} has no documents with text")
    if len({d.id for d in docs}) != len(docs):
        raise QrobustError(f"corpus {spec!r} repeats document ids: give each line a unique 'id'")
    return evenly_spaced(docs, limit)


def evenly_spaced(items: list, limit: int | None) -> list:
    """A deterministic subset that keeps the spread of the list (file order is by package)."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise QrobustError(f"--limit must be at least 1, got {limit}")
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def _benchmark_queries(name: str, limit: int | None) -> list[Query]:
    from harness import get_task

    queries = []
    for p in get_task(name).problems(limit):
        text = p.reference if name == "humaneval" else f"# {p.text}\n{p.reference}"
        queries.append(Query(p.task_id, name, text))
    return queries


def load_queries(spec: str, limit: int | None = None) -> list[Query]:
    """Comma-separated benchmark names (each a query group: prompt and reference solution), or a JSONL
    file with 'text' and optional 'id' and 'group'. limit: first K of each benchmark."""
    from harness import TASKS

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names and all(n in TASKS for n in names):
        return [q for n in names for q in _benchmark_queries(n, limit)]
    path = Path(spec)
    if not path.is_file():
        raise QrobustError(f"queries {spec!r} not found: pass {', '.join(TASKS)} (comma-separated) or a .jsonl file")
    return [Query(d.id, d.labels.get("group", "queries"), d.text) for d in _from_jsonl(path)][:limit]
