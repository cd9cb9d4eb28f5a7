"""The shim's monitor: one small process per container, serving its socket until it exits.

The launcher (:mod:`agent.shim.launch`) sets the container up, then execs
``python -S -m agent.shim.monitor HANDOFF`` in the same process (so it stays
the container's parent and subreaper) with the fds it keeps: the listening
socket, the container's output pipes or pty master, its stdin and its clients.  The exec drops every
module the set-up needed; this one imports only light standard modules, so a
container costs ~11 MB of RSS, and imports the runtime only to exec, to start
a created runc container, or at the end.

One ``selectors`` loop, no thread: the container's output goes to the
json-file log and to attached clients; stdin and resizes come from them.
When PID 1 exits it drains the output, reads the OOM count, deletes the
container from the executor (cgroup included), unmounts the root, writes
``exit.json`` for a restarted agent, tells its waiters and exits.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import signal
import socket
import sys
import time

from agent.containers.logwriter import LogWriter
from agent.shim import protocol as p
from agent.shim.execs import ExecFailed, ExecMixin, ExecSession, _set_winsize

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

READ_CHUNK = 65536
#: stop reading the container's output while an attached client has this much unsent
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
#: how long output may keep flowing after PID 1 exited (an escaped writer cannot hold us)
DRAIN_TIMEOUT = 2.0
#: the launcher's hand-off, beside the socket
HANDOFF = "monitor.json"
#: the container's compiled seccomp filter, for exec helpers
SECCOMP_BPF = "seccomp.bpf"


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


class Monitor(ExecMixin):
    def __init__(self, h: dict[str, Any], shed_after: float | None = None) -> None:
        self.handoff_base = {k: h.get(k) for k in (
            "id", "state_dir", "bundle", "tty", "open_stdin", "stdin_once", "cgroup_path", "runtime",
            "runtime_root", "runtime_path", "log_path", "log_opts", "mounted", "pid", "status", "started_at",
            "cgroup_dirs", "oom_file")}
        self.shed_at = None if shed_after is None else time.monotonic() + shed_after
        self.id: str = h["id"]
        self.state_dir: str = h["state_dir"]
        self.bundle: str = h["bundle"]
        self.rootfs = os.path.join(self.bundle, "rootfs")
        self.tty = bool(h.get("tty"))
        self.open_stdin = bool(h.get("open_stdin"))
        self.stdin_once = bool(h.get("stdin_once"))
        self.cgroup_path: str = h["cgroup_path"]
        self.runtime: str = h.get("runtime") or "builtin"
        self.runtime_root: str = h["runtime_root"]
        self.runtime_path: str = h.get("runtime_path") or ""
        opts = h.get("log_opts") or {}
        self.log = LogWriter(h["log_path"], int(opts.get("max_size", -1)), int(opts.get("max_file", 1)))
        self.log.adopt(h.get("log_pending") or {})
        self._executor: Any = None
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = socket.socket(fileno=int(h["listener"]))
        self.listener.setblocking(False)
        self.clients: dict[int, Client] = {}
        self.outputs: dict[int, int] = {int(fd): kind for fd, kind in h["outputs"].items()}
        self.reading = True
        self.stdin_fd = int(h["stdin_fd"])
        self.stdin_buf = bytearray()
        self.stdin_closing = False
        self.master = int(h["master"])
        self.mounted = bool(h["mounted"])
        self.pid = int(h["pid"])
        self.status: str = h["status"]
        self.started_at = int(h["started_at"])
        self.cgroup_dirs: list[str] = list(h.get("cgroup_dirs") or [])
        self.oom_file: str = h.get("oom_file") or ""
        self.exit_code: int | None = None
        self.exited_at = 0.0
        self.sessions: dict[int, ExecSession] = {}   # pid -> session
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for c in h.get("clients") or []:  # e.g. the agent's launch socket, an attach stream (docker run)
            sock = socket.socket(fileno=int(c["fd"]))
            sock.setblocking(False)
            sock.set_inheritable(False)
            client = Client(sock)
            client.mode = str(c["mode"])
            client.streams = {int(s) for s in c.get("streams") or []}
            client.stdin = bool(c.get("stdin")) and self.open_stdin
            self.clients[sock.fileno()] = client
        for fd in (*self.outputs, self.stdin_fd, self.master):
            if fd >= 0:
                os.set_inheritable(fd, False)
        self.listener.set_inheritable(False)

    @property
    def executor(self) -> Any:
        """The runtime's executor, imported on first use (start of runc, exec, the end)."""
        if self._executor is None:
            from pathlib import Path

            from agent.runtime.executor import BuiltinExecutor, RuncExecutor

            root = Path(self.runtime_root)
            self._executor = (BuiltinExecutor(root, fork=True) if self.runtime == "builtin"
                              else RuncExecutor(root, runc=self.runtime_path or self.runtime))
        return self._executor

    # --- the loop ----------------------------------------------------------------

    def serve(self) -> None:
        assert self.listener is not None
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        for client in self.clients.values():
            self.sel.register(client.sock, selectors.EVENT_READ, client)
        for fd in self.outputs:
            self.sel.register(fd, selectors.EVENT_READ, "output")
        self.reap()
        while True:
            timeout: float | None = None
            if self.shed_at is not None and self.exit_code is None:
                timeout = self.shed_at - time.monotonic()
                if timeout <= 0:
                    if self.quiescent():
                        self.shed()  # does not return
                    self.shed_at = time.monotonic() + 1.0
                    timeout = 1.0
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
        elif kind == p.CLOSE_STDIN and client.stdin and self.stdin_once and not self.tty:
            self.close_stdin(when_flushed=True)  # docker: an attach's EOF closes stdin only with StdinOnce
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

    # --- shedding: exec'ing ourselves small --------------------------------------------

    def quiescent(self) -> bool:
        """Nothing in flight that an exec would lose: no exec session, no buffered bytes."""
        return (not self.sessions and not self.stdin_buf
                and all(c.mode in ("attach", "wait") and not c.out and not c.inbuf and not c.frames.buf
                        and not c.closing for c in self.clients.values()))

    def shed(self) -> None:
        """Exec a fresh interpreter running this monitor with the same fds (pid, children and
        subreaper status stay: it is the same process)."""
        assert self.listener is not None
        fds = [c.sock.fileno() for c in self.clients.values()]
        clients = [{"fd": c.sock.fileno(), "mode": c.mode, "stdin": c.stdin, "streams": sorted(c.streams)}
                   for c in self.clients.values()]
        handoff = {**self.handoff_base, "listener": self.listener.fileno(), "stdin_fd": self.stdin_fd,
                   "master": self.master, "outputs": {str(fd): k for fd, k in self.outputs.items()},
                   "status": self.status, "started_at": self.started_at, "clients": clients,
                   "log_pending": self.log.pending()}
        for fd in [self.listener.fileno(), *self.outputs, self.stdin_fd, self.master, *fds]:
            if fd >= 0:
                os.set_inheritable(fd, True)
        self.log.close_fd()
        path = os.path.join(self.state_dir, HANDOFF)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(handoff, f)
        signal.set_wakeup_fd(-1)
        # -c rather than -m: runpy and importlib.util would stay resident for nothing
        os.execv(sys.executable, [sys.executable, "-S", "-c", "from agent.shim.monitor import main; main()", path])

    # --- the end ---------------------------------------------------------------------

    def finish(self) -> None:
        self.log.close()
        self.close_stdin()
        oom = _oom_killed(self.oom_file)
        error = ""
        try:
            if self.runtime == "builtin" and self.cgroup_dirs:
                self.delete_builtin()
            else:
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

    def delete_builtin(self, timeout: float = 5.0) -> None:
        """What ``BuiltinExecutor.delete`` does, from the paths the launcher handed over, so the
        exit path imports nothing: kill what is left in the cgroup, remove it, drop the state."""
        procs = os.path.join(self.cgroup_dirs[0], "cgroup.procs")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(procs, encoding="ascii") as f:
                    left = [int(pid) for pid in f.read().split()]
            except FileNotFoundError:
                left = []
            if not left:
                break
            if time.monotonic() >= deadline:
                raise OSError(errno.EBUSY, f"cgroup {self.cgroup_path} still has processes {left}")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.reap()
            time.sleep(0.002)
        for d in reversed(self.cgroup_dirs):
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    time.sleep(0.005)
        state = os.path.join(self.runtime_root, self.id)
        for name in ("state.json", "state.tmp"):
            try:
                os.unlink(os.path.join(state, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(state)
        except OSError:
            pass

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
            import ctypes  # at the end only; the runtime's syscalls module would cost ~15 ms here

            libc = ctypes.CDLL(None, use_errno=True)
            libc.umount2(os.fsencode(self.rootfs), 2)  # MNT_DETACH; a failure leaves it to the agent
            self.mounted = False

    def cleanup_socket(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for name in (p.SOCKET, p.PID_FILE, HANDOFF, SECCOMP_BPF):
            try:
                os.unlink(os.path.join(self.state_dir, name))
            except FileNotFoundError:
                pass


def _oom_killed(path: str) -> bool:
    """Whether the cgroup's ``oom_kill`` counter (v1 memory.oom_control, v2 memory.events) moved."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value) > 0
    except (OSError, ValueError):
        pass
    return False


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        handoff = json.load(f)
    run_monitor(Monitor(handoff))


def run_monitor(monitor: Monitor) -> None:
    """Serve until the container is gone, then exit the process."""
    signal.set_wakeup_fd(monitor.wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        monitor.serve()
    except BaseException as exc:  # noqa: BLE001 - last words on stderr (the shim's log)
        print(f"shim {monitor.id}: {exc!r}", file=sys.stderr, flush=True)
        raise
    os._exit(0)


if __name__ == "__main__":
    main()
