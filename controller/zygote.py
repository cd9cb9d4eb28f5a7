"""The zygote: one warm interpreter per user that forks a child for each ``skiff`` command.

Started by :mod:`controller.launch` as ``python -P -m controller.zygote SOCKET PERSIST`` in a
session of its own.  It holds ``SOCKET.lock`` for its life (so only one starts), imports the CLI
and everything a common command needs, binds the owner-only ``SOCKET`` and serves: each
connection (from the same user only) brings a command, and a forked child takes on the caller's
standard streams, working directory, umask, environment and arguments, and runs the CLI.  The
caller gets the child's pid, then its wait status.  A caller that goes away takes its child with
it (SIGKILL to the child's process group, as a killed ``skiff`` process would have ended).

It imports no module whose import reads the caller's environment or working directory (ansible's
configuration is read at import, so inventories are imported by the child), and it never starts
gRPC's threads: a channel is only ever made in a child, after the fork.
"""

from __future__ import annotations

import fcntl
import importlib
import io
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass

from controller.launch import MAGIC

#: imported before serving: what ``skiff run``, ``ps``, ``logs``, ``exec``, ``images`` ... reach for
PRELOAD = (
    "asyncio", "grpc", "grpc.aio", "click", "controller.main", "controller.cli", "controller.client",
    "controller.fanout", "controller.prefix", "controller.render", "controller.templates",
    "controller.terminal", "controller.targets", "controller.commands.run", "controller.commands.containers",
    "controller.commands.images", "controller.commands.system", "skiff.v1.containers_pb2_grpc",
    "skiff.v1.images_pb2_grpc", "skiff.v1.system_pb2_grpc", "google.protobuf.json_format",
    "controller.ssh",
)
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8 << 20
#: how often an idle zygote checks that its socket is still the one callers find
TICK = 30.0


class BadRequest(Exception):
    """A connection that did not bring a well-formed command."""


@dataclass
class Command:
    argv: list[str]
    environ: dict[bytes, bytes]
    umask: int
    fds: list[int]


@dataclass
class Child:
    pid: int
    pidfd: int
    conn: socket.socket


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
    if len(data) != at + 4 or len(fds) != 4 or not argv:
        raise BadRequest("malformed request")
    environ = dict(item.partition(b"=")[::2] for item in env)
    return Command([os.fsdecode(a) for a in argv], environ, int.from_bytes(data[at:], "big"), fds)


def receive(conn: socket.socket) -> Command:
    """Read one command: the fds come with the first bytes."""
    conn.settimeout(REQUEST_TIMEOUT)
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
            chunk = conn.recv(min(size - len(body), 1 << 20))
            if not chunk:
                raise BadRequest("truncated request")
            body += chunk
        return parse(bytes(body), fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder)


def become(command: Command) -> None:
    """In the forked child: take on the caller's process state, then run the CLI (never returns)."""
    os.setpgid(0, 0)
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
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    streams = {
        "stdin": io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding="utf-8"),
        "stdout": io.TextIOWrapper(io.open(1, "wb", buffering=0 if unbuffered else -1, closefd=False), encoding="utf-8",
                                   line_buffering=os.isatty(1), write_through=unbuffered),
        "stderr": io.TextIOWrapper(io.open(2, "wb", buffering=0 if unbuffered else -1, closefd=False),
                                   encoding="utf-8", errors="backslashreplace",
                                   line_buffering=True, write_through=unbuffered),
    }
    for name, stream in streams.items():  # as the interpreter would have made them for the caller's fds
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.argv = command.argv
    from controller.main import main

    main()
    os._exit(0)


class Zygote:
    def __init__(self, path: str, persist: float) -> None:
        self.path = path
        self.persist = persist
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, Child] = {}  # by pidfd
        self.by_conn: dict[int, Child] = {}  # by the connection's fd
        self.listener: socket.socket | None = None
        self.inode = 0
        self.lock = -1

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
        self.selector.register(listener, selectors.EVENT_READ, "accept")
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
                if key.data == "accept":
                    self.accept()
                elif key.data == "exit":
                    self.reap(self.children[key.fd])
                else:
                    self.caller_gone(self.by_conn[key.fd])
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
            if peer_uid(conn) != os.getuid():
                raise BadRequest("another user")
            command = receive(conn)
        except (OSError, BadRequest):
            conn.close()
            return
        try:
            pid = os.fork()
        except OSError:
            for fd in command.fds:
                os.close(fd)
            conn.close()
            return
        if pid == 0:
            try:
                self.close_in_child(conn)
                become(command)
            finally:
                os._exit(125)
        for fd in command.fds:
            os.close(fd)
        child = Child(pid, os.pidfd_open(pid), conn)
        conn.setblocking(True)
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            conn.sendall(b"P" + pid.to_bytes(4, "big"))
        except OSError:
            pass
        conn.setblocking(False)
        self.children[child.pidfd] = child
        self.by_conn[conn.fileno()] = child
        self.selector.register(child.pidfd, selectors.EVENT_READ, "exit")
        self.selector.register(conn, selectors.EVENT_READ, "caller")

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
        _, status = os.waitpid(child.pid, 0)
        self.forget(child)
        try:
            child.conn.setblocking(True)
            child.conn.settimeout(REQUEST_TIMEOUT)
            child.conn.sendall(b"S" + (status & 0xFFFFFFFF).to_bytes(4, "big"))
        except OSError:
            pass
        child.conn.close()

    def caller_gone(self, child: Child) -> None:
        """The caller's connection became readable: it closed (nothing else is ever sent), so the
        command it was waiting for is ended with it."""
        try:
            if child.conn.recv(1, socket.MSG_PEEK):
                child.conn.recv(4096)
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.selector.unregister(child.conn)
        del self.by_conn[child.conn.fileno()]
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def forget(self, child: Child) -> None:
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        del self.children[child.pidfd]
        if child.conn.fileno() in self.by_conn:
            self.selector.unregister(child.conn)
            del self.by_conn[child.conn.fileno()]

    def close(self) -> None:
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


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not hasattr(os, "pidfd_open"):
        return 2
    os.closerange(3, 1 << 16)  # nothing of the first caller's but /dev/null on 0-2
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
