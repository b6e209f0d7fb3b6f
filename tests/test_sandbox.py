"""The hostile battery: each program is classified right and the machine is unharmed."""
import os
import subprocess

import pytest

from harness.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout=3))


def test_isolation_is_reported(sandbox):
    assert "rlimits" in sandbox.isolation


@pytest.mark.parametrize("program,status", [
    ("assert 1 + 1 == 2", "passed"),
    ("assert 1 + 1 == 3", "failed"),
    ("while True:\n    pass", "timeout"),
    ("import sys\nsys.exit(0)", "failed"),
    ("import os\nos._exit(0)", "failed"),
    ("x = bytearray(16 << 30)", "memory"),
    ("import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGXCPU):\n"
     "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass", "timeout"),
    ("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)", ("crashed", "timeout")),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nassert False", "failed"),
])
def test_programs_are_classified(sandbox, program, status):
    result = sandbox.run(program)
    assert result.status in ((status,) if isinstance(status, str) else status), result


def _leftovers(*pgrep_args: str, seconds: float = 2.0) -> str:
    """Processes pgrep still finds once the namespace's teardown has had `seconds` to finish
    (the host sees the sandbox end before the kernel has reaped everything in it)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        found = subprocess.run(["pgrep", *pgrep_args], capture_output=True, text=True).stdout.strip()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_fork_bomb_is_contained(sandbox):
    from harness import IsolatedProgram

    bomb = "import os\nwhile True:\n    os.fork()"
    assert sandbox.run(bomb).status in ("failed", "timeout")
    assert sandbox.run(IsolatedProgram(bomb, "assert True\n", ())).status in ("failed", "timeout")
    assert _leftovers("-u", "61000,62000") == ""


def test_huge_output_is_bounded(sandbox):
    assert sandbox.run("while True:\n    print('x' * 100000)").status == "timeout"
    assert sandbox.run("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10**6)").status in ("failed", "crashed")


@pytest.mark.skipif(os.geteuid() != 0, reason="file protection relies on dropping to another uid, which needs root")
def test_files_outside_its_directory_are_safe(sandbox, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.chmod(tmp_path, 0o755)
    result = sandbox.run(f"import os\nos.remove({str(victim)!r})\nopen({str(tmp_path / 'new')!r}, 'w')")
    assert result.status == "failed" and victim.read_text() == "keep me" and not (tmp_path / "new").exists()


def test_network_and_leftover_processes(sandbox):
    net = sandbox.run("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert net.status == "failed"
    sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n")
    assert _leftovers("-f", "time.sleep") == ""


def test_working_directory_is_private_and_removed(sandbox):
    marker = "/tmp/qrobust-sandbox-leak-test"
    assert sandbox.run(f"open({marker!r}, 'w').write('x')\nopen('local', 'w').write('ok')").status == "passed"
    assert not os.path.exists(marker)


def test_interpreter_in_a_virtual_environment_under_tmp():
    """The private /tmp must not hide the interpreter when it lives there (a venv in /tmp).

    The venv is bare (no site packages: a venv's base interpreter need not have this project's
    dependencies), so it loads the sandbox's modules by path: they need the standard library
    only, the launcher and the isolated run's halves included."""
    import sys
    from pathlib import Path

    venv = Path("/tmp") / f"qrobust-venv-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    try:
        sandbox_py = Path(__file__).resolve().parents[1] / "harness" / "sandbox.py"
        script = ("import importlib.util, sys\n"
                  f"spec = importlib.util.spec_from_file_location('sandbox', {str(sandbox_py)!r})\n"
                  "sb = importlib.util.module_from_spec(spec)\nsys.modules['sandbox'] = sb\n"
                  "spec.loader.exec_module(sb)\nsandbox = sb.Sandbox(sb.Limits(timeout=5))\n"
                  "print(sys.prefix, sandbox.run('assert 1 + 1 == 2').status,\n"
                  "      sandbox.run(sb.IsolatedProgram('def f():\\n    return 2\\n', "
                  "'assert f() == 2', ('f',))).status)")
        out = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", script], capture_output=True, text=True,
                             timeout=60)
        assert out.stdout.split() == [str(venv), "passed", "passed"], out.stderr[-2000:]
    finally:
        subprocess.run(["rm", "-rf", str(venv)], check=False)



