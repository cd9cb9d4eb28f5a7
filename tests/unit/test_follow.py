import os
import threading
import time
from pathlib import Path

import pytest

from agent.errors import Unavailable
from agent.images.follow import GrowingFile, StreamRestarted


def test_reads_while_the_file_grows(tmp_path: Path) -> None:
    path = tmp_path / "blob.partial"
    path.write_bytes(b"")
    data = os.urandom(300_000)

    def writer() -> None:
        with open(path, "ab") as fh:
            for i in range(0, len(data), 50_000):
                fh.write(data[i:i + 50_000])
                fh.flush()
                time.sleep(0.01)

    thread = threading.Thread(target=writer)
    thread.start()
    out = bytearray()
    with GrowingFile(str(path), len(data), str(tmp_path / "abort")) as follower:
        while chunk := follower.read(1 << 20):
            out += chunk
    thread.join()
    assert bytes(out) == data


def test_abort_and_stall(tmp_path: Path) -> None:
    path = tmp_path / "blob.partial"
    path.write_bytes(b"x" * 10)
    abort = tmp_path / "abort"
    abort.touch()
    with GrowingFile(str(path), 100, str(abort)) as follower:
        assert follower.read(10) == b"x" * 10
        with pytest.raises(Unavailable, match="abandoned"):
            follower.read(10)
    with GrowingFile(str(path), 100, str(tmp_path / "no-abort"), stall_timeout=0.05) as follower:
        follower.read(10)
        with pytest.raises(Unavailable, match="no data"):
            follower.read(10)


def test_shrink_or_replacement_after_reading_restarts(tmp_path: Path) -> None:
    path = tmp_path / "blob.partial"
    path.write_bytes(b"a" * 100)
    with GrowingFile(str(path), 200, str(tmp_path / "abort")) as follower:
        follower.read(100)
        os.truncate(path, 0)
        with pytest.raises(StreamRestarted):
            follower.read(10)
    path.write_bytes(b"b" * 100)
    with GrowingFile(str(path), 200, str(tmp_path / "abort")) as follower:
        follower.read(100)
        path.unlink()
        path.write_bytes(b"c" * 300)
        with pytest.raises(StreamRestarted):
            follower.read(10)


def test_follows_a_recreated_file_before_reading_and_a_finished_one(tmp_path: Path) -> None:
    path = tmp_path / "blob.partial"
    path.write_bytes(b"")
    with GrowingFile(str(path), 4, str(tmp_path / "abort")) as follower:
        path.unlink()
        path.write_bytes(b"good")
        assert follower.read(4) == b"good"
    done = tmp_path / "blob"
    done.write_bytes(b"done")
    with GrowingFile(str(tmp_path / "gone.partial"), 4, str(tmp_path / "abort"), done_path=str(done)) as follower:
        assert follower.read(-1) == b"done"
