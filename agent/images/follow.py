"""Reading a layer blob while it is still being downloaded.

The downloader appends to ``ingest/<hex>.partial``; an unpack worker reads
the same file through :class:`GrowingFile`, waiting for bytes until the
descriptor's size has been read.  The caller commits the snapshot only after
the download verified the blob's digest *and* the unpack matched the diff_id.
"""

from __future__ import annotations

import os
import time

from agent.errors import SkiffError, Unavailable


class StreamRestarted(SkiffError):
    """The file shrank under the reader (the download started over); unpack again from the blob."""


class GrowingFile:
    """File-like ``read()`` over a file another process appends to, up to ``size`` bytes."""

    def __init__(self, path: str, size: int, abort_path: str, *, done_path: str | None = None,
                 stall_timeout: float = 300.0, poll: float = 0.002) -> None:
        self.path = path
        self.size = size
        self.abort_path = abort_path
        self.stall_timeout = stall_timeout
        self.poll = poll
        self.consumed = 0
        self._parent = os.getppid()
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if done_path is None:
                raise
            # The download finished (and was renamed into place) before we got here.
            self._fd = os.open(done_path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, n: int = -1) -> bytes:
        remaining = self.size - self.consumed
        if remaining <= 0:
            return b""
        want = remaining if n < 0 else min(n, remaining)
        enough = min(want, 64 << 10)
        waited_since = time.monotonic()
        while True:
            available = os.fstat(self._fd).st_size - self.consumed
            if available < 0:
                raise StreamRestarted(f"{self.path} shrank while being read (the download restarted)")
            if available >= enough:
                data = os.pread(self._fd, min(want, available), self.consumed)
                self.consumed += len(data)
                return data
            self._check_replaced()
            if os.path.exists(self.abort_path):
                raise Unavailable(f"download of {self.path} was abandoned")
            if os.getppid() != self._parent:
                raise Unavailable(f"the agent went away while {self.path} was being unpacked")
            if time.monotonic() - waited_since > self.stall_timeout:
                raise Unavailable(f"no data for {self.path} in {self.stall_timeout:.0f}s")
            time.sleep(self.poll)

    def _check_replaced(self) -> None:
        """A retry may recreate the file: follow the new one if nothing was read yet."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            return  # committed (renamed away) or not yet recreated
        if current == os.fstat(self._fd).st_ino:
            return
        if self.consumed:
            raise StreamRestarted(f"{self.path} was replaced while being read (the download restarted)")
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GrowingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