def test_isolated_run_from_a_checkout_under_tmp(tmp_path):
    """The launcher lives in the checkout; a checkout under /tmp (CI clones there) is hidden by the
    private /tmp, so the isolated run's halves must be imported before it is mounted."""
    import shutil
    import sys
    from pathlib import Path

    copy = tmp_path / "checkout" / "harness"
    shutil.copytree(Path(__file__).resolve().parents[1] / "harness", copy,
                    ignore=shutil.ignore_patterns("__pycache__", "data"))
    script = ("import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('sandbox', {str(copy / 'sandbox.py')!r})\n"
              "sb = importlib.util.module_from_spec(spec)\nsys.modules['sandbox'] = sb\n"
              "spec.loader.exec_module(sb)\nsandbox = sb.Sandbox(sb.Limits(timeout=5))\n"
              "print(sandbox.run(sb.IsolatedProgram('def f():\\n    return 2\\n', 'assert f() == 2', ('f',))).status)")
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["passed"], out.stderr[-2000:]

# Completions that try to win without being right. Each is a wrong HumanEval/0 solution (it
# always answers True) plus a trick, judged isolated against the benchmark's own check().
_WRONG = "def has_close_elements(numbers, threshold):\n    return True\n"
_TRICKS = {
    # the attack of issue 30: the token is in the program, the pipe is open: here neither is
    "forged marker": "import gc, os, re\nfor o in gc.get_objects():\n"
                     "    for s in (o if isinstance(o, (list, tuple)) else [o]):\n"
                     "        if isinstance(s, str) and re.fullmatch('[0-9a-f]{32}', s):\n"
                     "            for fd in range(256):\n"
                     "                try:\n                    os.write(fd, s.encode())\n"
                     "                except OSError:\n                    pass\n",
    "other processes' fds, memory, ptrace":
        "import ctypes, os\nlibc = ctypes.CDLL(None)\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:\n"
        "    libc.ptrace(16, int(pid), 0, 0)\n"
        "    for path in [f'/proc/{pid}/mem', f'/proc/{pid}/environ']:\n"
        "        try:\n            open(path, 'rb').read(4096)\n        except OSError:\n            pass\n"
        "    try:\n        fds = os.listdir(f'/proc/{pid}/fd')\n    except OSError:\n        fds = []\n"
        "    for fd in fds:\n        try:\n"
        "            os.write(os.open(f'/proc/{pid}/fd/{fd}', os.O_WRONLY), b'0' * 32)\n"
        "        except OSError:\n            pass\n",
    "always-equal object": "class Yes:\n    def __eq__(self, other):\n        return True\n"
                           "    __ne__ = lambda self, other: False\n    __hash__ = object.__hash__\n"
                           "def has_close_elements(numbers, threshold):\n    return Yes()\n",
    "always-equal int subclass": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                                 "    __hash__ = int.__hash__\n"
                                 "def has_close_elements(numbers, threshold):\n    return Yes(7)\n",
    "tampered builtins and check()": "import builtins, gc\n"
                                     "builtins.AssertionError = type('Ignored', (Exception,), {})\n"
                                     "builtins.__import__ = None\nfor f in gc.get_objects():\n"
                                     "    if getattr(f, '__name__', '') == 'check':\n"
                                     "        f.__code__ = (lambda candidate: None).__code__\n",
    "os._exit(0) after a right answer": "import os\nn = [0]\ndef has_close_elements(numbers, threshold):\n"
                                        "    n[0] += 1\n    if n[0] > 1:\n        os._exit(0)\n    return True\n",
    "sys.exit(0) in the middle": "import sys\ndef has_close_elements(numbers, threshold):\n    sys.exit(0)\n",
    "killing every process": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                             "for p in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                             "    try:\n        os.kill(int(p), signal.SIGKILL) if int(p) != os.getpid() else None\n"
                             "    except OSError:\n        pass\n",
    "closing its channel": "import os\nfor fd in range(3, 256):\n    try:\n        os.close(fd)\n"
                           "    except OSError:\n        pass\n",
    "fake success on every output": "import os, struct\nprint('passed')\nfor fd in range(256):\n    try:\n"
                                    "        os.write(fd, b'passed' + struct.pack('>I', 6) + b'[\"ok\"]')\n"
                                    "    except OSError:\n        pass\n",
    "returns a function": "def has_close_elements(numbers, threshold):\n    return lambda *a: True\n",
}


@pytest.fixture(scope="module")
def tricked(sandbox):
    """Every trick judged once, two at a time (they are the battery's slowest part)."""
    from concurrent.futures import ThreadPoolExecutor

    from harness import IsolatedProgram, get_task

    task = get_task("humaneval")
    problem = task.problems(limit=1)[0]
    tests = task.isolated_tests(problem)
    programs = {name: IsolatedProgram(_WRONG + trick, tests.code, tests.calls) for name, trick in _TRICKS.items()}
    programs["honest reference"] = IsolatedProgram(problem.reference, tests.code, tests.calls)
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(programs, pool.map(sandbox.run, programs.values())))


