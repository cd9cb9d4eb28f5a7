"""``exec`` into a running container, for the built-in executor.

Called in a *single-threaded* process (the shim), :func:`spawn` forks.  The
child joins the container's cgroup and its namespaces (those of PID 1, read
from ``/proc/<pid>/ns``), then forks again so the grandchild is inside the
container's pid namespace.  The grandchild sets rlimits, the working
directory, no_new_privs, the user and capabilities exactly as the container's
init does (:class:`agent.runtime.init.Container`), closes every other fd and
execs.  The middle process reports the grandchild's pid on the sync pipe and
exits; the grandchild is re-parented to the caller, a child subreaper, which
reaps it like any container process.

Sync pipe messages are the init's: ``{"pid": N}``, then EOF on a successful
exec, or ``{"error": …, "stage": …, "errno": …}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NoReturn

from agent.runtime import syscalls as sc
from agent.runtime.init import Container, fail, send

#: joined in this order; the mount namespace last (it changes our root)
JOIN_ORDER: tuple[tuple[str, int], ...] = (
    ("cgroup", sc.CLONE_NEWCGROUP), ("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS),
    ("net", sc.CLONE_NEWNET), ("pid", sc.CLONE_NEWPID), ("mnt", sc.CLONE_NEWNS),
)


def spawn(target_pid: int, process: Mapping[str, Any], cgroup_path: str, stdio: tuple[int, int, int],
          sync_fd: int, seccomp: Mapping[str, Any] | None = None, sys_: sc.Syscalls | None = None) -> int:
    """Fork the exec helper; returns the middle process's pid (reap it; it exits at once)."""
    pid = os.fork()
    if pid:
        return pid
    join(target_pid, process, cgroup_path, stdio, sync_fd, seccomp, sys_)  # pragma: no cover


def join(target_pid: int, process: Mapping[str, Any], cgroup_path: str, stdio: tuple[int, int, int],
         sync_fd: int, seccomp: Mapping[str, Any] | None = None, sys_: sc.Syscalls | None = None) -> NoReturn:
    """The middle process's work, in a process the caller forked itself (the shim's monitor
    forks first so that it never imports the runtime): join, fork, report, exit."""
    try:  # pragma: no cover - runs in a forked child, exercised by integration tests
        spec = {"process": dict(process), "linux": {"seccomp": dict(seccomp)} if seccomp else {}}
        _child(target_pid, spec, cgroup_path, stdio, sync_fd, sys_ or sc.LinuxSyscalls())
    except BaseException as exc:  # noqa: BLE001
        fail(sync_fd, "exec", exc)
    os._exit(125)


def _child(target_pid: int, spec: dict[str, Any], cgroup_path: str, stdio: tuple[int, int, int],
           sync_fd: int, sys_: sc.Syscalls) -> None:
    for n, fd in enumerate(stdio):
        os.dup2(fd, n, inheritable=True)
    stage = "seccomp"
    try:
        Container(spec, "/", sys_).seccomp_load()  # while the host's files are reachable
        stage = "namespaces"
        fds = []
        for name, flag in JOIN_ORDER:
            path = f"/proc/{target_pid}/ns/{name}"
            if os.path.realpath(path) != os.path.realpath(f"/proc/self/ns/{name}"):
                fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag))
        stage = "cgroup"
        from agent.runtime.cgroups import detect

        detect().add_process(cgroup_path, os.getpid())
        stage = "namespaces"
        for fd, flag in fds:
            sys_.setns(fd, flag)
            os.close(fd)
        stage = "fork"
        pid = os.fork()
    except BaseException as exc:  # noqa: BLE001
        fail(sync_fd, stage, exc)
    if pid == 0:
        _grandchild(spec, sync_fd, sys_)
    send(sync_fd, {"pid": pid})
    os._exit(0)


def _grandchild(spec: dict[str, Any], sync_fd: int, sys_: sc.Syscalls) -> None:
    c = Container(spec, "/", sys_)
    try:
        if spec["process"].get("terminal"):
            c.controlling_terminal()
        path, args, env = c.enter_process()
        c.exec_process(path, args, env)
    except BaseException as exc:  # noqa: BLE001
        fail(sync_fd, c.stage, exc)
