"""``exec`` sessions inside the shim's monitor: a process joined to the running container,
its stdio (pipes, or a pty from the container's devpts) and the one client following it.

The runtime modules are imported on the first exec only: a monitor that never
execs stays small.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import selectors
import struct
import termios

from agent.shim import protocol as p

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from agent.shim.monitor import Client

READ_CHUNK = 65536
#: pty ioctls Python's termios does not name (as agent.runtime.init)
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441


class ExecFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ExecSession:
    """One ``exec``: its process, its stdio, and the one client that follows it."""

    def __init__(self, exec_id: str, client: Client | None, tty: bool) -> None:
        self.id = exec_id
        self.client = client
        self.tty = tty
        self.pid = 0
        self.outputs: dict[int, int] = {}
        self.stdin_fd = -1
        self.master = -1
        self.exit_code: int | None = None


class ExecMixin:
    """The exec half of :class:`agent.shim.monitor.Monitor`."""

    if TYPE_CHECKING:  # provided by the Monitor
        id: str
        state_dir: str
        pid: int
        bundle: str
        cgroup_path: str
        runtime: str
        runtime_root: str
        runtime_path: str
        sessions: dict[int, ExecSession]
        sel: selectors.BaseSelector

        @property
        def executor(self) -> Any: ...

        def send(self, client: Client, data: bytes) -> None: ...

        def client_flush(self, client: Client) -> None: ...

        def reap(self) -> None: ...

    def start_exec(self, client: Client, req: dict[str, Any]) -> ExecSession:
        tty = bool(req.get("tty"))
        want_stdin = bool(req.get("stdin"))
        session = ExecSession(str(req.get("id") or ""), client, tty)
        child_ends: list[int] = []
        if tty:
            session.master, slave = _container_pty(self.pid)
            os.set_blocking(session.master, False)
            size = req.get("size")
            if size:
                _set_winsize(session.master, int(size[0]), int(size[1]))
            session.outputs[session.master] = p.STDOUT
            if want_stdin:
                session.stdin_fd = session.master
            stdio = (slave, slave, slave)
            child_ends.append(slave)
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            session.outputs.update({out_r: p.STDOUT, err_r: p.STDERR})
            if want_stdin:
                in_r, session.stdin_fd = os.pipe2(os.O_CLOEXEC)
            else:
                in_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            stdio = (in_r, out_w, err_w)
            child_ends += [in_r, out_w, err_w]
        try:
            session.pid = self._spawn_exec(dict(req["process"]), stdio, tty)
        except BaseException:
            for fd in [*session.outputs, session.stdin_fd]:
                if fd >= 0 and fd != session.master:
                    os.close(fd)
            if session.master >= 0:
                os.close(session.master)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        for fd in session.outputs:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, session)
        self.sessions[session.pid] = session
        return session

    def _spawn_exec(self, process: dict[str, Any], stdio: tuple[int, int, int], tty: bool) -> int:
        """Start ``process`` in the container from a forked helper, which alone imports the
        runtime (this monitor stays small); the helper reports the process's pid."""
        process["terminal"] = tty and self.runtime == "builtin"  # runc: no console socket
        with open(os.path.join(self.bundle, "config.json"), encoding="utf-8") as f:
            seccomp = json.load(f).get("linux", {}).get("seccomp")
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        try:
            helper = os.fork()
            if helper == 0:  # pragma: no cover - the child never returns
                os.close(sync_r)
                _exec_helper(self.runtime, self.runtime_root, self.runtime_path, self.id, self.pid, process,
                             self.cgroup_path, stdio, sync_w, seccomp, os.path.join(self.state_dir, "seccomp.bpf"))
            os.close(sync_w)
            sync_w = -1
            messages = p.read_json_lines(sync_r, timeout=30.0)
        finally:
            os.close(sync_r)
            if sync_w >= 0:
                os.close(sync_w)
        try:
            os.waitpid(helper, 0)
        except ChildProcessError:
            pass
        pid = next((int(m["pid"]) for m in messages if "pid" in m), 0)
        error = next((m for m in messages if "error" in m), None)
        if error is not None:
            if pid:  # the process failed before exec: it exits by itself; collect it below
                self.sessions[pid] = ExecSession("", None, False)
            stage = f"{error['stage']}: " if error.get("stage") else ""
            raise ExecFailed(f"exec failed: {stage}{error['error']}", int(error.get("exit_code") or 126))
        if not pid:
            raise ExecFailed("exec failed: the helper did not report a pid", 126)
        return pid

    def read_exec_output(self, session: ExecSession, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.sel.unregister(fd)
            del session.outputs[fd]
            if fd == session.master:
                session.master = -1
                if session.stdin_fd == fd:
                    session.stdin_fd = -1
            os.close(fd)
            self.maybe_end_exec(session)
            return
        if session.client is not None:
            self.send(session.client, p.frame(session.outputs[fd], data))

    def exec_frame(self, session: ExecSession, kind: int, payload: bytes) -> None:
        if kind == p.STDIN and session.stdin_fd >= 0:
            try:
                os.write(session.stdin_fd, payload)  # small interactive writes; a full pipe blocks briefly
            except OSError:
                pass
        elif kind == p.CLOSE_STDIN:
            self._close_exec_stdin(session)
        elif kind == p.RESIZE and session.master >= 0:
            size = json.loads(payload)
            _set_winsize(session.master, int(size["rows"]), int(size["cols"]))

    def _close_exec_stdin(self, session: ExecSession) -> None:
        if session.stdin_fd < 0:
            return
        if session.stdin_fd == session.master:
            try:
                os.write(session.master, b"\x04")
            except OSError:
                pass
            return
        os.close(session.stdin_fd)
        session.stdin_fd = -1

    def maybe_end_exec(self, session: ExecSession) -> None:
        if session.exit_code is None or session.outputs:
            return
        self.sessions.pop(session.pid, None)
        if session.stdin_fd >= 0 and session.stdin_fd != session.master:
            os.close(session.stdin_fd)
            session.stdin_fd = -1
        client = session.client
        if client is not None:
            self.send(client, p.json_frame(p.EXIT, {"exit_code": session.exit_code}))
            client.closing = True
            self.client_flush(client)

    def end_sessions(self) -> None:
        """The container is gone: exec'd processes died with it; tell their clients."""
        self.reap()
        for session in list(self.sessions.values()):
            for fd in list(session.outputs):
                self.read_exec_output(session, fd)  # what is buffered, or EOF
                if fd in session.outputs:
                    self.sel.unregister(fd)
                    del session.outputs[fd]
                    os.close(fd)
            if session.exit_code is None:
                session.exit_code = 137
            self.maybe_end_exec(session)


def _exec_helper(runtime: str, runtime_root: str, runtime_path: str, container_id: str, target_pid: int,
                 process: dict[str, Any], cgroup_path: str, stdio: tuple[int, int, int], sync_fd: int,
                 seccomp: dict[str, Any] | None, bpf_path: str = "") -> None:
    """In the forked helper: start ``process`` with the container's runtime; never returns."""
    try:
        if runtime == "builtin":
            from agent.runtime import nsexec

            if seccomp and bpf_path and os.path.exists(bpf_path):
                from agent.runtime import seccomp as filters

                with open(bpf_path, "rb") as f:
                    filters._BPF_CACHE[filters.profile_key(seccomp)] = f.read()

            nsexec.join(target_pid, process, cgroup_path, stdio, sync_fd, seccomp)
        from pathlib import Path

        from agent.runtime.executor import RuncExecutor, Stdio

        pid = RuncExecutor(Path(runtime_root), runc=runtime_path or runtime).exec(container_id, process,
                                                                                 Stdio(*stdio))
        os.write(sync_fd, p.request({"pid": pid}))
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001 - reported on the sync pipe
        try:
            os.write(sync_fd, p.request({"error": str(exc) or type(exc).__name__,
                                         "exit_code": int(getattr(exc, "exit_code", 126) or 126)}))
        finally:
            os._exit(126)


def _container_pty(pid: int) -> tuple[int, int]:
    """A pty from the container's own devpts (``tty`` inside names it), else the host's."""
    try:
        master = os.open(f"/proc/{pid}/root/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return os.openpty()
    try:
        fcntl.ioctl(master, TIOCSPTLCK, b"\0\0\0\0")
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        return os.openpty()
    return master, slave


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
