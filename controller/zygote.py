"""The zygote: one warm interpreter per user that forks a child for each ``skiff`` command.

Started by :mod:`controller.launch` as ``python -P -m controller.zygote SOCKET PERSIST`` in a
session of its own.  It holds ``SOCKET.lock`` for its life (so only one starts), imports the CLI
and everything a common command needs, binds the owner-only ``SOCKET`` and serves: each
connection, from a process of the same user in the same namespaces and root, brings a command,
and a forked child takes on the caller's standard streams, working directory, umask, signal mask
and ignored signals, environment and arguments, and runs the CLI.  The child waits until the
caller has its pid (so a caller that failed before can run the command itself without running it
twice); the caller then gets its wait status.  A caller that goes away takes its child with it
(SIGKILL to the child's process group, as a killed ``skiff`` process would have ended), and so
does the zygote's own end (SIGTERM, or a crash: the children die with it, PR_SET_PDEATHSIG).

It imports no module whose import reads the caller's working directory (ansible reads its
configuration at import, so inventories are imported by the child), and it never starts gRPC's
threads: a channel is only ever made in a child, after the fork.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import io
import os
import resource
import selectors
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

from controller.launch import MAGIC, NAMESPACES

#: imported before serving: what ``skiff run``, ``ps``, ``logs``, ``exec``, ``images`` ... reach for
PRELOAD = (
    "asyncio", "grpc", "grpc.aio", "click", "controller.main", "controller.cli", "controller.client",
    "controller.fanout", "controller.prefix", "controller.render", "controller.templates",
    "controller.terminal", "controller.targets", "controller.commands.run", "controller.commands.containers",
    "controller.commands.images", "controller.commands.system", "skiff.v1.containers_pb2_grpc",
    "skiff.v1.images_pb2_grpc", "skiff.v1.system_pb2_grpc", "google.protobuf.json_format",
    "controller.ssh", "agent.runtime.imageconfig", "agent.containers.jsonlog",
)
#: the whole request must arrive within this (a slow caller holds up the others no longer)
REQUEST_DEADLINE = 2.0
MAX_REQUEST = 8 << 20
#: how often an idle zygote checks that its socket is still the one callers find
TICK = 30.0
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


class BadRequest(Exception):
    """A connection that did not bring a well-formed command, or came from elsewhere."""


@dataclass
class Command:
    argv: list[str]
    environ: dict[bytes, bytes]
    umask: int
    blocked: int
    ignored: int
    fds: list[int]


@dataclass
class Child:
    pid: int
    pidfd: int
    conn: socket.socket
    caller_gone: bool = False


def unpack(data: bytes, at: int) -> tuple[list[bytes], int]:
    """:func:`controller.launch.pack`'s inverse: the items and the offset after them."""
    def take(n: int) -> bytes:
        nonlocal at
        if at + n > len(data):
            raise BadRequest("truncated request")
        chunk = data[at:at + n]
        at += n
        return chunk

    count = int.from_bytes(take(4), "big")
    return [take(int.from_bytes(take(4), "big")) for _ in range(count)], at


def parse(data: bytes, fds: list[int]) -> Command:
    argv, at = unpack(data, 0)
    env, at = unpack(data, at)
    if len(data) != at + 20 or len(fds) != 4 or not argv:
        raise BadRequest("malformed request")
    environ = dict(item.partition(b"=")[::2] for item in env)
    return Command([os.fsdecode(a) for a in argv], environ, int.from_bytes(data[at:at + 4], "big"),
                   int.from_bytes(data[at + 4:at + 12], "big"), int.from_bytes(data[at + 12:], "big"), fds)