@pytest.mark.parametrize("trick", sorted(_TRICKS))
def test_tricks_do_not_pass(tricked, trick):
    assert tricked["honest reference"].status == "passed", tricked["honest reference"]
    assert tricked[trick].status in ("failed", "crashed"), tricked[trick]


def test_a_caught_channel_failure_still_fails(sandbox):
    """A test that swallows every exception cannot turn the candidate's exit into a pass."""
    from harness import IsolatedProgram

    tests = "try:\n    f()\nexcept BaseException:\n    pass\n"
    assert sandbox.run(IsolatedProgram("def f():\n    raise ValueError\n", tests, ("f",))).status == "passed"
    result = sandbox.run(IsolatedProgram("import sys\ndef f():\n    sys.exit(0)\n", tests, ("f",)))
    assert result.status == "failed" and "SystemExit" in result.reason


@pytest.mark.parametrize("solution,status", [
    ("import ctypes\ndef f():\n    ctypes.string_at(0)\n", "crashed"),
    ("def f():\n    while True:\n        pass\n", "timeout"),
    ("def f():\n    return bytearray(16 << 30)\n", "memory"),
    ("def f():\n    raise KeyError(3)\n", "failed"),
])
def test_candidate_side_outcomes_keep_their_status(sandbox, solution, status):
    from harness import IsolatedProgram

    assert sandbox.run(IsolatedProgram(solution, "f()\n", ("f",)), timeout=1).status == status


@pytest.mark.skipif(os.geteuid() != 0, reason="a second uid needs root")
def test_candidate_runs_as_another_uid_without_the_verdict_pipe(sandbox):
    from harness import IsolatedProgram

    solution = "import os\ndef ids():\n    return os.getuid(), sorted(int(fd) for fd in os.listdir('/proc/self/fd'))\n"
    tests = ("import os\nuid, fds = ids()\n"
             "assert uid != os.getuid() and fds == [0, 1, 2, 3, 4, 5], (uid, fds)  # 5: listdir's own\n")
    assert sandbox.run(IsolatedProgram(solution, tests, ("ids",))).status == "passed"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv")
                    or not os.path.exists("/usr/bin/python3"),
                    reason="runs the sandbox as nobody: needs root, setpriv and a system python3")
def test_without_root_the_candidate_has_no_capabilities_over_the_judge(tmp_path):
    """As a non-root user there is one uid in the user namespace: the candidate keeps it, but
    without capabilities, and the judge is non-dumpable, so ptrace and /proc/PID/mem are denied."""
    import json
    from pathlib import Path

    sandbox_py = Path(__file__).resolve().parents[1] / "harness" / "sandbox.py"
    probe = ("import ctypes, os\ndef probe():\n    libc, out = ctypes.CDLL(None), []\n"
             "    me = int(os.readlink('/proc/self'))  # /proc is the host's: its pids, not the namespace's\n"
             "    for p in [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != me]:\n"
             "        try:\n            open(f'/proc/{p}/mem', 'rb')\n            out.append('mem')\n"
             "        except OSError:\n            pass\n"
             "        out.append(libc.ptrace(16, p, 0, 0))\n"
             "    status = open('/proc/self/status').read().split()\n"
             "    return out, status[status.index('CapEff:') + 1]\n")
    script = ("import importlib.util, json, sys\n"
              f"spec = importlib.util.spec_from_file_location('sandbox', {str(sandbox_py)!r})\n"
              "sb = importlib.util.module_from_spec(spec)\nsys.modules['sandbox'] = sb\nspec.loader.exec_module(sb)\n"
              "sandbox = sb.Sandbox(sb.Limits(timeout=5))\n"
              f"r = sandbox.run(sb.IsolatedProgram({probe!r}, 'out, caps = probe()\\nassert caps == 16 * \"0\" and "
              "set(out) == {-1}, (out, caps)', ('probe',)))\n"
              "print(json.dumps([sandbox.prefix, r.status, r.reason]))\n")
    os.chmod(tmp_path, 0o777)
    out = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    prefix, status, reason = json.loads(out.stdout)
    if not prefix:
        pytest.skip("no user namespaces for an unprivileged user here")
    assert "--user" in prefix and status == "passed", reason
