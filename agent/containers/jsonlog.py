"""Docker's json-file log format: the shim writes it, the agent reads and follows it.

One object a line, Docker's keys in Docker's order: ``{"log":"text\\n","stream":"stdout","time":"…Z"}``.
A line over 16 KiB becomes several entries, all but the last without ``\\n``.  Unlike Docker, a
split never cuts a UTF-8 sequence, and ``<>&`` are not HTML-escaped (same decoded values).
The shim imports the writer: only light stdlib modules at top level (json, re, dataclasses are
loaded there anyway); :func:`follow` alone imports asyncio.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.containers.logwriter import MAX_ENTRY, STREAMS, format_time  # noqa: F401 - re-exported
from agent.containers.logwriter import LogWriter as _Writer
from agent.errors import InvalidArgument

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Iterator

_BLOCK = 256 * 1024
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
_NS = 1_000_000_000

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_STAMP_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[Tt](\d{2})(?::(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?)?([zZ]|[+-]\d{2}:\d{2})?", re.ASCII)
_DURATION_RE = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+", re.ASCII)
_DURATION_PART_RE = re.compile(r"(\d*)(?:\.(\d*))?(ns|us|µs|μs|ms|s|m|h)", re.ASCII)
_DURATION_UNITS = {"ns": 1, "us": 1000, "µs": 1000, "μs": 1000, "ms": 10**6, "s": _NS, "m": 60 * _NS, "h": 3600 * _NS}
_UNIX_RE = re.compile(r"(\d+)(?:\.(\d{1,9}))?", re.ASCII)


@dataclass(frozen=True, slots=True)
class LogOptions:
    """json-file options: ``max_size`` bytes per file (-1: unlimited), ``max_file`` files kept."""

    max_size: int = -1
    max_file: int = 1

    def __post_init__(self) -> None:
        if self.max_size != -1 and self.max_size <= 0:
            raise InvalidArgument(f"max-size must be a positive number of bytes, got {self.max_size}")
        if self.max_file < 1:
            raise InvalidArgument(f"max-file cannot be less than 1, got {self.max_file}")
        if self.max_file > 1 and self.max_size == -1:
            raise InvalidArgument(f"max-file={self.max_file} requires max-size")

    def to_dict(self) -> dict[str, int]:
        return {"max_size": self.max_size, "max_file": self.max_file}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogOptions:
        try:
            return cls(int(d.get("max_size", -1)), int(d.get("max_file", 1)))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid stored log options {d!r}") from exc


class LogWriter(_Writer):
    """The writer (:mod:`agent.containers.logwriter`) configured from :class:`LogOptions`."""

    def __init__(self, path: str, opts: LogOptions) -> None:
        super().__init__(path, opts.max_size, opts.max_file)
        self.opts = opts


def parse_log_opts(opts: dict[str, str]) -> LogOptions:
    """Docker's ``--log-opt`` pairs: ``max-size`` (``10k``, ``10m``, ``1g``, bytes; binary units), ``max-file``."""
    for key in opts:
        if key not in ("max-size", "max-file"):
            raise InvalidArgument(f"unknown log opt {key!r} for json-file log driver")
    max_size = -1
    if "max-size" in opts:
        m = _SIZE_RE.fullmatch(opts["max-size"].strip())
        max_size = int(float(m[1]) * _SIZE_UNITS[m[2].lower()]) if m else 0
        if max_size <= 0:
            raise InvalidArgument(f"invalid max-size {opts['max-size']!r}: expected a positive size like 10k, 10m, 1g")
    try:
        max_file = int(opts.get("max-file", "1"))
    except ValueError as exc:
        raise InvalidArgument(f"invalid max-file {opts['max-file']!r}: not an integer") from exc
    return LogOptions(max_size, max_file)


_SECONDS: dict[str, int] = {}   # "YYYY-MM-DDTHH:MM:SS" (UTC) -> epoch seconds


def parse_time(text: str) -> int:
    """An RFC3339(Nano) timestamp with a zone, as in a log line, to ns since the epoch."""
    utc = text[-1:] == "Z" and (len(text) == 20 or (len(text) > 21 and text[19] == "."))
    frac = text[20:-1]
    if utc and (secs := _SECONDS.get(text[:19])) is not None and len(frac) <= 9 and (
            not frac or (frac.isascii() and frac.isdigit())):
        return secs * _NS + int(frac.ljust(9, "0"))
    ns = _stamp(text, local_ok=False)
    if ns is None:
        raise InvalidArgument(f"invalid timestamp {text!r}: expected RFC3339 with a zone")
    if utc:
        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        _SECONDS[text[:19]] = ns // _NS
    return ns