def receive(conn: socket.socket) -> Command:
    """Read one command, all of it within REQUEST_DEADLINE: the fds come with the first bytes."""
    deadline = time.monotonic() + REQUEST_DEADLINE

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BadRequest("request too slow")
        return left

    conn.settimeout(remaining())
    fds: list[int] = []
    data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4)]
    try:
        if data[:4] != MAGIC or len(data) < 8:
            raise BadRequest("not a skiff request")
        size = int.from_bytes(data[4:8], "big")
        if size > MAX_REQUEST:
            raise BadRequest("request too large")
        body = bytearray(data[8:])
        while len(body) < size:
            conn.settimeout(remaining())
            chunk = conn.recv(min(size - len(body), 1 << 20))
            if not chunk:
                raise BadRequest("truncated request")
            body += chunk
        return parse(bytes(body), fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def check_peer(conn: socket.socket) -> None:
    """The caller must be this user's process, in this zygote's namespaces and root: a process
    in a sandbox that can see the socket does not get its commands run outside it."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid = (int.from_bytes(creds[i:i + 4], sys.byteorder) for i in (0, 4))
    if uid != os.getuid():
        raise BadRequest("another user")
    try:
        for name in NAMESPACES:
            if os.readlink(f"/proc/{pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}"):
                raise BadRequest(f"another {name} namespace")
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/")
    except OSError as exc:
        raise BadRequest(f"caller {pid} cannot be checked: {exc}") from None
    if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
        raise BadRequest("another root directory")


def _signals(mask: int) -> set[int]:
    return {n for n in range(1, signal.NSIG) if mask & (1 << (n - 1))}


def become(command: Command, go: int, zygote_pid: int, stdio: dict[str, tuple[str, str]]) -> None:
    """In the forked child: wait for the zygote's word (``go`` readable), take on the caller's
    process state, then run the CLI (never returns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.prctl(PR_SET_NAME, b"skiff")  # what ps -e and pgrep show (the command line stays the zygote's)
    if os.getppid() != zygote_pid or os.read(go, 1) != b"g":
        os._exit(125)  # the zygote died, or could not tell the caller: the caller runs it itself
    os.close(go)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # the zygote did it first
    for target, fd in zip((0, 1, 2), command.fds):
        os.dup2(fd, target)
    os.fchdir(command.fds[3])
    for fd in command.fds:
        os.close(fd)
    os.umask(command.umask)
    os.environb.clear()
    os.environb.update(command.environ)
    time.tzset()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for default in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(default, signal.SIG_DFL)
    for ignored in _signals(command.ignored) - {signal.SIGKILL, signal.SIGSTOP}:
        signal.signal(ignored, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, _signals(command.blocked) - {signal.SIGKILL, signal.SIGSTOP})
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    streams = {  # as the interpreter made the zygote's own, now on the caller's fds
        "stdin": io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding=stdio["stdin"][0],
                                  errors=stdio["stdin"][1], newline="\n"),
        "stdout": io.TextIOWrapper(io.open(1, "wb", buffering=0 if unbuffered else -1, closefd=False),
                                   encoding=stdio["stdout"][0], errors=stdio["stdout"][1], newline="\n",
                                   line_buffering=os.isatty(1), write_through=unbuffered),
        "stderr": io.TextIOWrapper(io.open(2, "wb", buffering=0 if unbuffered else -1, closefd=False),
                                   encoding=stdio["stderr"][0], errors=stdio["stderr"][1], newline="\n",
                                   line_buffering=True, write_through=unbuffered),
    }
    for name, stream in streams.items():
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.argv = command.argv
    from controller.main import main

    try:
        main()  # leaves with os._exit
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as the interpreter ends on an uncaught Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - what the interpreter would print at the top level
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


class Zygote:
    def __init__(self, path: str, persist: float) -> None:
        self.path = path
        self.persist = persist
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, Child] = {}  # by pid
        self.listener: socket.socket | None = None
        self.inode = 0
        self.lock = -1
        #: the interpreter's own choice of encoding and errors for standard streams, for the children's
        self.stdio = {name: (getattr(sys, name).encoding, getattr(sys, name).errors)
                      for name in ("stdin", "stdout", "stderr")}

    def claim(self) -> bool:
        """The lock for ``path``: false when another zygote holds it."""
        self.lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def listen(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        listener.listen(128)
        listener.setblocking(False)
        self.inode = os.stat(self.path).st_ino
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, None)
        with open(self.path + ".pid", "w") as pidfile:
            pidfile.write(f"{os.getpid()}\n")

    def still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def serve(self) -> None:
        idle_since = time.monotonic()
        while True:
            left = self.persist - (time.monotonic() - idle_since)
            events = self.selector.select(timeout=TICK if self.children else max(0.05, min(TICK, left)))
            for key, _ in events:
                # an earlier event of this round may have closed this fd (and a new one reused it)
                if self.selector.get_map().get(key.fd) is not key:
                    continue
                try:
                    if key.data is None:
                        self.accept()
                    elif key.fd == key.data.pidfd:
                        self.reap(key.data)
                    else:
                        self.caller_closed(key.data)
                except Exception:  # noqa: BLE001 - one caller's trouble must not end the others' commands
                    traceback.print_exc()
            if self.children or events:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.persist:
                return
            if not self.still_ours():
                if not self.children:
                    return
                self.persist = 0  # leave once the running commands are done

    def accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            check_peer(conn)
            command = receive(conn)
        except (OSError, BadRequest):
            conn.close()
            return
        go_read, go_write = os.pipe()
        me = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for fd in (*command.fds, go_read, go_write):
                os.close(fd)
            conn.close()
            return
        if pid == 0:
            try:
                os.close(go_write)
                self.close_in_child(conn)
                become(command, go_read, me, self.stdio)
            finally:
                os._exit(125)
        os.close(go_read)
        for fd in command.fds:
            os.close(fd)
        try:
            os.setpgid(pid, pid)  # before the caller can signal the group (the child does it too)
        except OSError:
            pass
        child = Child(pid, os.pidfd_open(pid), conn)
        self.children[pid] = child
        self.selector.register(child.pidfd, selectors.EVENT_READ, child)
        try:
            conn.settimeout(REQUEST_DEADLINE)
            conn.sendall(b"P" + pid.to_bytes(4, "big"))
            os.write(go_write, b"g")
        except OSError:
            child.caller_gone = True  # the child reads EOF and leaves without running anything
        finally:
            os.close(go_write)
        if not child.caller_gone:
            conn.setblocking(False)
            self.selector.register(conn, selectors.EVENT_READ, child)

    def close_in_child(self, conn: socket.socket) -> None:
        """The child keeps nothing of the zygote's: not the listener, the lock, the selector, nor
        any other caller's connection or child."""
        self.selector.close()
        if self.listener is not None:
            self.listener.close()
        os.close(self.lock)
        for child in self.children.values():
            os.close(child.pidfd)
            child.conn.close()
        conn.close()

    def reap(self, child: Child) -> None:
        try:
            _, status = os.waitpid(child.pid, 0)
        except ChildProcessError:
            status = 125 << 8
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        del self.children[child.pid]
        if not child.caller_gone:
            self.selector.unregister(child.conn)
            try:
                child.conn.setblocking(True)
                child.conn.settimeout(REQUEST_DEADLINE)
                child.conn.sendall(b"S" + (status & 0xFFFFFFFF).to_bytes(4, "big"))
            except OSError:
                pass
        child.conn.close()

    def caller_closed(self, child: Child) -> None:
        """The caller's connection became readable: it closed (nothing else is ever sent), so the
        command it was waiting for is ended with it."""
        try:
            if child.conn.recv(4096):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        child.caller_gone = True
        self.selector.unregister(child.conn)
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for child in self.children.values():  # the commands end with their zygote
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.listener is not None and self.still_ours():
            for name in (self.path, self.path + ".pid"):
                try:
                    os.unlink(name)
                except OSError:
                    pass
        self.selector.close()


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional module missing only costs its child the import
            pass


def _leave(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not hasattr(os, "pidfd_open"):
        return 2
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # nothing of the first caller's
    os.chdir("/")  # nor its working directory (each child gets its own caller's)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _leave)
    path, persist = argv[1], float(argv[2])
    zygote = Zygote(path, persist)
    if not zygote.claim():
        return 0
    preload()
    zygote.listen()
    try:
        zygote.serve()
    finally:
        zygote.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
