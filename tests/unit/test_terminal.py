import asyncio
import contextlib
import fcntl
import os
import re
import signal
import struct
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.terminal import DetachKeys, RawTerminal, stdin_chunks, watch_resize, window_size

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # as tests/integration/conftest.py does, for tests.support
    sys.path.insert(0, str(REPO))

from tests.support.ptydriver import PtyProcess

LFLAG, IFLAG, OFLAG = 3, 0, 1


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# -- DetachKeys ------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    ("ctrl-p,ctrl-q", b"\x10\x11"),
    ("ctrl-a,x", b"\x01x"),
    ("ctrl-@,ctrl-[,ctrl-\\,ctrl-],ctrl-^,ctrl-_", b"\x00\x1b\x1c\x1d\x1e\x1f"),
    ("ctrl-z,DEL,Z", b"\x1a\x7fZ"),
])
def test_parses_docker_detach_key_syntax(spec: str, expected: bytes) -> None:
    assert DetachKeys(spec).sequence == expected


def test_default_is_ctrl_p_ctrl_q() -> None:
    assert DetachKeys().sequence == b"\x10\x11"


@pytest.mark.parametrize("spec", ["", "ctrl-P", "ctrl-1", "ctrl", "ab", "ctrl-p,,ctrl-q", "é", "ctrl-p ,ctrl-q"])
def test_rejects_invalid_spec_with_one_line_message(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        DetachKeys(spec)
    message = str(info.value)
    assert "\n" not in message
    assert repr(spec) in message


def test_detaches_when_sequence_is_split_across_chunks() -> None:
    keys = DetachKeys()
    assert keys.feed(b"ls\r\x10") == (b"ls\r", False)
    assert keys.pending == b"\x10"
    assert keys.feed(b"\x11ignored") == (b"", True)
    assert keys.pending == b""


def test_detaches_within_one_chunk_and_forwards_what_came_before() -> None:
    assert DetachKeys().feed(b"abc\x10\x11def") == (b"abc", True)


def test_broken_sequence_is_forwarded_intact_and_in_order() -> None:
    keys = DetachKeys()
    assert keys.feed(b"\x10") == (b"", False)
    assert keys.feed(b"x") == (b"\x10x", False)
    assert keys.feed(b"a\x10") == (b"a", False)
    assert keys.feed(b"\x10") == (b"\x10", False)  # the second ctrl-p may still start the sequence
    assert keys.feed(b"\x11") == (b"", True)


def test_flush_releases_held_bytes_at_eof() -> None:
    keys = DetachKeys()
    assert keys.feed(b"q\x10") == (b"q", False)
    assert keys.flush() == b"\x10"
    assert keys.flush() == b""


def test_custom_keys_ctrl_a_x() -> None:
    keys = DetachKeys("ctrl-a,x")
    assert keys.feed(b"xx\x01") == (b"xx", False)
    assert keys.feed(b"y") == (b"\x01y", False)
    assert keys.feed(b"\x01\x01") == (b"\x01", False)
    assert keys.feed(b"x") == (b"", True)


def test_overlapping_prefix_is_found() -> None:
    keys = DetachKeys("a,a,b")
    forwarded, detached = keys.feed(b"aaab")
    assert (forwarded, detached) == (b"a", True)


def test_every_chunking_of_a_stream_gives_the_same_result() -> None:
    stream = b"hi\x10there\x10\x10\x11tail"
    for size in range(1, len(stream) + 1):
        keys = DetachKeys()
        out, detached = b"", False
        for i in range(0, len(stream), size):
            forwarded, detached = keys.feed(stream[i:i + size])
            out += forwarded
            if detached:
                break
        assert (out, detached) == (b"hi\x10there\x10", True), size


# -- RawTerminal and window_size ------------------------------------------------


def test_raw_terminal_switches_off_echo_canon_isig_and_restores_after_exception(pty_pair: tuple[int, int]) -> None:
    _, slave = pty_pair
    before = termios.tcgetattr(slave)
    assert before[LFLAG] & termios.ECHO and before[LFLAG] & termios.ICANON and before[LFLAG] & termios.ISIG
    with pytest.raises(RuntimeError, match="boom"), RawTerminal(slave) as raw:
        assert raw.active
        attrs = termios.tcgetattr(slave)
        for flag in (termios.ECHO, termios.ECHONL, termios.ICANON, termios.ISIG, termios.IEXTEN):
            assert not attrs[LFLAG] & flag
        for flag in (termios.ICRNL, termios.IXON, termios.BRKINT, termios.ISTRIP, termios.INLCR):
            assert not attrs[IFLAG] & flag
        assert not attrs[OFLAG] & termios.OPOST
        assert attrs[2] & termios.CSIZE == termios.CS8
        assert attrs[6][termios.VMIN] == 1 and attrs[6][termios.VTIME] == 0
        raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before
    assert not raw.active


def test_raw_terminal_puts_signal_handlers_back(pty_pair: tuple[int, int]) -> None:
    before = {s: signal.getsignal(s) for s in RawTerminal.EXIT_SIGNALS}
    with RawTerminal(pty_pair[1]):
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in RawTerminal.EXIT_SIGNALS} == before


