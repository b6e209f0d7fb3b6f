"""Run untrusted Python programs so that they cannot hurt the machine or the evaluation.

Each program gets: new network, PID, mount and IPC namespaces (no network; everything it
starts dies with it; a private /tmp), an unprivileged uid when we run as root, rlimits on CPU
seconds, address space, file size, processes and open files, its own working directory, a
scrubbed environment, and a wall-clock timeout that kills its whole process group. Where the
kernel refuses namespaces, the same limits apply without them and results say which isolation
was in force.

Two ways to run, in those same namespaces and limits:
- an IsolatedProgram (the default for benchmark problems): the tests run in a trusted process
  and the candidate's solution in a separate untrusted one, under another uid, that serves the
  calls the tests make; only plain data crosses (harness/_wire.py). The trusted process alone
  holds the verdict pipe and its fresh random token, and writes the token only when the test
  code has run to its end, so nothing the candidate does to its own interpreter reaches the
  comparisons or the verdict (docs/sandbox.md);
- a plain program (solution and tests in one interpreter, "in-process"): for the tests that
  need the solution's own objects. It passes only if it writes the token to the pipe after its
  last test, so exiting early with status 0 is a failure; but a hostile program can find the
  token in its own source, so these results are marked.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).with_name("_launcher.py")
_UID_BASE = 61000  # one uid per worker slot, so process limits do not interfere
_CANDIDATE_UID_BASE = 62000  # the untrusted half of an isolated run: another uid per slot


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20
    processes: int = 64
    open_files: int = 128


@dataclass(frozen=True)
class IsolatedProgram:
    """A solution and the tests that judge it, to run in separate processes: `tests` runs in
    the trusted one with each name in `calls` bound to a proxy for the solution's function."""
    solution: str
    tests: str
    calls: tuple[str, ...]


@dataclass
class ExecResult:
    status: str
    reason: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _namespace_prefix() -> list[str] | None:
    """The unshare command that works here, or None when the kernel refuses namespaces."""
    if shutil.which("unshare") is None:
        return None
    base = ["unshare", "--net", "--pid", "--mount", "--ipc", "--fork", "--kill-child"]
    candidates = [base] if os.geteuid() == 0 else [base + ["--user", "--map-root-user"]]
    for cmd in candidates:
        try:
            ok = subprocess.run(cmd + ["true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cmd
    return None


class Sandbox:
    def __init__(self, limits: Limits = Limits(), use_namespaces: bool = True):
        self.limits = limits
        self.prefix = _namespace_prefix() if use_namespaces else None
        self.drop_uid = os.geteuid() == 0
        self._slots: list[int] = []
        self._lock = threading.Lock()

    @property
    def isolation(self) -> str:
        parts = ["namespaces(net,pid,mount,ipc)" if self.prefix else "no-namespaces"]
        parts.append("uid-drop" if self.drop_uid else "same-uid")
        parts.append("rlimits")
        return "+".join(parts)

    def _slot(self) -> int:
        with self._lock:
            used = set(self._slots)
            slot = next(i for i in range(len(used) + 1) if i not in used)
            self._slots.append(slot)
            return slot

    def _release(self, slot: int) -> None:
        with self._lock:
            self._slots.remove(slot)

    def run(self, program: str | IsolatedProgram, timeout: float | None = None) -> ExecResult:
        timeout = timeout or self.limits.timeout
        slot = self._slot()
        try:
            return self._run(program, timeout, slot)
        finally:
            self._release(slot)

    def _run(self, program: str | IsolatedProgram, timeout: float, slot: int) -> ExecResult:
        token = secrets.token_hex(16)
        read_fd, write_fd = os.pipe()
        host_dir = tempfile.mkdtemp(prefix="qrobust-sbx-")
        stderr_path = os.path.join(host_dir, "stderr")
        isolated = isinstance(program, IsolatedProgram)
        workdir = "/tmp/sandbox" if self.prefix else os.path.join(host_dir, "work")
        cfg = {
            "mode": "split" if isolated else "program",
            "python": sys.executable, "private_tmp": self.prefix is not None, "workdir": workdir,
            "uid": _UID_BASE + slot if self.drop_uid else None,
            "candidate_uid": _CANDIDATE_UID_BASE + slot if self.drop_uid else None,
            "verdict_fd": write_fd,
            "cpu_seconds": int(timeout) + 1, "memory_bytes": self.limits.memory_bytes,
            "file_bytes": self.limits.file_bytes, "processes": self.limits.processes,
            "open_files": self.limits.open_files,
            "expose": sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}),
        }
        if isolated:
            stdin = json.dumps({"token": token, "solution": program.solution, "tests": program.tests,
                                "calls": list(program.calls)})
        else:
            stdin = program + f"\nimport os as _qr_os\n_qr_os.write({write_fd}, b'{token}')\n"
        # The launcher and everything it forks see only this environment (the isolated run's
        # processes are forks, not fresh interpreters given a new one).
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        cmd = (self.prefix or []) + [sys.executable, "-I", str(LAUNCHER), json.dumps(cfg)]
        t0 = time.perf_counter()
        timed_out = False
        try:
            with open(stderr_path, "wb") as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                        pass_fds=(write_fd,), start_new_session=True, env=env)
                os.close(write_fd)
                write_fd = -1
                try:
                    proc.communicate(stdin.encode(), timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc.pid)
                    proc.wait()
            seconds = time.perf_counter() - t0
            marker = _read_all(read_fd)
            stderr = _tail(stderr_path)
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            os.close(read_fd)
            shutil.rmtree(host_dir, ignore_errors=True)
        return classify(proc.returncode, timed_out, marker == token.encode(), stderr, seconds)


def classify(returncode: int, timed_out: bool, finished: bool, stderr: str, seconds: float) -> ExecResult:
    if timed_out:
        return ExecResult("timeout", "killed after the time limit", seconds)
    if returncode == 0 and finished:
        return ExecResult("passed", "", seconds)
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    if "MemoryError" in stderr:
        return ExecResult("memory", "MemoryError", seconds)
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        reason = {"SIGXFSZ": "output file size limit", "SIGXCPU": "CPU time limit", "SIGKILL": "killed"}.get(name, name)
        return ExecResult("crashed", reason, seconds)
    if returncode == 0:
        return ExecResult("failed", "exited before its tests finished", seconds)
    return ExecResult("failed", last[:200] or f"exit status {returncode}", seconds)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int, limit: int = 4096) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) < limit:
            chunk = os.read(fd, limit)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    return data


def _tail(path: str, n: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", "replace")
