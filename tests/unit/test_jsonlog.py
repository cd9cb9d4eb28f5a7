"""Unit tests for agent.containers.jsonlog: Docker's json-file log format, written and read back."""

from __future__ import annotations

import asyncio
import json
import os
import random
import stat
import time
from pathlib import Path

import pytest

from agent.containers.jsonlog import (
    MAX_ENTRY,
    LogEntry,
    LogOptions,
    LogWriter,
    ReadStats,
    follow,
    format_time,
    parse_log_opts,
    parse_since,
    parse_time,
    read_entries,
)
from agent.errors import InvalidArgument, SkiffError

T0 = 1_795_860_192_123_456_789   # 2026-11-28T10:03:12.123456789Z


def lines_of(path: Path, tail: int | None = None) -> list[bytes]:
    """Whole lines, joining split entries back (what ``docker logs`` prints)."""
    out: list[bytes] = []
    buf = b""
    for entry in read_entries(str(path), tail=tail):
        buf += entry.data
        if buf.endswith(b"\n"):
            out.append(buf)
            buf = b""
    return out


def numbered(n: int, start: int = 0) -> list[bytes]:
    return [f"line {i:06d}\n".encode() for i in range(start, start + n)]


# --- timestamps ---------------------------------------------------------------------


def test_format_time_is_rfc3339nano_with_trailing_zeros_trimmed() -> None:
    assert format_time(T0) == "2026-11-28T10:03:12.123456789Z"
    assert format_time(T0 - 6789) == "2026-11-28T10:03:12.12345Z"
    assert format_time(1_700_000_000 * 10**9) == "2023-11-14T22:13:20Z"
    assert format_time(1_700_000_000 * 10**9 + 500_000_000) == "2023-11-14T22:13:20.5Z"


@pytest.mark.parametrize("ns", [0, 1, T0, T0 + 11, 1_700_000_000 * 10**9, 4_102_444_800 * 10**9 + 999_999_999])
def test_format_parse_round_trip(ns: int) -> None:
    assert parse_time(format_time(ns)) == ns
    assert parse_time(format_time(ns)) == ns   # the cached path agrees


def test_parse_time_offsets_and_garbage() -> None:
    assert parse_time("2026-11-28T11:03:12.123456789+01:00") == T0
    assert parse_time("2026-11-28T05:03:12.123456789-05:00") == T0
    for bad in ("2026-11-28T10:03:12", "2026-11-28T10:03:12.Z", "2026-13-28T10:03:12Z", "yesterday", ""):
        with pytest.raises(InvalidArgument):
            parse_time(bad)


# --- writing ------------------------------------------------------------------------


def test_entry_bytes_are_dockers(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    with_quote = 'say "hi"\t\\ é'.encode()
    w = LogWriter(str(path), LogOptions())
    w.write("stdout", b"hello\n", now_ns=T0)
    w.write("stderr", with_quote + b"\n", now_ns=T0 + 1000)
    w.close()
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"log":"hello\\n","stream":"stdout","time":"2026-11-28T10:03:12.123456789Z"}'
    assert lines[1].startswith(b'{"log":"say \\"hi\\"\\t\\\\ \xc3\xa9\\n","stream":"stderr","time":"2026-11-28T10:03:')
    assert json.loads(lines[1])["log"] == 'say "hi"\t\\ é\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_lines_split_over_arbitrary_chunk_boundaries(tmp_path: Path) -> None:
    rng = random.Random(7)
    expected = {s: [f"{s} {i} {'x' * rng.randrange(0, 300)} ü\n".encode() for i in range(400)]
                for s in ("stdout", "stderr")}
    w = LogWriter(str(tmp_path / "c.log"), LogOptions())
    for stream, lines in expected.items():
        blob = b"".join(lines)
        pos = 0
        while pos < len(blob):   # cuts land inside lines and inside the two-byte "ü"
            step = rng.choice([1, 2, 3, 17, 100, 4096])
            w.write(stream, blob[pos:pos + step])
            pos += step
    w.close()
    entries = list(read_entries(str(tmp_path / "c.log")))
    for stream, lines in expected.items():
        assert [e.data for e in entries if e.stream == stream] == lines


def test_long_line_is_split_and_comes_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    line = ("€" * 20_000 + "y" * 40_000).encode() + b"\n"   # ~100 KiB, three-byte chars at cut points
    assert len(line) > 100_000
    w = LogWriter(str(path), LogOptions())
    for i in range(0, len(line), 1000):
        w.write("stdout", line[i:i + 1000])
    w.close()
    entries = list(read_entries(str(path)))
    assert len(entries) > 1
    assert all(not e.data.endswith(b"\n") and len(e.data) <= MAX_ENTRY for e in entries[:-1])
    assert entries[-1].data.endswith(b"\n")
    assert b"".join(e.data for e in entries) == line
    assert lines_of(path) == [line]