def parse_since(value: str, now_ns: int, *, name: str = "since") -> int:
    """What ``docker logs --since/--until`` accept, as ns since the epoch.

    RFC3339(Nano) with ``Z`` or an offset; the same without a zone, or a bare
    date, in local time; unix seconds (``1700000000.5``); or a Go duration
    (``10m``, ``1h30m``, ``1.5h``) meaning that long before ``now_ns``.
    """
    text = value.strip()
    if text != "0" and _DURATION_RE.fullmatch(text):
        total = 0
        for whole, frac, unit in _DURATION_PART_RE.findall(text):
            scale = _DURATION_UNITS[unit]
            total += int(whole or 0) * scale + (int(frac) * scale // 10 ** len(frac) if frac else 0)
        return now_ns + total if text.startswith("-") else now_ns - total
    try:
        ns = _stamp(text, local_ok=True)
    except (OverflowError, ValueError):
        ns = None
    if ns is None and (m := _UNIX_RE.fullmatch(text)):
        ns = int(m[1]) * _NS + int((m[2] or "").ljust(9, "0"))
    if ns is None:
        raise InvalidArgument(f"invalid value for {json.dumps(name)}: {json.dumps(value)}")
    return ns


def _stamp(text: str, local_ok: bool) -> int | None:
    m = _STAMP_RE.fullmatch(text)
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g or 0) for g in m.groups()[:6])
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 61):
        return None
    frac, zone = m[7], m[8]
    if zone is None:
        if not local_ok:
            return None
        secs = int(time.mktime((y, mo, d, h, mi, s, 0, 0, -1)))
    else:
        offset = 0 if zone in "zZ" else (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60) * (-1 if zone[0] == "-" else 1)
        from calendar import timegm  # the reader's cold path: log lines hit parse_time's cache

        secs = timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offset
    return secs * _NS + int((frac or "").ljust(9, "0"))


@dataclass(frozen=True, slots=True)
class LogEntry:
    stream: str
    data: bytes
    time_ns: int


@dataclass(slots=True)
class ReadStats:
    """What a reader skipped: garbled or truncated lines."""

    skipped: int = 0


def _parse_lines(buf: bytes, stats: ReadStats) -> list[LogEntry]:
    out = []
    for raw in buf.split(b"\n"):
        if raw:
            entry = _parse(raw)
            if entry is None:
                stats.skipped += 1
            else:
                out.append(entry)
    return out


def _parse(raw: bytes) -> LogEntry | None:
    try:
        obj = json.loads(raw)
        log, stream, stamp = obj.get("log", ""), obj["stream"], obj["time"]
        if type(log) is not str or type(stream) is not str or type(stamp) is not str:
            return None
        return LogEntry(stream, log.encode("utf-8", "replace"), parse_time(stamp))
    except (ValueError, KeyError, TypeError, AttributeError, InvalidArgument):
        return None


def _stat_ident(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(name)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class _Cursor:
    """One log file read forward through its fd; ``carry`` holds an incomplete last line."""

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)
        self.fd, self.ident = fd, (st.st_dev, st.st_ino)
        self.offset = 0
        self.carry = b""

    def batches(self, stats: ReadStats, final: bool) -> Iterator[list[LogEntry]]:
        """Entries up to EOF; a last line without ``\\n`` is kept for later unless ``final``."""
        while data := os.pread(self.fd, _BLOCK, self.offset + len(self.carry)):
            buf = self.carry + data
            cut = buf.rfind(b"\n") + 1
            self.carry = buf[cut:]
            self.offset += cut
            if cut:
                yield _parse_lines(buf[:cut], stats)
        if final and self.carry:
            self.offset += len(self.carry)
            yield _parse_lines(self.carry, stats)
            self.carry = b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _chain(path: str) -> list[str]:
    """``path.N`` … ``path.1``, ``path``: oldest first (``path`` even when missing)."""
    rotated: list[str] = []
    while os.path.lexists(f"{path}.{len(rotated) + 1}"):
        rotated.append(f"{path}.{len(rotated) + 1}")
    return [*reversed(rotated), path]


def _open_chain(path: str) -> list[_Cursor]:
    """Open every file of the chain, oldest first, retrying if a rotation ran meanwhile."""
    attempt = 0
    while True:
        attempt += 1
        names = _chain(path)
        opened: list[tuple[str, _Cursor]] = []
        for name in names:
            try:
                opened.append((name, _Cursor(os.open(name, os.O_RDONLY | os.O_CLOEXEC))))
            except FileNotFoundError:
                pass
        if attempt == 8 or (_chain(path) == names and all(_stat_ident(n) == c.ident for n, c in opened)):
            return [c for _, c in opened]
        for _, c in opened:
            c.close()


