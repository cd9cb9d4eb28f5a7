import hashlib
import os
import stat
from pathlib import Path

import pytest

from agent.errors import DigestMismatch, InvalidArgument, SizeMismatch, TooLarge
from agent.images.content import ContentStore, sha256_digest


def test_write_verify_rename(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = b"hello world" * 1000
    digest = sha256_digest(data)
    with store.writer(digest, len(data)) as writer:
        writer.write(data[:100])
        writer.write(data[100:])
        final = writer.commit()
    assert final == store.path(digest)
    assert final.read_bytes() == data
    assert store.has(digest) and store.size(digest) == len(data)
    assert not list(store.ingest_dir.iterdir())


def test_mismatch_discards_and_keeps_nothing(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    digest = sha256_digest(b"expected")
    with store.writer(digest, 8) as writer:
        writer.write(b"tampered")
        with pytest.raises(DigestMismatch):
            writer.commit()
    assert not store.has(digest)
    assert not list(store.ingest_dir.iterdir())


def test_size_overrun_refused(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    with store.writer(sha256_digest(b"abc"), 3) as writer:
        with pytest.raises(SizeMismatch):
            writer.write(b"abcd")


def test_short_blob_refused(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    with store.writer(sha256_digest(b"abc"), 3) as writer:
        writer.write(b"ab")
        with pytest.raises(SizeMismatch):
            writer.commit()


def test_resume_rehashes_prefix(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = os.urandom(3 << 20)
    digest = sha256_digest(data)
    writer = store.writer(digest, len(data))
    writer.write(data[: 1 << 20])
    writer.close()  # as if the agent died here
    assert store.partial_size(digest) == 1 << 20
    resumed = store.writer(digest, len(data))
    assert resumed.offset == 1 << 20
    resumed.write(data[1 << 20:])
    resumed.commit()
    assert hashlib.sha256(store.path(digest).read_bytes()).hexdigest() == digest[7:]


def test_restart_when_range_ignored(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = b"x" * 100
    digest = sha256_digest(data)
    writer = store.writer(digest, 100)
    writer.write(data[:40])
    writer.restart()
    writer.write(data)
    writer.commit()
    assert store.path(digest).read_bytes() == data


def test_partial_longer_than_expected_is_dropped(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    digest = sha256_digest(b"abc")
    (store.ingest_dir / f"{digest[7:]}.partial").write_bytes(b"garbage-too-long")
    writer = store.writer(digest, 3)
    assert writer.offset == 0
    writer.write(b"abc")
    writer.commit()


def test_bad_digest_and_caps(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    with pytest.raises(InvalidArgument):
        store.path("md5:abc")
    with pytest.raises(InvalidArgument):
        store.path("sha256:../../etc/passwd")
    digest = store.write_bytes(b"x" * 100)
    with pytest.raises(TooLarge):
        store.read_bytes(digest, max_size=10)
    assert store.read_bytes(digest) == b"x" * 100
    assert stat.S_ISREG(store.path(digest).stat().st_mode)
    assert store.delete(digest) == 100 and store.delete(digest) == 0
