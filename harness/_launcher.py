"""Runs inside the sandbox's namespaces: private /tmp, rlimits, unprivileged uids, then the run.

Invoked as `python -I _launcher.py CONFIG_JSON` with a scrubbed environment. Two modes:
- "program": one process runs a whole program (solution + tests) read from standard input,
  in a fresh interpreter, as before;
- "split": two processes forked from this one, so neither pays for an interpreter start. The
  candidate's process comes first, before anything secret has been read: standard input,
  output and error go to /dev/null, every other descriptor but its pipe pair is closed, it
  takes the candidate uid (or, where only one uid exists, loses every capability) and serves
  calls (_serve.py). Then the judge's process takes the judge uid, becomes non-dumpable (no
  ptrace, no /proc/PID/mem or fd from another process of the same uid), reads the tests and the
  verdict token from standard input and runs the tests against proxies (_judge.py).
Exits with the program's (judge's) status, or 128 + signal.
"""
import ctypes
import json
import os
import resource
import signal
import sys
import time


MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_DUMPABLE, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 4, 28, 38
SECURE_NOROOT_ALL = 0x2F  # noroot and no_setuid_fixup set and locked; keep_caps locked off
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    args = [None if a is None else a.encode() for a in (source, target, fstype, data)]
    if libc.mount(args[0], args[1], args[2], flags, args[3]) != 0:
        raise OSError(ctypes.get_errno(), f"mount {source} on {target} failed")


def _mount_private_tmp(keep: list) -> None:
    """A fresh /tmp; directories in `keep` that lie under /tmp (an interpreter in a virtual
    environment there) stay visible, bound back from file descriptors opened before the mount."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    kept = [(p, os.open(p, os.O_PATH)) for p in keep if p == "/tmp" or p.startswith("/tmp/")]
    _mount("tmpfs", "/tmp", "tmpfs", 0, "size=64m,mode=1777")
    for path, fd in kept:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)


def _closed_ancestor(path: str) -> str | None:
    """The outermost directory above path that others may not traverse (e.g. /root)."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts)):
        d = os.sep.join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _expose(prefixes: list) -> None:
    """Make the interpreter reachable for the unprivileged uid when it lives in a closed home
    directory: a 0755 tmpfs replaces that directory here, holding only the interpreter."""
    for n, prefix in enumerate(prefixes):
        closed = _closed_ancestor(prefix)
        if closed is None:
            continue
        stash = f"/tmp/.prefix{n}"
        os.makedirs(stash)
        _mount(prefix, stash, None, MS_BIND | MS_REC)
        _mount("tmpfs", closed, "tmpfs", 0, "mode=0755")
        os.makedirs(prefix, exist_ok=True)
        _mount(stash, prefix, None, MS_BIND | MS_REC)


