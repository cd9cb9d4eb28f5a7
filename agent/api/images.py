"""Images and Registries services: convert, call, map errors (the interceptor maps them)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from collections.abc import AsyncIterator

import structlog
from grpc import aio

from agent.daemon import Daemon
from agent.errors import InvalidArgument, SkiffError, TooLarge
from agent.images import archive
from agent.images import inspect as inspect_mod
from agent.images import manifest as mf
from agent.images.auth import Credentials
from agent.images.load import load_archive
from agent.images.pull import PullEvent
from agent.images.reference import DEFAULT_DOMAIN, parse
from agent.images.registry import RegistryClient
from agent.images.store import ImageRecord, display_ref, match_filters, matching_tags, parse_filters
from skiff.v1 import images_pb2, images_pb2_grpc

log = structlog.get_logger("skiffd.images")
CHUNK = 1 << 20
MAX_ARCHIVE = 256 << 30


def _labels(daemon: Daemon, record: ImageRecord) -> dict[str, str]:
    try:
        config = mf.parse_config(daemon.content.read_bytes(record.config_digest, 16 << 20))
    except Exception:
        return {}
    labels = (config.raw.get("config") or {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _summary(record: ImageRecord, labels: dict[str, str]) -> images_pb2.ImageSummary:
    return images_pb2.ImageSummary(
        id=record.id, repo_tags=[display_ref(t) for t in record.tags],
        repo_digests=[display_ref(d) for d in record.repo_digests], created=record.created,
        size=record.size, labels=labels,
    )


class ImagesService(images_pb2_grpc.ImagesServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def Pull(self, request: images_pb2.PullRequest,
                   context: aio.ServicerContext) -> AsyncIterator[images_pb2.PullProgress]:
        ref = parse(request.reference)
        platform = mf.parse_platform(request.platform)
        queue: asyncio.Queue[PullEvent | None] = asyncio.Queue()
        task = asyncio.create_task(self.daemon.puller.pull(ref, platform, queue.put_nowait))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield images_pb2.PullProgress(
                    id=event.id, status=event.status, current=event.current, total=event.total,
                    digest=event.digest, reference=event.reference, image_id=event.image_id)
            await task
        except SkiffError:
            # A refused pull keeps nothing it fetched; an interrupted one (below) keeps
            # its verified blobs and partial downloads for the next attempt.
            await asyncio.to_thread(self.daemon.images.gc)
            raise
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def List(self, request: images_pb2.ListImagesRequest,
                   context: aio.ServicerContext) -> images_pb2.ListImagesResponse:
        filters = parse_filters(request.filters)
        out = []
        for record in self.daemon.images.records():
            labels = _labels(self.daemon, record)
            if match_filters(record, filters, labels):
                record.tags = matching_tags(record, filters)
                out.append(_summary(record, labels))
        return images_pb2.ListImagesResponse(images=out)

    async def Inspect(self, request: images_pb2.InspectImageRequest,
                      context: aio.ServicerContext) -> images_pb2.InspectImageResponse:
        record = self.daemon.images.resolve(request.image)
        data = await asyncio.to_thread(inspect_mod.inspect_json, self.daemon.images, record)
        return images_pb2.InspectImageResponse(json=data)

    async def History(self, request: images_pb2.ImageHistoryRequest,
                      context: aio.ServicerContext) -> images_pb2.ImageHistoryResponse:
        record = self.daemon.images.resolve(request.image)
        entries = inspect_mod.history(self.daemon.images, record)
        return images_pb2.ImageHistoryResponse(entries=[
            images_pb2.HistoryEntry(id=e["Id"], created=e["Created"], created_by=e["CreatedBy"],
                                    size=e["Size"], comment=e["Comment"], tags=e["Tags"])
            for e in entries])

    async def Tag(self, request: images_pb2.TagImageRequest,
                  context: aio.ServicerContext) -> images_pb2.TagImageResponse:
        self.daemon.images.tag(request.source, request.target)
        return images_pb2.TagImageResponse()

    async def Remove(self, request: images_pb2.RemoveImageRequest,
                     context: aio.ServicerContext) -> images_pb2.RemoveImageResponse:
        result = await asyncio.to_thread(
            self.daemon.images.remove, request.image, force=request.force, prune=not request.no_prune)
        return images_pb2.RemoveImageResponse(untagged=result.untagged, deleted=result.deleted)

    async def Prune(self, request: images_pb2.PruneImagesRequest,
                    context: aio.ServicerContext) -> images_pb2.PruneImagesResponse:
        filters = parse_filters(request.filters)
        result = await asyncio.to_thread(self.daemon.images.prune, all_images=request.all, filters=filters)
        return images_pb2.PruneImagesResponse(untagged=result.untagged, deleted=result.deleted,
                                              space_reclaimed=result.space_reclaimed)


    async def Save(self, request: images_pb2.SaveImagesRequest,
                   context: aio.ServicerContext) -> AsyncIterator[images_pb2.DataChunk]:
        if not request.images:
            raise InvalidArgument("save needs at least one image")
        for name in request.images:
            self.daemon.images.resolve(name)
        tmp = self.daemon.config.data_root / "tmp"
        tmp.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="save-", suffix=".tar", dir=tmp)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                await asyncio.to_thread(archive.write_archive, self.daemon.images, list(request.images), out, tmp)
            with open(path, "rb") as fh:
                while chunk := await asyncio.to_thread(fh.read, CHUNK):
                    yield images_pb2.DataChunk(data=chunk)
        finally:
            path.unlink(missing_ok=True)

    async def Load(self, request_iterator: AsyncIterator[images_pb2.LoadImagesRequest],
                   context: aio.ServicerContext) -> AsyncIterator[images_pb2.LoadProgress]:
        tmp = self.daemon.config.data_root / "tmp"
        tmp.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="load-", suffix=".tar", dir=tmp)
        path = Path(name)
        try:
            total = 0
            with os.fdopen(fd, "wb") as out:
                async for req in request_iterator:
                    total += len(req.data)
                    if total > MAX_ARCHIVE:
                        raise TooLarge(f"archive larger than the {MAX_ARCHIVE}-byte cap")
                    await asyncio.to_thread(out.write, req.data)
            if total == 0:
                raise InvalidArgument("empty archive: nothing to load")
            lines = await load_archive(self.daemon.images, self.daemon.unpacker, path, mf.host_platform())
            yield images_pb2.LoadProgress(status="loaded", loaded=lines)
        except BaseException:
            await asyncio.to_thread(self.daemon.images.gc)
            raise
        finally:
            path.unlink(missing_ok=True)


class RegistriesService(images_pb2_grpc.RegistriesServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @staticmethod
    def _host(server: str) -> str:
        host = server.strip() or DEFAULT_DOMAIN
        for prefix in ("https://", "http://"):
            host = host.removeprefix(prefix)
        host = host.split("/", 1)[0]
        if not host:
            raise InvalidArgument(f"invalid registry address {server!r}")
        return host

    async def Login(self, request: images_pb2.LoginRequest,
                    context: aio.ServicerContext) -> images_pb2.LoginResponse:
        if not request.username or not request.password:
            raise InvalidArgument("login needs a username and a password")
        host = self._host(request.server)
        creds = Credentials(request.username, request.password)
        client = RegistryClient(host, self.daemon.registry_config, creds)
        try:
            await client.ping()
        finally:
            await client.aclose()
        await asyncio.to_thread(self.daemon.credentials.set, host, creds)
        log.info("login", registry=host, username=request.username)
        return images_pb2.LoginResponse(status="Login Succeeded")

    async def Logout(self, request: images_pb2.LogoutRequest,
                     context: aio.ServicerContext) -> images_pb2.LogoutResponse:
        host = self._host(request.server)
        removed = await asyncio.to_thread(self.daemon.credentials.remove, host)
        status = f"Removing login credentials for {host}" if removed else f"Not logged in to {host}"
        return images_pb2.LogoutResponse(status=status)


