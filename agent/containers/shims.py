"""skiffd's side of the shims: a pool started ahead of time, and asyncio clients.

A container start must not pay a fresh interpreter's start-up on the
critical path, so :class:`ShimPool` keeps a few ``python -S -m agent.shim``
processes waiting for an assignment.  Each is given one end of a socketpair;
:meth:`ShimPool.launch` writes the assignment, reads the shim's report
(``{"pid": …}`` or ``{"error": …}``) and replenishes the pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import Internal, Unavailable
from agent.shim import protocol as p

_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
LAUNCH_TIMEOUT = 30.0
REFILL_DELAY = 0.5


@dataclass
class _Idle:
    proc: subprocess.Popen[bytes]
    sock: socket.socket


class ShimLaunchError(Internal):
    """The shim could not start the container; ``exit_code`` is Docker's (125/126/127)."""

    def __init__(self, message: str, exit_code: int = 125, stage: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stage = stage


class ShimPool:
    def __init__(self, log_path: Path, size: int = 2, python: str = sys.executable) -> None:
        self.log_path = log_path
        self.size = size
        self.python = python
        self._idle: deque[_Idle] = deque()
        self._closed = False

    def _spawn(self) -> _Idle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.set_inheritable(False)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                proc = subprocess.Popen(
                    [self.python, "-S", "-m", "agent.shim", str(theirs.fileno())],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    pass_fds=[theirs.fileno()], cwd="/", start_new_session=True,
                    env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                         "PYTHONPATH": _PROJECT_ROOT})
            finally:
                theirs.close()
        return _Idle(proc, ours)

    def fill(self) -> None:
        while not self._closed and len(self._idle) < self.size:
            self._idle.append(self._spawn())

    def _take(self) -> _Idle:
        while self._idle:
            idle = self._idle.popleft()
            if idle.proc.poll() is None:
                return idle
            idle.sock.close()
        return self._spawn()

    async def launch(self, assignment: dict[str, Any]) -> tuple[dict[str, Any], socket.socket | None]:
        """Hand ``assignment`` to a shim; its report once the container is created or running.

        With ``assignment["attach"]`` the connection is also returned: the shim keeps its end
        as an attach stream (frames follow the report), so docker run needs no second connect."""
        if self._closed:
            raise Unavailable("the agent is shutting down")
        idle = self._take()
        loop = asyncio.get_running_loop()
        loop.call_later(REFILL_DELAY, self.fill)  # off the critical path: a new shim costs CPU
        keep = False
        try:
            idle.sock.setblocking(False)
            await loop.sock_sendall(idle.sock, p.request(assignment))
            async with asyncio.timeout(LAUNCH_TIMEOUT):
                buf = await _recv_line(loop, idle.sock)
            keep = bool(assignment.get("attach")) and b'"error"' not in buf and buf.endswith(b"\n")
        except TimeoutError:
            raise Internal(f"shim for container {assignment['id']}: no report within {LAUNCH_TIMEOUT:g}s") from None
        finally:
            if not keep:
                idle.sock.close()
            await asyncio.to_thread(idle.proc.wait)  # the shim's first process exits at once
        if not buf.strip():
            raise Internal(f"shim for container {assignment['id']} exited without a report "
                           f"(see {self.log_path})")
        report = dict(json.loads(buf))
        if "error" in report:
            raise ShimLaunchError(str(report["error"]), int(report.get("exit_code") or 125),
                                  str(report.get("stage") or ""))
        return report, (idle.sock if keep else None)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            idle = self._idle.popleft()
            idle.sock.close()  # EOF: an idle shim exits
            try:
                idle.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                idle.proc.kill()
                idle.proc.wait()


async def _recv_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """One line, and not a byte more (what follows may be frames for a stream reader)."""
    buf = b""
    while True:
        ready: asyncio.Future[None] = loop.create_future()

        def wake(ready: asyncio.Future[None] = ready) -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())
        peek = sock.recv(65536, socket.MSG_PEEK)
        if not peek:
            return buf
        end = peek.find(b"\n")
        buf += sock.recv(end + 1 if end >= 0 else len(peek))
        if end >= 0:
            return buf


async def open_shim(state_dir: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a shim's socket (through /proc/self/fd when the path is too long for sun_path)."""
    path = state_dir / p.SOCKET
    try:
        if len(str(path)) < 100:
            return await asyncio.open_unix_connection(str(path), limit=p.MAX_FRAME * 2)
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            return await asyncio.open_unix_connection(f"/proc/self/fd/{fd}", limit=p.MAX_FRAME * 2)
        finally:
            os.close(fd)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ShimGone(f"shim socket {path}: {exc.strerror}") from None


class ShimGone(Unavailable):
    """The shim is not there (the container has exited, or its shim died)."""


async def call(state_dir: Path, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request, one JSON reply."""
    reader, writer = await open_shim(state_dir)
    try:
        writer.write(p.request(request))
        async with asyncio.timeout(timeout):
            line = await reader.readline()
    finally:
        writer.close()
    if not line:
        raise ShimGone(f"shim at {state_dir} closed the connection")
    return dict(json.loads(line))


class ShimRefused(Internal):
    """The shim answered a request with an error (``exit_code`` when it has one)."""

    def __init__(self, message: str, exit_code: int = 0) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ShimStream:
    """A streaming connection (attach or wait): the reply, then frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        self.reader = reader
        self.writer = writer
        self.reply = reply

    @classmethod
    async def adopt(cls, sock: socket.socket, reply: dict[str, Any]) -> ShimStream:
        """A stream over a connection that already carried its reply (an attached launch)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=p.MAX_FRAME * 2)
        return cls(reader, writer, reply)

    @classmethod
    async def open(cls, state_dir: Path, request: dict[str, Any]) -> ShimStream:
        reader, writer = await open_shim(state_dir)
        writer.write(p.request(request))
        line = await reader.readline()
        if not line:
            writer.close()
            raise ShimGone(f"shim at {state_dir} closed the connection")
        reply = dict(json.loads(line))
        if "error" in reply:
            writer.close()
            raise ShimRefused(str(reply["error"]), int(reply.get("exit_code") or 0))
        return cls(reader, writer, reply)

    async def next_frame(self) -> tuple[int, bytes] | None:
        try:
            header = await self.reader.readexactly(p.HEADER.size)
            kind, length = p.HEADER.unpack(header)
            return kind, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def send(self, kind: int, payload: bytes = b"") -> None:
        self.writer.write(p.frame(kind, payload))
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()
