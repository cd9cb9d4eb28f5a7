"""The shim's launcher: the pool process that sets one container up, then becomes its monitor.

skiffd keeps a few launchers started ahead of time (``python -S -m agent.shim
FD``), each with the runtime imported and the host's cgroups and libseccomp
loaded, blocked reading its *assignment* (one JSON line) on FD, a socketpair
to the agent; one that reads EOF there exits.  Given a container it

1. forks and lets its parent exit, so it is re-parented away from skiffd,
   starts a new session and becomes a child subreaper (the container's PID 1
   is re-parented to it, and so are exec'd processes' orphans);
2. binds ``<state_dir>/shim.sock``, mounts the container's root filesystem
   (overlay from the snapshotter) on ``<bundle>/rootfs``;
3. makes the container's stdio (pipes; for ``-t`` a pty the init makes in the
   container's devpts and passes back) and runs the bundle with the executor
   (built-in: the init runs in a forked child of this single-threaded
   process, no fresh interpreter; or runc/crun);
4. reports ``{"pid": …}`` (or ``{"error": …}``) to the agent;
5. runs the monitor (:mod:`agent.shim.monitor`) here; once the container has
   run a while and nothing is in flight, the monitor execs itself in this same
   process with the fds it needs, shedding everything the set-up imported.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from agent.runtime import syscalls as sc
from agent.runtime.executor import BuiltinExecutor, ContainerStartError, RuncExecutor, Stdio
from agent.shim import protocol as p
from agent.shim.execs import _set_winsize
from agent.shim.monitor import HANDOFF, SECCOMP_BPF, Monitor, run_monitor

CONTROL_FD = 3
#: the monitor runs in this (large) process this long before it execs itself small: a short
#: container never pays for a fresh interpreter on its way out
SHED_AFTER = 2.0
#: overlay options longer than this are given relative to the layers' common directory
MAX_MOUNT_DATA = 3500


class Launcher:
    def __init__(self, a: dict[str, Any], control: int) -> None:
        self.a = a
        self.control = control
        self.id: str = a["id"]
        self.state_dir: str = a["state_dir"]
        self.bundle = Path(a["bundle"])
        self.rootfs = str(self.bundle / "rootfs")
        self.tty = bool(a.get("tty"))
        self.open_stdin = bool(a.get("open_stdin"))
        runtime = a.get("runtime") or "builtin"
        self.executor: BuiltinExecutor | RuncExecutor
        if runtime == "builtin":
            self.executor = BuiltinExecutor(Path(a["runtime_root"]), fork=True)
        else:
            self.executor = RuncExecutor(Path(a["runtime_root"]), runc=a.get("runtime_path") or runtime)
        self.sys = sc.LinuxSyscalls()
        self.listener: socket.socket | None = None
        self.outputs: dict[int, int] = {}
        self.stdin_fd = -1
        self.master = -1
        self.mounted = False
        self.pid = 0
        self.status = "creating"
        self.started_at = 0

    def setup(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(self.state_dir, p.PID_FILE), "w") as f:
            f.write(f"{os.getpid()}\n")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        os.chdir(self.state_dir)  # a relative name: the socket path may exceed sun_path
        try:
            os.unlink(p.SOCKET)
        except FileNotFoundError:
            pass
        self.listener.bind(p.SOCKET)
        os.chmod(p.SOCKET, 0o600)
        os.chdir("/")
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.mount_rootfs()
        console: socket.socket | None = None
        if self.tty and isinstance(self.executor, BuiltinExecutor):
            console, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            stdio, child_ends = Stdio(), [theirs.detach()]
            kwargs = {"console_fd": child_ends[0]}
        else:
            stdio, child_ends = self.make_stdio()
            kwargs = {}
        try:
            process = self.executor.run(self.bundle, self.id, stdio, **kwargs)
            self.status = "running"
            self.started_at = time.time_ns()
        finally:
            for fd in child_ends:
                os.close(fd)
        self.pid = process.pid
        if console is not None:
            with console:
                self.take_console(console)

    def take_console(self, console: socket.socket) -> None:
        """The pty master the init made in the container's devpts (see init.Container.console)."""
        console.settimeout(10)
        _, fds, _, _ = socket.recv_fds(console, 16, 1)
        if not fds:
            raise OSError(errno.EPROTO, "the container's init sent no console")
        self.adopt_master(fds[0])

    def adopt_master(self, master: int) -> None:
        """The container's pty master: its output, its stdin (with -i), sized as asked."""
        self.master = master
        os.set_blocking(master, False)
        size = self.a.get("size")
        if size:
            _set_winsize(master, int(size[0]), int(size[1]))
        self.outputs[master] = p.STDOUT
        if self.open_stdin:
            self.stdin_fd = master

    def mount_rootfs(self) -> None:
        os.makedirs(self.rootfs, exist_ok=True)
        for m in self.a.get("rootfs_mounts") or []:
            options = list(m.get("options") or [])
            cwd = None
            if len(",".join(options)) > MAX_MOUNT_DATA:
                cwd, options = _relative_lowerdirs(options)
            opts = sc.mount_flags_from_options(options)
            if cwd:
                os.chdir(cwd)
            try:
                self.sys.mount(m.get("source") or "none", self.rootfs, m["type"], opts.flags, opts.data)
            finally:
                if cwd:
                    os.chdir("/")
            self.mounted = True

    def make_stdio(self) -> tuple[Stdio, list[int]]:
        if self.tty:  # runc without a console socket: a host pty as plain stdio
            master, slave = os.openpty()
            self.adopt_master(master)
            return Stdio(slave, slave, slave), [slave]
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        self.outputs[out_r] = p.STDOUT
        self.outputs[err_r] = p.STDERR
        ends = [out_w, err_w]
        stdin: int | None = None
        if self.open_stdin:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(in_w, False)
            self.stdin_fd = in_w
            stdin = in_r
            ends.append(in_r)
        return Stdio(stdin, out_w, err_w), ends

    def report(self, message: dict[str, Any]) -> None:
        if self.control < 0:
            return
        try:
            os.write(self.control, json.dumps(message).encode() + b"\n")
        except OSError:
            pass
        if "error" in message or not self.a.get("attach"):
            os.close(self.control)
            self.control = -1
        # else: the agent's end becomes the attach stream (docker run): handed to the monitor

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "status": self.status, "started_at": self.started_at,
                "exit_code": None}

    def cleanup_socket(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for name in (p.SOCKET, p.PID_FILE, HANDOFF):
            try:
                os.unlink(os.path.join(self.state_dir, name))
            except FileNotFoundError:
                pass

    def abort(self) -> None:
        """Set-up failed: undo what was done; the agent removes the state directory."""
        try:
            self.executor.delete(self.id)
        except Exception:  # noqa: BLE001
            pass
        self.unmount()
        self.cleanup_socket()

    def unmount(self) -> None:
        if self.mounted:
            try:
                self.sys.umount2(self.rootfs, sc.MNT_DETACH)
            except OSError:
                pass
            self.mounted = False

    def save_seccomp(self) -> None:
        """The compiled filter beside the socket, for exec helpers (they start without our cache)."""
        try:
            with open(self.bundle / "config.json", encoding="utf-8") as f:
                profile = json.load(f).get("linux", {}).get("seccomp")
            if not profile:
                return
            from agent.runtime import seccomp

            bpf = seccomp.compile_bpf(profile)
            if bpf is not None:
                with open(os.path.join(self.state_dir, SECCOMP_BPF), "wb") as f:
                    f.write(bpf)
        except Exception:  # noqa: BLE001 - an exec then compiles the profile itself
            pass

    def handoff(self) -> dict[str, Any]:
        """What the monitor needs (see the module doc): run in this process at first, it execs
        itself small once the container has been running a while."""
        assert self.listener is not None
        handoff: dict[str, Any] = {
            **{k: self.a.get(k) for k in ("id", "state_dir", "bundle", "tty", "open_stdin", "stdin_once",
                                          "cgroup_path", "runtime", "runtime_root", "runtime_path",
                                          "log_path", "log_opts")},
            "listener": self.listener.detach(), "outputs": {str(fd): k for fd, k in self.outputs.items()},
            "stdin_fd": self.stdin_fd, "master": self.master, "mounted": self.mounted, "pid": self.pid,
            "status": self.status, "started_at": self.started_at,
        }
        try:
            from agent.runtime.cgroups import detect

            manager = detect()
            handoff["cgroup_dirs"] = [str(d) for d in manager.dirs(self.a["cgroup_path"])]
            oom = manager.oom_file(self.a["cgroup_path"])
            handoff["oom_file"] = str(oom) if oom else ""
        except OSError:
            pass
        handoff["clients"] = []
        if self.control >= 0:
            attach = dict(self.a["attach"])
            handoff["clients"].append({"fd": self.control, "mode": "attach", "stdin": bool(attach.get("stdin")),
                                       "streams": [s for s, on in ((p.STDOUT, attach.get("stdout", True)),
                                                                   (p.STDERR, attach.get("stderr", True))) if on]})
        self.listener = None  # detached: the monitor owns the fd now
        self.control = -1
        self.save_seccomp()
        return handoff


def _relative_lowerdirs(options: list[str]) -> tuple[str, list[str]]:
    """Make ``lowerdir=`` paths relative to their common parent (100+ layers fit a page)."""
    out = []
    cwd = ""
    for opt in options:
        if opt.startswith("lowerdir="):
            dirs = opt.removeprefix("lowerdir=").split(":")
            cwd = os.path.commonpath(dirs)
            if cwd in dirs:
                cwd = os.path.dirname(cwd)
            opt = "lowerdir=" + ":".join(os.path.relpath(d, cwd) for d in dirs)
        out.append(opt)
    return cwd, out


def _read_assignment(fd: int) -> dict[str, Any] | None:
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            return None
        buf += chunk
    return dict(json.loads(buf))


def _warm() -> None:
    """Work every container start would repeat, done while the shim waits in the pool."""
    from agent.runtime.cgroups import detect

    try:
        detect()
    except OSError:
        pass
    try:
        from agent.runtime import seccomp
        from agent.runtime.spec import DEFAULT_CAPABILITIES

        seccomp.load_binding()
        seccomp.compile_bpf(seccomp.default_profile(capabilities=list(DEFAULT_CAPABILITIES)))
    except Exception:  # noqa: BLE001 - a container with a profile reports it at start
        pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = int(sys.argv[1]) if len(sys.argv) > 1 else CONTROL_FD
    _warm()
    assignment = _read_assignment(control)
    if assignment is None:
        os._exit(0)
    if os.fork():
        os._exit(0)  # skiffd reaps this parent; the shim lives on re-parented
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    sc.LinuxSyscalls().set_child_subreaper()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    launcher = Launcher(assignment, control)
    try:
        launcher.setup()
    except BaseException as exc:  # noqa: BLE001 - reported to the agent, then undone
        launcher.abort()
        message: dict[str, Any] = {"error": str(exc) or type(exc).__name__}
        if isinstance(exc, ContainerStartError):
            message.update(stage=exc.stage, exit_code=exc.exit_code)
        launcher.report(message)
        os._exit(1)
    launcher.report({"pid": launcher.pid, "shim_pid": os.getpid(), **launcher.state()})
    try:
        monitor = Monitor(launcher.handoff(), shed_after=SHED_AFTER)
    except BaseException as exc:  # noqa: BLE001 - the container is running: say why we cannot watch it
        print(f"shim {launcher.id}: cannot start the monitor: {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)
    run_monitor(monitor)