def _next_cursor(path: str, ident: tuple[int, int] | None) -> _Cursor | None:
    """The file written after the one with ``ident`` (the oldest present if that one is gone)."""
    names = _chain(path)
    idents = [_stat_ident(name) for name in names]
    start = idents.index(ident) + 1 if ident is not None and ident in idents else 0
    for name, want in zip(names[start:], idents[start:], strict=True):
        if want is None:
            continue
        try:
            cursor = _Cursor(os.open(name, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            return None
        if cursor.ident == want:
            return cursor
        cursor.close()   # renamed meanwhile: look again at the next poll
        return None
    return None


def _complete_end(fd: int) -> int:
    """The offset just past the last ``\\n`` of the file."""
    pos = os.fstat(fd).st_size
    while pos > 0:
        start = max(0, pos - _BLOCK)
        i = os.pread(fd, pos - start, start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _backward(fd: int, end: int, n: int, stats: ReadStats) -> list[LogEntry]:
    """The last ``n`` entries before ``end``, read backwards in blocks, oldest first."""
    found: list[LogEntry] = []
    pos, carry = end, b""
    while pos > 0 and len(found) < n:
        start = max(0, pos - _BLOCK)
        lines = (os.pread(fd, pos - start, start) + carry).split(b"\n")
        pos = start
        carry = lines.pop(0) if pos > 0 else b""   # may be the end of a line that starts earlier
        for raw in reversed(lines):
            entry = _parse(raw) if raw else None
            if entry is not None:
                found.append(entry)
                if len(found) == n:
                    break
            elif raw:
                stats.skipped += 1
    found.reverse()
    return found


def _replay(cursors: list[_Cursor], since_ns: int | None, until_ns: int | None, tail: int | None,
            stats: ReadStats) -> Iterator[LogEntry]:
    """Entries of the opened chain; leaves the newest cursor just past its last complete line."""
    if not cursors:
        return
    newest = cursors[-1]
    batches: Iterable[list[LogEntry]]
    if tail is not None and tail >= 0:
        newest.offset = _complete_end(newest.fd)
        picked: list[LogEntry] = []
        for c in reversed(cursors):
            if len(picked) >= tail:
                break
            end = newest.offset if c is newest else os.fstat(c.fd).st_size
            picked[:0] = _backward(c.fd, end, tail - len(picked), stats)
        batches = (picked,)
    else:
        batches = (b for c in cursors for b in c.batches(stats, final=c is not newest))
    for batch in batches:
        for e in batch:
            if (since_ns is None or e.time_ns >= since_ns) and (until_ns is None or e.time_ns <= until_ns):
                yield e


def read_entries(path: str, *, since_ns: int | None = None, until_ns: int | None = None,
                 tail: int | None = None, stats: ReadStats | None = None) -> Iterator[LogEntry]:
    """Entries of ``path`` and its rotated files, oldest first.

    ``since_ns`` and ``until_ns`` are inclusive (Docker drops entries before
    ``--since`` and after ``--until``); ``tail`` keeps the last N entries (None
    or negative: all), taken before the time filters as Docker does.
    """
    cursors = _open_chain(path)
    try:
        yield from _replay(cursors, since_ns, until_ns, tail, ReadStats() if stats is None else stats)
    finally:
        for c in cursors:
            c.close()


async def follow(path: str, *, since_ns: int | None = None, tail: int | None = None,
                 is_running: Callable[[], bool], poll_interval: float = 0.05,
                 stats: ReadStats | None = None) -> AsyncIterator[LogEntry]:
    """What :func:`read_entries` gives, then entries as they are appended, across rotations.

    Ends once ``is_running()`` is False and everything written until then has been read.
    """
    import asyncio

    if stats is None:
        stats = ReadStats()
    cursors = _open_chain(path)
    try:
        for count, entry in enumerate(_replay(cursors, since_ns, None, tail, stats), 1):
            yield entry
            if count % 1024 == 0:
                await asyncio.sleep(0)
        for c in cursors[:-1]:
            c.close()
        cursor = cursors[-1] if cursors else None
        while True:
            running = is_running()   # sampled first, so a final drain follows the last write
            current = _stat_ident(path)   # before reading: the rename comes after the last write
            if cursor is not None:
                for batch in cursor.batches(stats, final=False):
                    for entry in batch:
                        if since_ns is None or entry.time_ns >= since_ns:
                            yield entry
                    await asyncio.sleep(0)
            if cursor is None or (current is not None and current != cursor.ident):
                nxt = _next_cursor(path, cursor.ident if cursor else None)
                if nxt is not None:
                    if cursor is not None:
                        stats.skipped += bool(cursor.carry)
                        cursor.close()
                    cursor = nxt
                    cursors.append(cursor)
                    continue
            if not running:
                return
            await asyncio.sleep(poll_interval)
    finally:
        for c in cursors:
            c.close()
