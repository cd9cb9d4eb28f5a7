"""The shim: one small monitor process per container (``python -S -m agent.shim``).

skiffd keeps a few shims started ahead of time, each blocked reading its
*assignment* (one JSON line) on the fd named by its argument, a socketpair to the agent; a shim that
reads EOF there exits.  Given a container, the shim

1. forks and lets its parent exit, so it is re-parented away from skiffd,
   starts a new session and becomes a child subreaper (the container's PID 1
   is re-parented to it, and so are exec'd processes' orphans);
2. binds ``<state_dir>/shim.sock``, mounts the container's root filesystem
   (overlay from the snapshotter) on ``<bundle>/rootfs``;
3. makes the container's stdio (pipes, or a pty for ``-t``) and runs the
   bundle with the executor (built-in: the init runs in a forked child of
   this single-threaded process, no fresh interpreter; or runc/crun);
4. reports ``{"pid": …}`` (or ``{"error": …}``) on fd 3 and closes it.

Then it serves its socket (see :mod:`agent.shim.protocol`) from one
``selectors`` loop with no thread: the container's output goes to the
json-file log and to attached clients; stdin and resizes come from them.
When PID 1 exits it drains the output, reads the OOM count, deletes the
container from the executor (cgroup included), unmounts the root, writes
``exit.json`` for a restarted agent, tells its waiters and exits.

It imports no asyncio, grpc or structlog: its resident size is the point.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import time
from pathlib import Path
from typing import Any

from agent.containers.jsonlog import LogOptions, LogWriter
from agent.runtime import syscalls as sc
from agent.runtime.executor import BuiltinExecutor, ContainerStartError, RuncExecutor, Stdio
from agent.runtime.init import TIOCGPTPEER, TIOCSPTLCK
from agent.shim import protocol as p

CONTROL_FD = 3
READ_CHUNK = 65536
#: stop reading the container's output while an attached client has this much unsent
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
#: how long output may keep flowing after PID 1 exited (an escaped writer cannot hold us)
DRAIN_TIMEOUT = 2.0
#: overlay options longer than this are given relative to the layers' common directory
MAX_MOUNT_DATA = 3500


class ExecFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.out = bytearray()
        self.mode = ""              # "", "attach", "wait"
        self.streams: set[int] = set()
        self.stdin = False
        self.frames = p.FrameReader()
        self.closing = False
        self.session: ExecSession | None = None


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


class Shim:
    def __init__(self, a: dict[str, Any], control: int) -> None:
        self.a = a
        self.control = control
        self.id: str = a["id"]
        self.state_dir: str = a["state_dir"]
        self.bundle = Path(a["bundle"])
        self.rootfs = str(self.bundle / "rootfs")
        self.tty = bool(a.get("tty"))
        self.open_stdin = bool(a.get("open_stdin"))
        self.stdin_once = bool(a.get("stdin_once"))
        self.cgroup_path: str = a["cgroup_path"]
        self.log = LogWriter(a["log_path"], LogOptions.from_dict(a.get("log_opts") or {}))
        runtime = a.get("runtime") or "builtin"
        self.executor: BuiltinExecutor | RuncExecutor
        if runtime == "builtin":
            self.executor = BuiltinExecutor(Path(a["runtime_root"]), fork=True)
        else:
            self.executor = RuncExecutor(Path(a["runtime_root"]), runc=a.get("runtime_path") or runtime)
        self.sys = sc.LinuxSyscalls()
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.clients: dict[int, Client] = {}
        self.outputs: dict[int, int] = {}       # fd -> STDOUT/STDERR
        self.reading = True
        self.stdin_fd = -1
        self.stdin_buf = bytearray()
        self.stdin_closing = False
        self.master = -1
        self.mounted = False
        self.pid = 0
        self.status = "creating"
        self.started_at = 0
        self.exit_code: int | None = None
        self.exited_at = 0.0
        self.sessions: dict[int, ExecSession] = {}   # pid -> session
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- set-up ----------------------------------------------------------------

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
            if self.a.get("start", True):
                process = self.executor.run(self.bundle, self.id, stdio, **kwargs)
                self.status = "running"
                self.started_at = time.time_ns()
            else:
                process = self.executor.create(self.bundle, self.id, stdio, **kwargs)
                self.status = "created"
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
        self.master = fds[0]
        os.set_blocking(self.master, False)
        size = self.a.get("size")
        if size:
            _set_winsize(self.master, int(size[0]), int(size[1]))
        self.outputs[self.master] = p.STDOUT
        if self.open_stdin:
            self.stdin_fd = self.master

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
        if self.tty:
            self.master, slave = os.openpty()
            os.set_blocking(self.master, False)
            size = self.a.get("size")
            if size:
                _set_winsize(self.master, int(size[0]), int(size[1]))
            self.outputs[self.master] = p.STDOUT
            if self.open_stdin:
                self.stdin_fd = self.master
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
        os.close(self.control)
        self.control = -1

    # --- the loop ----------------------------------------------------------------

    def serve(self) -> None:
        assert self.listener is not None
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        for fd in self.outputs:
            self.sel.register(fd, selectors.EVENT_READ, "output")
        self.reap()
        while True:
            timeout = None
            if self.exit_code is not None:
                if not self.outputs:
                    break
                timeout = max(0.0, self.exited_at + DRAIN_TIMEOUT - time.monotonic())
                if timeout == 0:
                    for fd in list(self.outputs):
                        self.close_output(fd)
                    break
            for key, events in self.sel.select(timeout):
                kind = key.data
                if kind == "listen":
                    self.accept()
                elif kind == "signal":
                    try:
                        os.read(self.wake_r, 512)
                    except BlockingIOError:
                        pass
                    self.reap()
                elif kind == "output":
                    self.read_output(key.fd)
                elif kind == "stdin":
                    self.flush_stdin()
                elif isinstance(kind, ExecSession):
                    self.read_exec_output(kind, key.fd)
                elif isinstance(kind, Client):
                    if events & selectors.EVENT_READ:
                        self.client_readable(kind)
                    if events & selectors.EVENT_WRITE and kind.sock.fileno() >= 0:
                        self.client_flush(kind)
        self.finish()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            session = self.sessions.get(pid)
            if session is not None:
                code = os.waitstatus_to_exitcode(status)
                session.exit_code = 128 - code if code < 0 else code
                self.maybe_end_exec(session)
            if pid == self.pid and self.exit_code is None:
                code = os.waitstatus_to_exitcode(status)
                self.exit_code = 128 - code if code < 0 else code
                self.exited_at = time.monotonic()
                self.status = "exited"
                self.close_stdin()

    def read_output(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the pty's last slave closed
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.close_output(fd)
            return
        stream = self.outputs[fd]
        if self.tty:
            self.log.write_tty(data)
        else:
            self.log.write("stdout" if stream == p.STDOUT else "stderr", data)
        message = p.frame(stream, data)
        for client in list(self.clients.values()):
            if client.mode == "attach" and stream in client.streams:
                self.send(client, message)

    def close_output(self, fd: int) -> None:
        stream = self.outputs.pop(fd)
        self.sel.unregister(fd)
        if fd == self.master:
            if self.stdin_fd == fd:
                self.stdin_fd = -1
            self.master = -1
            self.log.flush_partial("stdout")
        else:
            self.log.flush_partial("stdout" if stream == p.STDOUT else "stderr")
        os.close(fd)

    def set_reading(self, on: bool) -> None:
        if on == self.reading:
            return
        self.reading = on
        for fd in self.outputs:
            if on:
                self.sel.register(fd, selectors.EVENT_READ, "output")
            else:
                self.sel.unregister(fd)

    # --- stdin ---------------------------------------------------------------------

    def write_stdin(self, data: bytes) -> None:
        if self.stdin_fd < 0 or self.stdin_closing:
            return
        pending = bool(self.stdin_buf)
        self.stdin_buf += data
        if not pending:
            self.flush_stdin()

    def flush_stdin(self) -> None:
        while self.stdin_buf and self.stdin_fd >= 0:
            try:
                n = os.write(self.stdin_fd, self.stdin_buf[:READ_CHUNK])
            except BlockingIOError:
                break
            except OSError:  # EPIPE: nobody reads stdin any more
                self.stdin_buf.clear()
                break
            del self.stdin_buf[:n]
        self._stdin_interest()
        if not self.stdin_buf and self.stdin_closing:
            self.close_stdin()

    def _stdin_interest(self) -> None:
        if self.stdin_fd < 0 or self.stdin_fd == self.master:
            return  # the pty master is registered for reading; its writes rarely block
        registered = self.sel.get_map().get(self.stdin_fd) is not None
        if self.stdin_buf and not registered:
            self.sel.register(self.stdin_fd, selectors.EVENT_WRITE, "stdin")
        elif not self.stdin_buf and registered:
            self.sel.unregister(self.stdin_fd)

    def close_stdin(self, when_flushed: bool = False) -> None:
        if self.stdin_fd < 0:
            return
        if when_flushed and self.stdin_buf:
            self.stdin_closing = True
            return
        if self.stdin_fd == self.master:
            try:
                os.write(self.master, b"\x04")  # EOF for a terminal reader
            except OSError:
                pass
            return
        if self.sel.get_map().get(self.stdin_fd) is not None:
            self.sel.unregister(self.stdin_fd)
        os.close(self.stdin_fd)
        self.stdin_fd = -1
        self.stdin_buf.clear()

    # --- clients -------------------------------------------------------------------

    def accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        client = Client(sock)
        self.clients[sock.fileno()] = client
        self.sel.register(sock, selectors.EVENT_READ, client)

    def drop(self, client: Client) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        self.sel.unregister(client.sock)
        self.clients.pop(fd, None)
        client.sock.close()
        if client.session is not None:
            client.session.client = None
            self._close_exec_stdin(client.session)
        if client.mode == "attach" and client.stdin and self.stdin_once and not self.tty:
            self.close_stdin(when_flushed=True)
        self._update_reading()

    def send(self, client: Client, data: bytes) -> None:
        if client.sock.fileno() < 0:
            return
        was_empty = not client.out
        client.out += data
        if was_empty:
            self.client_flush(client)
        elif len(client.out) > HIGH_WATER:
            self.set_reading(False)

    def client_flush(self, client: Client) -> None:
        while client.out:
            try:
                n = client.sock.send(client.out[:1 << 20])
            except BlockingIOError:
                break
            except OSError:
                self.drop(client)
                return
            del client.out[:n]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        self.sel.modify(client.sock, events, client)
        if not client.out and client.closing:
            self.drop(client)
            return
        self._update_reading()

    def _update_reading(self) -> None:
        backlog = max((len(c.out) for c in self.clients.values() if c.mode == "attach"), default=0)
        if backlog > HIGH_WATER:
            self.set_reading(False)
        elif backlog < LOW_WATER:
            self.set_reading(True)

    def client_readable(self, client: Client) -> None:
        try:
            data = client.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        if client.mode:
            try:
                frames = client.frames.feed(data)
            except ValueError:
                self.drop(client)
                return
            for kind, payload in frames:
                self.client_frame(client, kind, payload)
            return
        client.inbuf += data
        if b"\n" not in client.inbuf:
            if len(client.inbuf) > p.MAX_REQUEST:
                self.drop(client)
            return
        line, rest = client.inbuf.split(b"\n", 1)
        client.inbuf = b""
        try:
            req = json.loads(line)
            reply = self.handle(client, req)
        except Exception as exc:  # noqa: BLE001 - a bad request never takes the shim down
            reply = {"error": str(exc) or type(exc).__name__}
        if reply is not None:
            self.send(client, json.dumps(reply).encode() + b"\n")
            if not client.mode:
                client.closing = True
                self.client_flush(client)
        if client.mode and rest:
            for kind, payload in client.frames.feed(rest):
                self.client_frame(client, kind, payload)

    def client_frame(self, client: Client, kind: int, payload: bytes) -> None:
        if client.session is not None:
            self.exec_frame(client.session, kind, payload)
            return
        if kind == p.STDIN and client.stdin:
            self.write_stdin(payload)
        elif kind == p.CLOSE_STDIN and client.stdin:
            self.close_stdin(when_flushed=True)
        elif kind == p.RESIZE:
            size = json.loads(payload)
            self.resize(int(size["rows"]), int(size["cols"]))

    def resize(self, rows: int, cols: int) -> None:
        if self.master >= 0:
            _set_winsize(self.master, rows, cols)

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "status": self.status, "started_at": self.started_at,
                "exit_code": self.exit_code}

    def handle(self, client: Client, req: dict[str, Any]) -> dict[str, Any] | None:
        op = req.get("op")
        if op == "state":
            return self.state()
        if op == "attach":
            client.mode = "attach"
            client.streams = {s for s, on in ((p.STDOUT, req.get("stdout", True)),
                                               (p.STDERR, req.get("stderr", True))) if on}
            client.stdin = bool(req.get("stdin")) and self.open_stdin
            return {"ok": True, **self.state()}
        if op == "wait":
            client.mode = "wait"
            return {"ok": True, **self.state()}
        if op == "start":
            if self.status != "created":
                return {"error": f"container {self.id} is {self.status}, not created"}
            try:
                self.executor.start(self.id)
            except ContainerStartError as exc:
                return {"error": str(exc), "exit_code": exc.exit_code}
            self.status = "running"
            self.started_at = time.time_ns()
            return {"ok": True, **self.state()}
        if op == "kill":
            if self.exit_code is not None:
                return {"error": f"container {self.id} is not running"}
            sig = int(req.get("signal") or signal.SIGKILL)
            if req.get("all"):
                from agent.runtime.cgroups import detect

                detect().kill_all(self.cgroup_path, sig)
            else:
                os.kill(self.pid, sig)
            return {"ok": True}
        if op == "exec":
            if self.status != "running" or self.exit_code is not None:
                return {"error": f"container {self.id} is not running", "exit_code": 126}
            try:
                session = self.start_exec(client, req)
            except ExecFailed as exc:
                return {"error": str(exc), "exit_code": exc.exit_code}
            client.mode = "exec"
            client.session = session
            return {"ok": True, "pid": session.pid}
        if op == "resize":
            self.resize(int(req["rows"]), int(req["cols"]))
            return {"ok": True}
        if op == "close_stdin":
            self.close_stdin(when_flushed=True)
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}

    # --- exec ------------------------------------------------------------------------

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
        from agent.runtime.executor import read_messages
        from agent.runtime.init import exit_code_for

        if isinstance(self.executor, RuncExecutor):
            process["terminal"] = False  # no console socket: the pty is plain stdio
            try:
                return self.executor.exec(self.id, process, Stdio(*stdio))
            except ContainerStartError as exc:
                raise ExecFailed(str(exc), exc.exit_code) from None
        from agent.runtime import nsexec

        process["terminal"] = tty
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        try:
            with open(os.path.join(self.bundle, "config.json"), encoding="utf-8") as f:
                seccomp = json.load(f).get("linux", {}).get("seccomp")
            middle = nsexec.spawn(self.pid, process, self.cgroup_path, stdio, sync_w, seccomp)
            os.close(sync_w)
            sync_w = -1
            messages = read_messages(sync_r, until_ready=False, timeout=30)
        finally:
            os.close(sync_r)
            if sync_w >= 0:
                os.close(sync_w)
        try:
            os.waitpid(middle, 0)
        except ChildProcessError:
            pass
        pid = next((int(m["pid"]) for m in messages if "pid" in m), 0)
        error = next((m for m in messages if "error" in m), None)
        if error is not None:
            stage, err = str(error.get("stage") or "exec"), int(error.get("errno") or 0)
            if pid:  # the grandchild failed before exec: it exits by itself; collect it below
                self.sessions[pid] = ExecSession("", None, False)
            raise ExecFailed(f"exec failed: {stage}: {error['error']}", exit_code_for(stage, err))
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

    # --- the end ---------------------------------------------------------------------

    def finish(self) -> None:
        self.log.close()
        self.close_stdin()
        oom = False
        error = ""
        try:
            from agent.runtime.cgroups import detect

            oom = detect().stats(self.cgroup_path).oom_killed
        except Exception:  # noqa: BLE001 - the cgroup may be gone already
            pass
        try:
            self.executor.delete(self.id)
        except Exception as exc:  # noqa: BLE001
            error = f"delete: {exc}"
        self.unmount()
        self.end_sessions()
        code = self.exit_code if self.exit_code is not None else 255
        record = {"exit_code": code, "oom_killed": oom, "finished_at": time.time_ns(),
                  "started_at": self.started_at, "pid": self.pid, "error": error}
        _write_atomic(os.path.join(self.state_dir, p.EXIT_FILE), json.dumps(record).encode())
        message = p.json_frame(p.EXIT, record)
        for client in list(self.clients.values()):
            if client.mode in ("attach", "wait"):
                client.out += message
        self.flush_all(deadline=time.monotonic() + 5.0)
        self.cleanup_socket()

    def flush_all(self, deadline: float) -> None:
        for client in list(self.clients.values()):
            client.sock.setblocking(True)
            client.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if client.out:
                    client.sock.sendall(client.out)
            except OSError:
                pass
            client.sock.close()
        self.clients.clear()

    def unmount(self) -> None:
        if self.mounted:
            try:
                self.sys.umount2(self.rootfs, sc.MNT_DETACH)
            except OSError:
                pass
            self.mounted = False

    def cleanup_socket(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for name in (p.SOCKET, p.PID_FILE):
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


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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

        seccomp.load_binding()
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
    shim = Shim(assignment, control)
    signal.set_wakeup_fd(shim.wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        shim.setup()
    except BaseException as exc:  # noqa: BLE001 - reported to the agent, then undone
        shim.abort()
        message: dict[str, Any] = {"error": str(exc) or type(exc).__name__}
        if isinstance(exc, ContainerStartError):
            message.update(stage=exc.stage, exit_code=exc.exit_code)
        shim.report(message)
        os._exit(1)
    shim.report({"pid": shim.pid, "shim_pid": os.getpid(), **shim.state()})
    try:
        shim.serve()
    except BaseException as exc:  # noqa: BLE001 - last words on stderr (the shim's log)
        print(f"shim {shim.id}: {exc!r}", file=sys.stderr, flush=True)
        raise
    os._exit(0)
