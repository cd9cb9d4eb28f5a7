"""Content-addressed blob store: ``<root>/blobs/sha256/<hex>``.

Blobs are written to ``<root>/ingest/<hex>.partial`` while they arrive,
hashed as written, verified against the expected digest and size, fsynced and
renamed into place, so a blob under ``blobs/`` is always whole.  A partial
ingest survives a crash and is resumed (the prefix is re-hashed first).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DigestMismatch, InvalidArgument, NotFound, SizeMismatch, TooLarge

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_CHUNK = 1 << 20


def split_digest(digest: str) -> str:
    """Return the hex part of a ``sha256:<hex>`` digest; refuse anything else."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise InvalidArgument(f"unsupported or malformed digest {digest!r}")
    return match.group(1)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int


class BlobWriter:
    """Appends to one partial ingest, hashing as it goes; :meth:`commit` verifies and publishes."""

    def __init__(self, store: ContentStore, digest: str, expected_size: int | None) -> None:
        self._store = store
        self.digest = digest
        self.expected_size = expected_size
        self._hex = split_digest(digest)
        self.partial_path = store.ingest_dir / f"{self._hex}.partial"
        self._hash = hashlib.sha256()
        self._fd = os.open(self.partial_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        self.offset = 0
        self._rehash_prefix()

    def _rehash_prefix(self) -> None:
        size = os.fstat(self._fd).st_size
        if self.expected_size is not None and size > self.expected_size:
            os.ftruncate(self._fd, 0)
            size = 0
        pos = 0
        while pos < size:
            chunk = os.pread(self._fd, min(_CHUNK, size - pos), pos)
            if not chunk:
                break
            self._hash.update(chunk)
            pos += len(chunk)
        self.offset = pos
        os.lseek(self._fd, pos, os.SEEK_SET)

    def restart(self) -> None:
        """Drop what was written so far (the server ignored our Range request)."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        if self.expected_size is not None and self.offset + len(data) > self.expected_size:
            raise SizeMismatch(
                f"blob {self.digest}: more than the expected {self.expected_size} bytes received"
            )
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._hash.update(data)
        self.offset += len(data)

    def commit(self) -> Path:
        """Verify size and digest, fsync, rename into ``blobs/``; a mismatch discards the ingest."""
        try:
            if self.expected_size is not None and self.offset != self.expected_size:
                raise SizeMismatch(
                    f"blob {self.digest}: got {self.offset} bytes, expected {self.expected_size}"
                )
            actual = "sha256:" + self._hash.hexdigest()
            if actual != self.digest:
                raise DigestMismatch(f"blob {self.digest}: content hashes to {actual}")
        except Exception:
            self.discard()
            raise
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        final = self._store.path(self.digest)
        os.rename(self.partial_path, final)
        self._store.fsync_dir(final.parent)
        return final

    def close(self) -> None:
        """Keep the partial ingest for a later resume."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        self.partial_path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ContentStore:
    """Blobs by digest under ``root``; all writes go through :class:`BlobWriter`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.ingest_dir = root / "ingest"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.blob_dir / split_digest(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} not found in content store") from exc

    def writer(self, digest: str, expected_size: int | None) -> BlobWriter:
        return BlobWriter(self, digest, expected_size)

    def write_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Store small content (manifests, configs) and return its digest; safe to race."""
        actual = sha256_digest(data)
        if digest is not None and digest != actual:
            raise DigestMismatch(f"blob {digest}: content hashes to {actual}")
        if self.has(actual):
            return actual
        fd, tmp = tempfile.mkstemp(prefix=f"{split_digest(actual)}.", suffix=".tmp", dir=self.ingest_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, self.path(actual))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.fsync_dir(self.blob_dir)
        return actual

    def read_bytes(self, digest: str, max_size: int = 64 << 20) -> bytes:
        path = self.path(digest)
        try:
            size = path.stat().st_size
            if size > max_size:
                raise TooLarge(f"blob {digest} is {size} bytes, over the {max_size}-byte cap")
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} not found in content store") from exc

    def delete(self, digest: str) -> int:
        """Remove a blob; return the bytes freed (0 if it was absent)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def digests(self) -> list[str]:
        return ["sha256:" + p.name for p in self.blob_dir.iterdir() if _DIGEST.fullmatch("sha256:" + p.name)]

    def partial_size(self, digest: str) -> int:
        try:
            return (self.ingest_dir / f"{split_digest(digest)}.partial").stat().st_size
        except FileNotFoundError:
            return 0

    def clear_ingest(self, digest: str) -> None:
        (self.ingest_dir / f"{split_digest(digest)}.partial").unlink(missing_ok=True)

    @staticmethod
    def fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
