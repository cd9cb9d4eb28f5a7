"""The local terminal side of ``skiff run -it``, ``skiff exec -it`` and ``skiff attach``.

Mechanism only: raw mode, window size, SIGWINCH, non-blocking stdin and the
detach-key scanner. What to send to the agent, and when, is the command's job.
Imported only on interactive paths.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import struct
import termios
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import FrameType, TracebackType
from typing import Any, Self

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"
CHUNK_SIZE = 32 * 1024

# Index i is the control code i: "ctrl-@" is 0x00, "ctrl-a" 0x01, ..., "ctrl-_" 0x1f (docker's term.ASCII).
_CTRL_NAMES = ["ctrl-@"] + [f"ctrl-{chr(c)}" for c in range(ord("a"), ord("z") + 1)] + [
    "ctrl-[", "ctrl-\\", "ctrl-]", "ctrl-^", "ctrl-_",
]
_CTRL_CODES = {name: code for code, name in enumerate(_CTRL_NAMES)}

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
ResizeCallback = Callable[[int, int], Awaitable[None] | None]


def window_size(fd: int) -> tuple[int, int] | None:
    """Return ``(rows, cols)`` of the terminal on ``fd``.

    None when ``fd`` is not a terminal, or when the terminal reports no size
    (0x0, as a fresh pty does), so callers never send a 0x0 resize.
    """
    if not os.isatty(fd):
        return None
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    if rows == 0 and cols == 0:
        return None
    return rows, cols


def _tcsetattr(fd: int, attrs: list[Any]) -> None:
    try:
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error as exc:
        raise OSError(exc.args[0], f"tcsetattr on fd {fd}: {exc.args[1]}") from exc


def raw_attributes(attrs: list[Any]) -> list[Any]:
    """Return a copy of ``tcgetattr`` output with golang.org/x/term ``MakeRaw``'s changes applied."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB)
    cflag |= termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class RawTerminal:
    """Put the tty on ``fd`` in raw mode for the ``with`` body, as ``docker run -it`` does.

    The previous attributes come back on exit, even if the body raises, and on
    SIGTERM/SIGHUP: the handler restores the terminal, puts the previous
    handler back and re-raises the signal, so the default action still happens.
    Handlers are only installed from the main thread and never over SIG_IGN.
    A no-op when ``fd`` is not a tty.
    """

    EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None
        self._previous: dict[int, _Handler] = {}

    @property
    def active(self) -> bool:
        return self._saved is not None

    def __enter__(self) -> Self:
        if not os.isatty(self.fd):
            return self
        try:
            saved = termios.tcgetattr(self.fd)
        except termios.error as exc:
            raise OSError(exc.args[0], f"tcgetattr on fd {self.fd}: {exc.args[1]}") from exc
        self._saved = saved
        self._install_handlers()
        try:
            _tcsetattr(self.fd, raw_attributes(saved))
        except BaseException:
            self._saved = None
            self._uninstall_handlers()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._uninstall_handlers()
        try:
            self.restore()
        except OSError:
            if exc is None:
                raise  # otherwise the body's exception says more than a failed restore on a hung-up tty

    def restore(self) -> None:
        """Put the saved attributes back now; idempotent."""
        saved, self._saved = self._saved, None
        if saved is not None:
            _tcsetattr(self.fd, saved)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.EXIT_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is None or previous == signal.SIG_IGN:
                continue  # not installed from Python (cannot be put back) or the signal cannot end us
            self._previous[signum] = previous
            signal.signal(signum, self._on_exit_signal)

    def _uninstall_handlers(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_exit_signal(self, signum: int, frame: FrameType | None) -> None:
        try:
            self.restore()
        except OSError:
            pass  # the tty is gone; dying is still the right thing to do
        self._uninstall_handlers()
        signal.raise_signal(signum)


class DetachKeys:
    """Docker's ``--detach-keys`` (``term.ToBytes`` syntax) and a streaming scanner for it.

    Bytes that could start the sequence are held back until it either
    completes (detach: they are swallowed) or breaks (they are forwarded, in
    order, ahead of the byte that broke it).
    """

    def __init__(self, spec: str = DEFAULT_DETACH_KEYS) -> None:
        self.spec = spec
        self.sequence = self.parse(spec)
        self._held = b""

    @staticmethod
    def parse(spec: str) -> bytes:
        """``"ctrl-p,ctrl-q"`` → ``b"\\x10\\x11"``; ValueError on an unknown key."""
        codes = bytearray()
        for key in spec.split(","):
            if len(key) == 1 and key.isascii():
                codes.append(ord(key))
            elif key in _CTRL_CODES:
                codes.append(_CTRL_CODES[key])
            elif key == "DEL":
                codes.append(0x7F)
            else:
                raise ValueError(
                    f"invalid detach keys {spec!r}: unknown key {key!r} "
                    "(use a single character, DEL, or ctrl-<a-z, @, [, \\, ], ^, _> separated by commas)"
                )
        return bytes(codes)

    @property
    def pending(self) -> bytes:
        """The bytes currently held back as a possible start of the sequence."""
        return self._held

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Scan ``data``; return ``(bytes to forward, detach requested)``.

        On detach, the sequence itself and anything after it in ``data`` are dropped.
        """
        out = bytearray()
        held = self._held
        for byte in data:
            held += bytes((byte,))
            while held and not self.sequence.startswith(held):
                out.append(held[0])  # the oldest held byte can no longer start the sequence
                held = held[1:]
            if held == self.sequence:
                self._held = b""
                return bytes(out), True
        self._held = held
        return bytes(out), False

    def flush(self) -> bytes:
        """Release the held bytes, e.g. at end of input."""
        held, self._held = self._held, b""
        return held


def watch_resize(fd: int, callback: ResizeCallback) -> Callable[[], None]:
    """Call ``callback(rows, cols)`` on the running loop after every SIGWINCH; return the remover.

    A callback may be a coroutine function; its task is reported to the
    loop's exception handler if it fails and cancelled by the remover. No
    callback happens while ``fd`` reports no size.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Future[None]] = set()

    def done(task: asyncio.Future[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({
                "message": f"terminal resize callback failed for fd {fd}",
                "exception": task.exception(),
                "future": task,
            })

    def on_winch() -> None:
        size = window_size(fd)
        if size is None:
            return
        result = callback(*size)
        if result is not None:
            task = asyncio.ensure_future(result)
            tasks.add(task)
            task.add_done_callback(done)

    loop.add_signal_handler(signal.SIGWINCH, on_winch)

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGWINCH)
        for task in list(tasks):
            task.cancel()

    return remove


async def stdin_chunks(fd: int, chunk_size: int = CHUNK_SIZE) -> AsyncGenerator[bytes, None]:
    """Yield what arrives on ``fd`` (up to ``chunk_size`` bytes at a time) until EOF.

    The fd is switched to non-blocking and waited on with ``loop.add_reader``;
    its original flags come back when the generator finishes or is closed
    (use ``contextlib.aclosing`` when breaking out early). EIO, what a hung-up
    tty returns, counts as EOF.
    """
    loop = asyncio.get_running_loop()
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            try:
                data = os.read(fd, chunk_size)
            except BlockingIOError:
                await _readable(loop, fd)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            yield data
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    # Registered only while waiting: a level-triggered reader left in place would spin
    # the loop while the consumer is busy with the previous chunk.
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
