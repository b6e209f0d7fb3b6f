"""Runs inside the sandbox's namespaces: private /tmp, rlimits, unprivileged uid, then the program.

Invoked as `python _launcher.py CONFIG_JSON`; the program text arrives on standard input and is
passed on to the child interpreter. Exits with the program's status, or 128 + signal.
"""
import ctypes
import json
import os
import resource
import sys


MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000


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


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg["private_tmp"]:
        _mount_private_tmp(cfg["expose"])
        if cfg["uid"] is not None:
            _expose(cfg["expose"])
    workdir = cfg["workdir"] or os.path.join("/tmp", "sandbox")
    os.makedirs(workdir, exist_ok=True)
    uid = cfg["uid"]
    if uid is not None:
        os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)
    pid = os.fork()
    if pid == 0:
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.chdir(workdir)
            _limits(cfg)
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
            os.execve(cfg["python"], [cfg["python"], "-I", "-"], env)
        finally:
            os._exit(127)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 127 << 8
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
