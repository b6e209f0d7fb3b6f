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


def test_fork_bomb_is_contained(sandbox):
    result = sandbox.run("import os\nwhile True:\n    os.fork()")
    assert result.status in ("failed", "timeout")
    leftover = subprocess.run(["pgrep", "-u", "61000"], capture_output=True, text=True).stdout.strip()
    assert leftover == ""


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
    leftover = subprocess.run(["pgrep", "-f", "time.sleep"], capture_output=True, text=True).stdout.strip()
    assert leftover == ""


def test_working_directory_is_private_and_removed(sandbox):
    marker = "/tmp/qrobust-sandbox-leak-test"
    assert sandbox.run(f"open({marker!r}, 'w').write('x')\nopen('local', 'w').write('ok')").status == "passed"
    assert not os.path.exists(marker)


def test_interpreter_in_a_virtual_environment_under_tmp(tmp_path):
    """The private /tmp must not hide the interpreter when it lives there (a venv in /tmp)."""
    import sys
    from pathlib import Path

    venv = Path("/tmp") / f"qrobust-venv-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    try:
        root = Path(__file__).resolve().parents[1]
        script = ("from harness.sandbox import Limits, Sandbox\n"
                  "print(Sandbox(Limits(timeout=5)).run('assert 1 + 1 == 2').status)")
        out = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True,
                             cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=60)
        assert out.stdout.strip() == "passed", out.stderr[-2000:]
    finally:
        subprocess.run(["rm", "-rf", str(venv)], check=False)