def test_raw_terminal_is_a_noop_on_a_pipe() -> None:
    r, w = os.pipe()
    try:
        with RawTerminal(r) as raw:
            assert not raw.active
    finally:
        os.close(r)
        os.close(w)


def test_window_size(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    assert window_size(slave) is None  # a fresh pty reports 0x0
    set_size(master, 33, 101)
    assert window_size(slave) == (33, 101)
    r, w = os.pipe()
    assert window_size(r) is None
    os.close(r)
    os.close(w)


async def test_watch_resize_calls_back_with_the_new_size(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    seen: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()

    async def on_resize(rows: int, cols: int) -> None:
        await seen.put(("async", rows, cols))

    remove = watch_resize(slave, on_resize)
    try:
        set_size(master, 50, 120)
        os.kill(os.getpid(), signal.SIGWINCH)  # our process is not the pty's foreground group
        assert await asyncio.wait_for(seen.get(), 5) == ("async", 50, 120)
    finally:
        remove()
    remove = watch_resize(slave, lambda rows, cols: seen.put_nowait(("sync", rows, cols)))
    set_size(master, 10, 20)
    os.kill(os.getpid(), signal.SIGWINCH)
    assert await asyncio.wait_for(seen.get(), 5) == ("sync", 10, 20)
    remove()


# -- stdin_chunks -----------------------------------------------------------


async def test_stdin_chunks_reads_a_pipe_to_eof_and_restores_blocking() -> None:
    r, w = os.pipe()
    data = os.urandom(200_000)

    def writer() -> None:
        with os.fdopen(w, "wb") as fh:
            fh.write(data)

    thread = threading.Thread(target=writer)
    thread.start()
    chunks = [chunk async for chunk in stdin_chunks(r)]
    thread.join()
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= 32 * 1024
    assert os.get_blocking(r)
    os.close(r)


async def test_stdin_chunks_restores_blocking_when_closed_early() -> None:
    r, w = os.pipe()
    os.write(w, b"first")
    async with contextlib.aclosing(stdin_chunks(r)) as chunks:
        async for chunk in chunks:
            assert chunk == b"first"
            assert not os.get_blocking(r)
            break
    assert os.get_blocking(r)
    os.close(r)
    os.close(w)


# -- the pty driver, against a child that uses RawTerminal on a real controlling tty ----------

CHILD = r"""
import os, signal, sys
from controller.terminal import RawTerminal, window_size

def on_winch(signum, frame):
    os.write(1, b"size=%dx%d\r\n" % window_size(0))

signal.signal(signal.SIGWINCH, on_winch)
with RawTerminal(0):
    os.write(1, b"ready %dx%d\r\n" % window_size(0))
    while (key := os.read(0, 1)) not in (b"", b"q"):
        os.write(1, b"got:" + key.hex().encode() + b"\r\n")
sys.exit(3)
"""


def spawn_child() -> PtyProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return PtyProcess.spawn([sys.executable, "-c", CHILD], env=env, rows=24, cols=80)


def test_ptydriver_resize_keys_and_exit_code() -> None:
    with spawn_child() as proc:
        proc.expect(b"ready 24x80\r\n")
        proc.resize(40, 132)
        previous = proc.expect(b"size=40x132\r\n")
        for key, shown in [(b"x", b"78"), (b"\x03", b"03"), (b"\r", b"0d")]:  # no echo, no SIGINT, no ICRNL
            proc.send(key)
            match = proc.expect(b"got:" + shown + b"\r\n")
            assert proc.output[previous.end():match.start()] == b""
            previous = match
        proc.send(b"q")
        assert proc.wait(10) == 3
        attrs = termios.tcgetattr(proc.fd)  # on Linux the master reports the slave's attributes
        assert attrs[LFLAG] & termios.ECHO and attrs[LFLAG] & termios.ICANON


def test_raw_terminal_restores_on_sigterm_then_dies_of_it() -> None:
    with spawn_child() as proc:
        proc.expect(b"ready")
        assert not termios.tcgetattr(proc.fd)[LFLAG] & termios.ECHO
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
        attrs = termios.tcgetattr(proc.fd)
        assert attrs[LFLAG] & termios.ECHO and attrs[LFLAG] & termios.ISIG


def test_ptydriver_expect_reports_output_on_timeout_and_eof() -> None:
    with PtyProcess.spawn([sys.executable, "-c", "print('hello there')"]) as proc:
        with pytest.raises(AssertionError, match=re.escape("hello there")):
            proc.expect(b"never printed", timeout=5)
        assert proc.wait(5) == 0
    with PtyProcess.spawn([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        with pytest.raises(AssertionError, match="timed out"):
            proc.expect(b"x", timeout=0.2)
        pid = proc.pid
    assert proc.exit_code == -signal.SIGKILL  # close() killed and reaped it
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_ptydriver_reports_exec_failure() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-program"):
        PtyProcess.spawn(["/nonexistent/no-such-program"])