def test_pending_line_is_logged_at_16k_without_waiting_for_newline(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = LogWriter(str(path), LogOptions())
    w.write("stdout", b"a" * (MAX_ENTRY - 1))
    assert path.read_bytes() == b""
    w.write("stdout", b"bc")
    [entry] = list(read_entries(str(path)))
    assert entry.data == b"a" * (MAX_ENTRY - 1) + b"b"
    w.write("stdout", b"\n")
    assert [e.data for e in read_entries(str(path))][1] == b"c\n"


def test_flush_partial_and_close_emit_pending_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = LogWriter(str(path), LogOptions())
    w.write("stdout", b"one\ntwo")
    w.write("stderr", b"err")
    w.flush_partial("stdout")
    w.close()
    assert [(e.stream, e.data) for e in read_entries(str(path))] == [
        ("stdout", b"one\n"), ("stdout", b"two"), ("stderr", b"err")]


def test_invalid_utf8_is_replaced_like_go(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = LogWriter(str(path), LogOptions())
    w.write("stdout", b"ok \xff\xfe end\n")
    w.close()
    assert json.loads(path.read_bytes())["log"] == "ok \ufffd\ufffd end\n"
    assert [e.data for e in read_entries(str(path))] == ["ok \ufffd\ufffd end\n".encode()]


def test_tty_output_is_stdout_with_bytes_kept(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = LogWriter(str(path), LogOptions())
    w.write_tty(b"prompt$ ls\r\nfile\r\n")
    w.close()
    assert [(e.stream, e.data) for e in read_entries(str(path))] == [
        ("stdout", b"prompt$ ls\r\n"), ("stdout", b"file\r\n")]


def test_unknown_stream_is_refused(tmp_path: Path) -> None:
    w = LogWriter(str(tmp_path / "c.log"), LogOptions())
    with pytest.raises(InvalidArgument, match="'stdin'"):
        w.write("stdin", b"x\n")


def _write_numbered(path: Path, opts: LogOptions, n: int, chunk: int = 7) -> list[bytes]:
    lines = numbered(n)
    w = LogWriter(str(path), opts)
    for i in range(0, n, chunk):
        w.write("stdout", b"".join(lines[i:i + chunk]))
    w.close()
    return lines


def test_rotation_keeps_newest_contiguous_lines_and_bounds_files(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    lines = _write_numbered(path, LogOptions(max_size=2000, max_file=3), 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.log", "c.log.1", "c.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    kept = lines_of(path)
    assert kept == lines[len(lines) - len(kept):]   # a contiguous suffix: nothing lost or doubled
    assert len(kept) > 2 * 2000 // 100


def test_rotation_with_one_file(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    lines = _write_numbered(path, LogOptions(max_size=1000, max_file=1), 300)
    assert [p.name for p in tmp_path.iterdir()] == ["c.log"]
    kept = lines_of(path)
    assert kept and kept == lines[len(lines) - len(kept):]


def test_entry_larger_than_max_size_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = LogWriter(str(path), LogOptions(max_size=100, max_file=5))
    w.write("stdout", b"short\n" + b"z" * 300 + b"\nafter\n")
    w.close()
    assert lines_of(path) == [b"short\n", b"z" * 300 + b"\n", b"after\n"]


def test_writer_appends_to_an_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    _write_numbered(path, LogOptions(), 3)
    w = LogWriter(str(path), LogOptions())
    w.write("stdout", b"again\n")
    w.close()
    assert lines_of(path) == [*numbered(3), b"again\n"]


# --- reading ------------------------------------------------------------------------


def test_tail_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    lines = _write_numbered(path, LogOptions(max_size=1500, max_file=10), 200)
    assert (tmp_path / "c.log.4").exists()
    assert lines_of(path, tail=50) == lines[-50:]
    assert lines_of(path, tail=1) == lines[-1:]
    assert lines_of(path, tail=0) == []
    assert lines_of(path, tail=10_000) == lines_of(path) == lines_of(path, tail=-1)


def test_tail_of_a_big_file_reads_only_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.log"
    lines = _write_numbered(path, LogOptions(), 100_000, chunk=1000)
    read = 0
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        nonlocal read
        data = real_pread(fd, n, offset)
        read += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    assert lines_of(path, tail=5) == lines[-5:]
    assert read < path.stat().st_size // 5


def test_garbled_and_truncated_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = LogWriter(str(path), LogOptions())
    w.write("stdout", b"a\n")
    w.close()
    with open(path, "ab") as fh:
        fh.write(b'not json\n{"log":"x","stream":"stdout","time":"bad"}\n[1]\n')
        fh.write(b'{"log":"b\\n","stream":"stdout","time":"2026-11-28T10:03:12Z"}\n{"log":"trunc')
    stats = ReadStats()
    assert [e.data for e in read_entries(str(path), stats=stats)] == [b"a\n", b"b\n"]
    assert stats.skipped == 3   # the unfinished last line may still be being written
    tail_stats = ReadStats()
    assert [e.data for e in read_entries(str(path), tail=2, stats=tail_stats)] == [b"a\n", b"b\n"]
    assert tail_stats.skipped == 3


def test_since_and_until(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = LogWriter(str(path), LogOptions(max_size=300, max_file=20))
    for i in range(10):
        w.write("stdout", f"{i}\n".encode(), now_ns=T0 + i * 10**9)
    w.close()

    def got(since_ns: int | None = None, until_ns: int | None = None, tail: int | None = None) -> list[int]:
        return [int(e.data) for e in read_entries(str(path), since_ns=since_ns, until_ns=until_ns, tail=tail)]

    assert got(since_ns=T0 + 3 * 10**9) == [3, 4, 5, 6, 7, 8, 9]    # inclusive
    assert got(until_ns=T0 + 3 * 10**9) == [0, 1, 2, 3]
    assert got(since_ns=T0 + 2 * 10**9 + 1, until_ns=T0 + 5 * 10**9 - 1) == [3, 4]
    assert got(tail=3, since_ns=T0 + 8 * 10**9) == [8, 9]   # tail first, then the filter
    assert all(isinstance(e, LogEntry) and e.time_ns >= T0 for e in read_entries(str(path)))


def test_reading_a_missing_log_gives_nothing(tmp_path: Path) -> None:
    assert list(read_entries(str(tmp_path / "none.log"), tail=10)) == []
    assert list(read_entries(str(tmp_path / "none.log"))) == []


# --- following ----------------------------------------------------------------------


async def test_follow_reads_every_line_once_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    total = 3000
    lines = numbered(total)
    w = LogWriter(str(path), LogOptions(max_size=1024, max_file=10))
    w.write("stdout", b"".join(lines[:100]))
    running = True

    async def writer() -> None:
        nonlocal running
        for i in range(100, total, 40):   # each burst crosses about three rotations
            w.write("stdout", b"".join(lines[i:i + 40]))
            await asyncio.sleep(0.01)
        w.close()
        running = False

    task = asyncio.create_task(writer())
    got = [e.data async for e in follow(str(path), tail=-1, is_running=lambda: running, poll_interval=0.005)]
    await task
    assert got == lines


async def test_follow_with_tail_then_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    lines = numbered(20)
    w = LogWriter(str(path), LogOptions())
    w.write("stdout", b"".join(lines[:10]))
    stopped = asyncio.Event()
    got: list[bytes] = []
    async for entry in follow(str(path), tail=3, is_running=lambda: not stopped.is_set(), poll_interval=0.01):
        got.append(entry.data)
        if len(got) == 3:
            w.write("stdout", b"".join(lines[10:]))
            w.close()
            stopped.set()
    assert got == lines[7:]


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


async def test_follow_never_yields_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    entry = b'{"log":"whole\\n","stream":"stdout","time":"2026-11-28T10:03:12Z"}\n'
    path.write_bytes(entry[:20])
    running = True
    stats = ReadStats()

    async def writer() -> None:
        nonlocal running
        await asyncio.sleep(0.1)
        _append(path, entry[20:])
        running = False

    task = asyncio.create_task(writer())
    got = [e.data async for e in follow(str(path), is_running=lambda: running, poll_interval=0.01, stats=stats)]
    await task
    assert got == [b"whole\n"]
    assert stats.skipped == 0


async def test_follow_waits_for_the_log_to_appear(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    running = True

    async def writer() -> None:
        nonlocal running
        await asyncio.sleep(0.05)
        w = LogWriter(str(path), LogOptions())
        w.write("stderr", b"late\n")
        w.close()
        running = False

    task = asyncio.create_task(writer())
    got = [(e.stream, e.data) async for e in follow(str(path), is_running=lambda: running, poll_interval=0.01)]
    await task
    assert got == [("stderr", b"late\n")]


async def test_follow_returns_promptly_once_not_running(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = LogWriter(str(path), LogOptions())
    w.write("stdout", b"first\n")
    running = True
    stopped_at = 0.0

    async def stopper() -> None:
        nonlocal running, stopped_at
        await asyncio.sleep(0.2)
        w.write("stdout", b"last\n")
        w.close()
        running = False
        stopped_at = time.monotonic()

    task = asyncio.create_task(stopper())
    got = [e.data async for e in follow(str(path), is_running=lambda: running, poll_interval=0.05)]
    ended_at = time.monotonic()
    await task
    assert got == [b"first\n", b"last\n"]
    assert ended_at - stopped_at < 0.2


async def test_follow_of_a_stopped_container_without_log_ends(tmp_path: Path) -> None:
    got = [e async for e in follow(str(tmp_path / "none.log"), is_running=lambda: False)]
    assert got == []


def test_flood_of_half_a_million_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    line = b"x" * 40 + b"\n"
    chunk = line * 1600   # about what one pipe read returns
    started = time.perf_counter()
    w = LogWriter(str(path), LogOptions(max_size=64 << 20, max_file=3))
    for _ in range(500_000 // 1600):
        w.write("stdout", chunk)
    w.write("stdout", line * (500_000 % 1600))
    w.close()
    written = time.perf_counter() - started
    assert sum(1 for _ in read_entries(str(path))) == 500_000
    assert written < 5.0


# --- options ------------------------------------------------------------------------


def test_parse_log_opts() -> None:
    assert parse_log_opts({}) == LogOptions(max_size=-1, max_file=1)
    assert parse_log_opts({"max-size": "10m", "max-file": "3"}) == LogOptions(10 << 20, 3)
    assert parse_log_opts({"max-size": "10k"}).max_size == 10 << 10
    assert parse_log_opts({"max-size": "1g"}).max_size == 1 << 30
    assert parse_log_opts({"max-size": "1.5m"}).max_size == 3 << 19
    assert parse_log_opts({"max-size": "4096"}).max_size == 4096
    assert parse_log_opts({"max-size": "20MB"}).max_size == 20 << 20


@pytest.mark.parametrize(("opts", "message"), [
    ({"foo": "1"}, "unknown log opt 'foo' for json-file log driver"),
    ({"max-size": "ten"}, "invalid max-size 'ten'"),
    ({"max-size": "0"}, "invalid max-size '0'"),
    ({"max-size": "-1"}, "invalid max-size '-1'"),
    ({"max-size": "1m", "max-file": "x"}, "invalid max-file 'x'"),
    ({"max-size": "1m", "max-file": "0"}, "max-file cannot be less than 1"),
    ({"max-file": "3"}, "max-file=3 requires max-size"),
])
def test_parse_log_opts_errors(opts: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_log_opts(opts)


def test_log_options_round_trip_through_json() -> None:
    opts = LogOptions(max_size=1 << 20, max_file=4)
    assert LogOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert LogOptions.from_dict({}) == LogOptions()
    with pytest.raises(InvalidArgument):
        LogOptions.from_dict({"max_size": "lots"})


# --- --since / --until ----------------------------------------------------------------

NOW = 1_800_000_000 * 10**9


@pytest.mark.parametrize(("value", "expected"), [
    ("2013-01-02T13:23:37Z", 1_357_133_017 * 10**9),
    ("2013-01-02T13:23:37.5Z", 1_357_133_017 * 10**9 + 500_000_000),
    ("2013-01-02T13:23:37.123456789Z", 1_357_133_017 * 10**9 + 123_456_789),
    ("2013-01-02T14:23:37+01:00", 1_357_133_017 * 10**9),
    ("2013-01-02T13:23Z", 1_357_132_980 * 10**9),
    ("2013-01-02Z", 1_357_084_800 * 10**9),
    ("1700000000", 1_700_000_000 * 10**9),
    ("1700000000.123456789", 1_700_000_000 * 10**9 + 123_456_789),
    ("1700000000.5", 1_700_000_000 * 10**9 + 500_000_000),
    ("0", 0),
    ("10", 10 * 10**9),   # a bare number is a unix timestamp, as for docker
    ("42s", NOW - 42 * 10**9),
    ("10m", NOW - 600 * 10**9),
    ("1h30m", NOW - 5400 * 10**9),
    ("1.5h", NOW - 5400 * 10**9),
    ("250ms", NOW - 250_000_000),
])
def test_parse_since(value: str, expected: int) -> None:
    assert parse_since(value, NOW) == expected


def test_parse_since_local_forms() -> None:
    local = int(time.mktime((2013, 1, 2, 13, 23, 37, 0, 0, -1))) * 10**9
    assert parse_since("2013-01-02T13:23:37", NOW) == local
    assert parse_since("2013-01-02T13:23:37.25", NOW) == local + 250_000_000
    assert parse_since("2013-01-02", NOW) == int(time.mktime((2013, 1, 2, 0, 0, 0, 0, 0, -1))) * 10**9


@pytest.mark.parametrize("value", ["x", "", "1d", "2013-13-02", "2013-01-02T25:00:00Z", "1.2.3", "10 m"])
def test_parse_since_errors(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_since(value, NOW, name="until")
    assert str(info.value) == f'invalid value for "until": {json.dumps(value)}'
    assert isinstance(info.value, SkiffError)
