"""Turning a stored layer blob into a committed snapshot, once per chain ID.

Both pulls and ``load`` come through here.  The blob is unpacked by
:func:`agent.images.unpack.apply_layer` in a worker process (one per core),
into a pending snapshot that is committed only if the unpacked stream hashes to
the config's diff_id; otherwise the snapshot is removed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import DigestMismatch
from agent.images.content import ContentStore
from agent.images.follow import StreamRestarted
from agent.images.snapshots import OverlaySnapshotter
from agent.images.unpack import LayerStats, apply_layer

T = TypeVar("T")


class Singleflight:
    """Run one task per key; later callers await the same result."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    async def do(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._tasks[key] = task
            task.add_done_callback(lambda _t: self._tasks.pop(key, None))
        return await asyncio.shield(task)


async def settle(jobs: Sequence[Awaitable[T]]) -> list[T]:
    """Await every job; raise the first failure only once all have finished.

    A failed layer must not leave siblings still downloading or unpacking
    after the caller's cleanup has run (they would commit orphans).
    """
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


class Unpacker:
    def __init__(self, content: ContentStore, snapshots: OverlaySnapshotter, executor: Executor) -> None:
        self.content = content
        self.snapshots = snapshots
        self.executor = executor
        self._flights = Singleflight()

    async def ensure(self, chain_id: str, parent: str, diff_id: str, blob_digest: str, media_type: str) -> int:
        """Make sure the snapshot ``chain_id`` exists; return its unpacked size."""
        existing = self.snapshots.get(chain_id)
        if existing is not None:
            return existing.size
        return await self._flights.do(
            chain_id, lambda: self._unpack(chain_id, parent, diff_id, blob_digest, media_type))

    async def stream(self, chain_id: str, parent: str, diff_id: str, blob_digest: str, media_type: str,
                     partial_path: Path, size: int, download: asyncio.Future[Any]) -> int:
        """Unpack while ``download`` is still writing ``partial_path``; commit only once both succeed."""
        existing = self.snapshots.get(chain_id)
        if existing is not None:
            return existing.size
        return await self._flights.do(chain_id, lambda: self._stream(
            chain_id, parent, diff_id, blob_digest, media_type, partial_path, size, download))

    async def _stream(self, chain_id: str, parent: str, diff_id: str, blob_digest: str, media_type: str,
                      partial_path: Path, size: int, download: asyncio.Future[Any]) -> int:
        existing = self.snapshots.get(chain_id)
        if existing is not None:
            return existing.size
        snap = self.snapshots.begin_layer(chain_id, parent, diff_id)
        abort = snap.path / "abort"
        loop = asyncio.get_running_loop()
        worker = loop.run_in_executor(self.executor, functools.partial(
            apply_layer, str(partial_path), media_type, str(snap.path / "fs"),
            follow_size=size, abort_path=str(abort), done_path=str(self.content.path(blob_digest))))
        try:
            pending: set[asyncio.Future[Any]] = {download, worker}
            await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            if download.done() and download.exception() is not None:
                abort.touch()
            outcome: tuple[Any, Any] = await asyncio.gather(download, worker, return_exceptions=True)
            fetched: Any = outcome[0]
            stats: Any = outcome[1]
            if isinstance(fetched, BaseException):
                raise fetched
            if isinstance(stats, StreamRestarted):
                await asyncio.to_thread(self.snapshots.abort, snap)
                return await self._unpack(chain_id, parent, diff_id, blob_digest, media_type)
            if isinstance(stats, BaseException):
                raise stats
            if stats.diff_id != diff_id:
                raise DigestMismatch(
                    f"layer {blob_digest}: unpacked content hashes to {stats.diff_id},"
                    f" but the image config says {diff_id}")
        except BaseException:
            abort.touch() if snap.path.exists() else None
            if not worker.done():  # cancelled: clean up once the worker has noticed the abort
                worker.add_done_callback(lambda _f: self.snapshots.abort(snap))
            else:
                await asyncio.to_thread(self.snapshots.abort, snap)
            raise
        self.snapshots.commit(snap, stats.size)
        return stats.size

    async def _unpack(self, chain_id: str, parent: str, diff_id: str, blob_digest: str, media_type: str) -> int:
        existing = self.snapshots.get(chain_id)
        if existing is not None:
            return existing.size
        snap = self.snapshots.begin_layer(chain_id, parent, diff_id)
        try:
            loop = asyncio.get_running_loop()
            stats: LayerStats = await loop.run_in_executor(
                self.executor, apply_layer, str(self.content.path(blob_digest)), media_type,
                str(snap.path / "fs"))
            if stats.diff_id != diff_id:
                raise DigestMismatch(
                    f"layer {blob_digest}: unpacked content hashes to {stats.diff_id},"
                    f" but the image config says {diff_id}")
        except BaseException:
            await asyncio.to_thread(self.snapshots.abort, snap)
            raise
        self.snapshots.commit(snap, stats.size)
        return stats.size