def _limits(cfg: dict) -> None:
    cpu = int(cfg["cpu_seconds"])
    for res, value in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, cfg["memory_bytes"]),
        (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
        (resource.RLIMIT_NPROC, cfg["processes"]),
        (resource.RLIMIT_NOFILE, cfg["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(res, (value, value))


def _enter(uid: int | None, workdir: str, cfg: dict) -> None:
    """Become the unprivileged uid (when we are root), move into workdir, take the rlimits."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.chdir(workdir)
    _limits(cfg)


def _prctl(option: int, value: int) -> int:
    return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _drop_capabilities() -> None:
    """Where the candidate keeps the judge's uid (a user namespace mapping one uid), take every
    capability away, for good: no CAP_SYS_PTRACE or CAP_KILL over the judge, none regained by
    exec (SECBIT_NOROOT), none by setuid programs (no_new_privs)."""
    _prctl(PR_SET_SECUREBITS, SECURE_NOROOT_ALL)  # needs CAP_SETPCAP: fails harmlessly without caps
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: twice 32 bits, all zero
    if ctypes.CDLL(None, use_errno=True).capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _only_descriptors(requests: int, replies: int) -> tuple[int, int]:
    """Leave the process /dev/null as 0-2, its pipe pair as 3 and 4, and nothing else open."""
    null, requests, replies = os.open(os.devnull, os.O_RDWR), os.dup(requests), os.dup(replies)
    for fd, target in ((null, 0), (null, 1), (null, 2), (requests, 3), (replies, 4)):
        os.dup2(fd, target)
    os.closerange(5, max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 4096))
    return 3, 4


def _run_candidate(cfg: dict, workdir: str, requests: int, replies: int, serve) -> None:
    try:
        requests, replies = _only_descriptors(requests, replies)
        _enter(cfg["candidate_uid"], workdir, cfg)
        _drop_capabilities()
        serve(requests, replies)
    except BaseException:
        os._exit(1)
    os._exit(0)


def _run_judge(cfg: dict, requests: int, replies: int, judge) -> None:
    try:
        _enter(cfg["uid"], "/", cfg)
        if _prctl(PR_SET_DUMPABLE, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
        code = judge(requests, replies, cfg["verdict_fd"])
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _split_modules():
    """The judge's and the candidate's halves (_judge, _serve and their _wire), imported from
    this file's folder, which the private /tmp may hide later (a checkout under /tmp)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        import _judge
        import _serve
    finally:
        sys.path.remove(here)  # taken off again before any run
    return _judge, _serve


def _split(cfg: dict, workdir: str, _judge, _serve) -> int:
    """The judge's exit status, or the candidate's when its process ended first."""
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    candidate = os.fork()
    if candidate == 0:
        os.close(requests_w)
        os.close(replies_r)
        _run_candidate(cfg, workdir, requests_r, replies_w, _serve.serve)
    judge = os.fork()
    if judge == 0:
        os.close(requests_r)
        os.close(replies_w)
        _run_judge(cfg, requests_w, replies_r, _judge.main)
    for fd in (requests_r, requests_w, replies_r, replies_w, 0):
        os.close(fd)
    code = _exit_code(_wait(judge))
    if code == _judge.CANDIDATE_ENDED:
        code = _candidate_ended(candidate)  # reaps it when it has ended
    try:
        os.kill(candidate, signal.SIGKILL)
        os.waitpid(candidate, 0)  # reaped, so its CPU time counts in the run's rusage
    except (ProcessLookupError, ChildProcessError):
        pass
    return code


def _candidate_ended(pid: int) -> int:
    """The candidate's process closed its channel: say how it ended (a signal stays a signal,
    so a segfault or the CPU limit is classified as before)."""
    for _ in range(50):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            print(f"the candidate's process exited with status {os.WEXITSTATUS(status)} "
                  "before the tests finished", file=sys.stderr)
            return 1
        time.sleep(0.002)
    print("the candidate's process closed its channel before the tests finished", file=sys.stderr)
    return 1


def _wait(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return 127 << 8
        except InterruptedError:
            continue


def _exit_code(status: int) -> int:
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    halves = _split_modules() if cfg["mode"] == "split" else None  # before /tmp is replaced
    if cfg["private_tmp"]:
        _mount_private_tmp(cfg["expose"])
        if cfg["uid"] is not None:
            _expose(cfg["expose"])
    workdir = cfg["workdir"]
    os.makedirs(workdir, exist_ok=True)
    owner = cfg["candidate_uid"] if cfg["mode"] == "split" else cfg["uid"]
    if owner is not None:
        os.chown(workdir, owner, owner)
    os.chmod(workdir, 0o700)
    if cfg["mode"] == "split":
        os._exit(_split(cfg, workdir, *halves))
    pid = os.fork()
    if pid == 0:
        try:
            _enter(cfg["uid"], workdir, cfg)
            os.execve(cfg["python"], [cfg["python"], "-I", "-"], dict(os.environ))
        finally:
            os._exit(127)
    os._exit(_exit_code(_wait(pid)))


if __name__ == "__main__":
    main()
