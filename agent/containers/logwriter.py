"""Docker's json-file log format, the writing half: what the shim's monitor imports.

Light on purpose (json, os, time; no typing, re or dataclasses): every
running container pays for this module's imports in resident memory.  The
reading half, options and timestamps parsing live in :mod:`agent.containers.jsonlog`.
"""

from __future__ import annotations

import os
import time
from json.encoder import encode_basestring  # type: ignore[attr-defined]

from agent.errors import InvalidArgument

#: Docker's copier buffer: a longer line is logged as several entries.
MAX_ENTRY = 16 * 1024
STREAMS = ("stdout", "stderr")
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
_NS = 1_000_000_000


def format_time(ns: int) -> str:
    """RFC3339Nano in UTC, trailing zeros of the fraction trimmed (as Go formats it)."""
    secs, frac = divmod(ns, _NS)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return (f"{text}.{frac:09d}".rstrip("0") if frac else text) + "Z"


class LogWriter:
    """Appends a container's output to ``path`` in json-file format, rotating per ``opts``.

    Fed raw chunks as read from the pipes; one ``os.write`` per call (more only across a
    rotation).  A failed write (a full disk) drops that batch and counts it in ``write_errors``:
    as in Docker, logging must not take the container down.
    """

    def __init__(self, path: str, max_size: int = -1, max_file: int = 1) -> None:
        self.path = path
        self.max_size = max_size
        self.max_file = max_file
        self.write_errors = 0
        self.last_error: OSError | None = None
        self._pending: dict[str, bytes] = dict.fromkeys(STREAMS, b"")
        self._fd = -1
        self._size = 0
        self._open()

    def write(self, stream: str, data: bytes, now_ns: int | None = None) -> None:
        """Log the complete lines of ``data`` (after what is pending for ``stream``)."""
        pending = self._checked(stream)
        if pending:
            data = pending + data
        lines = data.split(b"\n")
        rest = lines.pop()
        out: list[str] = []
        suffix = _suffix(stream, now_ns)
        for line in lines:
            if len(line) < MAX_ENTRY:
                out.append('{"log":' + encode_basestring(line.decode("utf-8", "replace") + "\n") + suffix)
            else:
                _pieces(out, line + b"\n", suffix, final=True)
        self._pending[stream] = _pieces(out, rest, suffix, final=False) if len(rest) >= MAX_ENTRY else rest
        if out:
            self._emit(out)

    def write_tty(self, data: bytes, now_ns: int | None = None) -> None:
        """A TTY's output: stream ``stdout``, bytes (``\\r\\n`` included) kept as they are."""
        self.write("stdout", data, now_ns)

    def flush_partial(self, stream: str, now_ns: int | None = None) -> None:
        """Log what is pending for ``stream`` as a final entry without ``\\n``."""
        pending = self._checked(stream)
        if pending:
            self._pending[stream] = b""
            out: list[str] = []
            _pieces(out, pending, _suffix(stream, now_ns), final=True)
            self._emit(out)

    def pending(self) -> dict[str, str]:
        """Partial lines waiting for their end (bytes as latin-1 text), to hand to a successor."""
        return {stream: data.decode("latin-1") for stream, data in self._pending.items() if data}

    def adopt(self, pending: dict[str, str]) -> None:
        """Take over a predecessor's :meth:`pending` partial lines."""
        for stream, text in pending.items():
            self._checked(stream)
            self._pending[stream] = text.encode("latin-1")

    def close_fd(self) -> None:
        """Close the file without flushing partial lines (see :meth:`pending`)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        for stream in STREAMS:
            self.flush_partial(stream)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _checked(self, stream: str) -> bytes:
        pending = self._pending.get(stream)
        if pending is None:
            raise InvalidArgument(f"unknown log stream {stream!r}: expected stdout or stderr")
        return pending

    def _open(self) -> None:
        self._fd = os.open(self.path, _WRITE_FLAGS, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _emit(self, out: list[str]) -> None:
        blob = "".join(out).encode()
        limit = self.max_size
        try:
            if self._fd < 0:
                self._open()
            if limit < 0 or self._size + len(blob) <= limit:
                self._write(blob)
                return
            batch = bytearray()
            for raw in (entry.encode() for entry in out):
                if self._size + len(batch) + len(raw) > limit and self._size + len(batch) > 0:
                    self._write(batch)
                    batch.clear()
                    self._rotate()
                batch += raw
            self._write(batch)
        except OSError as exc:
            self.write_errors += 1
            self.last_error = exc

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]

    def _rotate(self) -> None:
        """``path`` → ``path.1`` → … → ``path.{max_file-1}`` (the oldest dropped), then a fresh ``path``."""
        os.close(self._fd)
        self._fd = -1
        for i in range(self.max_file - 1, 0, -1):
            try:
                os.rename(f"{self.path}.{i - 1}" if i > 1 else self.path, f"{self.path}.{i}")
            except FileNotFoundError:
                pass
        if self.max_file == 1:   # a new inode, not truncation: followers finish the old one
            os.unlink(self.path)
        self._open()


def _suffix(stream: str, now_ns: int | None) -> str:
    return f',"stream":"{stream}","time":"{format_time(time.time_ns() if now_ns is None else now_ns)}"}}\n'


def _pieces(out: list[str], data: bytes, suffix: str, final: bool) -> bytes:
    """Append entries of at most 16 KiB of ``data``; unless ``final``, return a tail shorter than that."""
    start = 0
    while len(data) - start > MAX_ENTRY or (not final and len(data) - start >= MAX_ENTRY):
        cut = _char_boundary(data, start + MAX_ENTRY)
        out.append('{"log":' + encode_basestring(data[start:cut].decode("utf-8", "replace")) + suffix)
        start = cut
    if not final:
        return data[start:]
    if start < len(data):
        out.append('{"log":' + encode_basestring(data[start:].decode("utf-8", "replace")) + suffix)
    return b""


def _char_boundary(data: bytes, end: int) -> int:
    """``end``, moved back so as not to cut a UTF-8 sequence (needs only ``data[:end]``)."""
    for back in range(1, 4):
        byte = data[end - back]
        if byte < 0x80:
            return end
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return end if back >= need else end - back
    return end
