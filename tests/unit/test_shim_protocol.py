"""Tests for agent.shim.protocol: the request line, frames, the frame decoder and the sync-pipe reader."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from agent.shim import protocol as p


class Pipe:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def write(self, data: bytes) -> None:
        os.write(self.w, data)

    def close_w(self) -> None:
        os.close(self.w)
        self.w = -1


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    pp = Pipe()
    yield pp
    os.close(pp.r)
    if pp.w >= 0:
        os.close(pp.w)


# --- encoding ---------------------------------------------------------------


def test_frame_header_is_kind_and_big_endian_length() -> None:
    assert p.frame(p.STDOUT, b"hello") == b"\x01\x00\x00\x00\x05hello"
    assert p.frame(p.CLOSE_STDIN) == bytes([p.CLOSE_STDIN, 0, 0, 0, 0])
    big = p.frame(p.STDERR, b"x" * 70000)
    assert struct.unpack(">BI", big[:5]) == (p.STDERR, 70000)
    assert len(big) == 5 + 70000


def test_json_frame_is_compact_json() -> None:
    data = p.json_frame(p.EXIT, {"exit_code": 3, "oom_killed": False})
    assert data[:5] == struct.pack(">BI", p.EXIT, len(data) - 5)
    assert data[5:] == b'{"exit_code":3,"oom_killed":false}'


def test_request_is_one_compact_json_line() -> None:
    line = p.request({"op": "attach", "stdin": True, "text": "a\nb"})
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1  # a newline inside a value is escaped
    assert json.loads(line) == {"op": "attach", "stdin": True, "text": "a\nb"}
    assert b", " not in line and b": " not in line


# --- FrameReader ------------------------------------------------------------

FRAMES = [(p.STDOUT, b"out"), (p.STDERR, b""), (p.EXIT, b'{"exit_code":0}'), (p.STDIN, bytes(range(256)))]
STREAM = b"".join(p.frame(k, d) for k, d in FRAMES)


def test_several_frames_in_one_chunk() -> None:
    reader = p.FrameReader()
    assert reader.feed(STREAM) == FRAMES
    assert reader.feed(b"") == []
    assert reader.buf == bytearray()


def test_one_byte_at_a_time() -> None:
    reader = p.FrameReader()
    got = []
    for i in range(len(STREAM)):
        got += reader.feed(STREAM[i:i + 1])
    assert got == FRAMES


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_split_at_every_byte_boundary(cut: int) -> None:
    reader = p.FrameReader()
    got = reader.feed(STREAM[:cut])
    got += reader.feed(STREAM[cut:])
    assert got == FRAMES
    assert not reader.buf


def test_incomplete_frame_waits() -> None:
    reader = p.FrameReader()
    data = p.frame(p.STDOUT, b"abcdef")
    assert reader.feed(data[:4]) == []  # not even a header
    assert reader.feed(data[4:8]) == []  # header, part of the payload
    assert reader.feed(data[8:] + data[:2]) == [(p.STDOUT, b"abcdef")]
    assert bytes(reader.buf) == data[:2]


def test_frame_of_max_size_is_accepted() -> None:
    reader = p.FrameReader()
    payload = b"z" * p.MAX_FRAME
    assert reader.feed(p.frame(p.STDOUT, payload)) == [(p.STDOUT, payload)]


def test_oversize_frame_is_refused_from_its_header() -> None:
    reader = p.FrameReader()
    with pytest.raises(ValueError, match=str(p.MAX_FRAME + 1)):
        reader.feed(struct.pack(">BI", p.STDOUT, p.MAX_FRAME + 1))


def test_oversize_frame_after_good_ones() -> None:
    reader = p.FrameReader()
    with pytest.raises(ValueError):
        reader.feed(p.frame(p.STDOUT, b"ok") + struct.pack(">BI", p.STDOUT, 0xFFFFFFFF))


# --- read_json_lines --------------------------------------------------------


def test_read_json_lines_until_eof(pipe: Pipe) -> None:
    pipe.write(b'{"pid": 42}\n{"stage": "exec", "error": "no such file"}\n')
    pipe.close_w()
    assert p.read_json_lines(pipe.r, timeout=5) == [{"pid": 42}, {"stage": "exec", "error": "no such file"}]


def test_read_json_lines_empty_pipe_closed(pipe: Pipe) -> None:
    pipe.close_w()
    assert p.read_json_lines(pipe.r, timeout=5) == []


def test_read_json_lines_last_line_without_newline(pipe: Pipe) -> None:
    pipe.write(b'{"a": 1}\n{"b": 2}')
    pipe.close_w()
    assert p.read_json_lines(pipe.r, timeout=5) == [{"a": 1}, {"b": 2}]


def test_read_json_lines_garbled_line_is_an_error_entry(pipe: Pipe) -> None:
    pipe.write(b'{"pid": 7}\nnot json at all\n')
    pipe.close_w()
    messages = p.read_json_lines(pipe.r, timeout=5)
    assert messages[0] == {"pid": 7}
    assert len(messages) == 2
    assert messages[1]["stage"] == "sync"
    assert "garbled message" in messages[1]["error"] and "not json at all" in messages[1]["error"]


@pytest.mark.parametrize("line", [b"42", b"null"])
def test_read_json_lines_non_object_line_is_an_error_entry(pipe: Pipe, line: bytes) -> None:
    pipe.write(line + b"\n")
    pipe.close_w()
    messages = p.read_json_lines(pipe.r, timeout=5)
    assert len(messages) == 1 and messages[0]["stage"] == "sync" and "garbled" in messages[0]["error"]


def test_read_json_lines_timeout_returns_what_was_read(pipe: Pipe) -> None:
    pipe.write(b'{"pid": 9}\n')  # the writer stays open: only the timeout ends the read
    start = time.monotonic()
    assert p.read_json_lines(pipe.r, timeout=0.2) == [{"pid": 9}]
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 2


def test_read_json_lines_timeout_with_nothing(pipe: Pipe) -> None:
    assert p.read_json_lines(pipe.r, timeout=0.05) == []


def test_read_json_lines_large_output_in_many_reads(pipe: Pipe) -> None:
    lines = [{"i": i, "pad": "x" * 100} for i in range(1000)]  # more than one 64 KiB read
    data = b"".join(json.dumps(m).encode() + b"\n" for m in lines)
    assert len(data) > 65536

    def writer() -> None:
        for i in range(0, len(data), 4096):
            pipe.write(data[i:i + 4096])
        pipe.close_w()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert p.read_json_lines(pipe.r, timeout=5) == lines
    finally:
        thread.join(5)
