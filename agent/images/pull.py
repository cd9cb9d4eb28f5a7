"""Pulling an image: resolve, fetch manifests and config, fetch and unpack layers, record.

Layers download in parallel (bounded), each into a resumable ingest; as each
blob completes it is unpacked in a worker process (one per core) into its own
pending snapshot, checked against the config's ``diff_ids`` and committed.
Concurrent pulls share work: one download per blob digest and one unpack per
chain ID, whoever asks first.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from agent.errors import (
    DataCorruption,
    DigestMismatch,
    InvalidArgument,
    ResourceExhausted,
    TooLarge,
    Unavailable,
)
from agent.images import manifest as mf
from agent.images.auth import Credentials, CredentialStore
from agent.images.content import BlobWriter, ContentStore
from agent.images.reference import Reference
from agent.images.registry import RegistryClient, RegistryConfig
from agent.images.snapshots import OverlaySnapshotter
from agent.images.store import ImageRecord, ImageStore, LayerRecord
from agent.images.unpacker import Singleflight, Unpacker, settle



@dataclass(frozen=True)
class PullEvent:
    """One progress line, shaped like docker's JSON message stream."""

    id: str = ""
    status: str = ""
    current: int = 0
    total: int = 0
    digest: str = ""
    reference: str = ""
    image_id: str = ""


Progress = Callable[[PullEvent], None]


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


class Puller:
    def __init__(
        self,
        store: ImageStore,
        credentials: CredentialStore,
        registry_config: RegistryConfig,
        unpacker: Unpacker,
        *,
        max_concurrent_downloads: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        download_retries: int = 5,
        max_layer_size: int = 64 << 30,
        stream_unpack: bool = True,
    ) -> None:
        self.store = store
        self.content: ContentStore = store.content
        self.snapshots: OverlaySnapshotter = store.snapshots
        self.credentials = credentials
        self.registry_config = registry_config
        self.unpacker = unpacker
        self.download_slots = asyncio.Semaphore(max_concurrent_downloads)
        self.transport = transport
        self.download_retries = download_retries
        self.max_layer_size = max_layer_size
        self.stream_unpack = stream_unpack
        self._blobs = Singleflight()
        self._clients: dict[str, tuple[RegistryClient, Credentials | None]] = {}
        self._retired: list[RegistryClient] = []

    def client(self, host: str) -> RegistryClient:
        """One client per registry, reused across pulls (its TLS context, scheme and tokens)
        until the credentials for that registry change."""
        creds = self.credentials.get(host)
        cached = self._clients.get(host)
        if cached is not None and cached[1] == creds:
            return cached[0]
        client = RegistryClient(host, self.registry_config, creds, transport=self.transport)
        self._clients[host] = (client, creds)
        if cached is not None:
            self._retired.append(cached[0])
        return client

    async def aclose(self) -> None:
        clients = [c for c, _ in self._clients.values()] + self._retired
        self._clients.clear()
        self._retired = []
        for client in clients:
            await client.aclose()

    async def pull(self, ref: Reference, platform: mf.Platform, progress: Progress) -> ImageRecord:
        return await self._pull(self.client(ref.domain), ref, platform, progress)

    async def _pull(self, client: RegistryClient, ref: Reference, platform: mf.Platform,
                    progress: Progress) -> ImageRecord:
        repo = ref.repository
        progress(PullEvent(status=f"{ref.tag or ref.digest}: Pulling from {ref.path}"))
        top = await client.get_manifest(repo, ref.api_reference, mf.ACCEPT)
        media_type = mf.detect_media_type(top.data, top.media_type)
        blobs = [top.digest]
        manifest_data, manifest_digest, manifest_type = top.data, top.digest, media_type
        if media_type in mf.INDEX_TYPES:
            desc = mf.select_platform(mf.parse_index(top.data, media_type), platform)
            fetched = await client.get_manifest(repo, desc.digest, mf.ACCEPT)
            if fetched.digest != desc.digest:
                raise DigestMismatch(f"manifest {desc.digest} hashes to {fetched.digest}")
            manifest_data, manifest_digest = fetched.data, fetched.digest
            manifest_type = mf.detect_media_type(fetched.data, fetched.media_type)
            if manifest_type not in mf.MANIFEST_TYPES:
                raise InvalidArgument(f"manifest list entry {desc.digest} is not an image manifest")
            blobs.append(manifest_digest)
        manifest = mf.parse_manifest(manifest_data, manifest_type)
        self._check_sizes(manifest)
        keys = [manifest.config.digest, *blobs, *(layer.digest for layer in manifest.layers)]
        self.store.leases.add(keys)
        chains: list[str] = []
        try:
            config_data = await self._config(client, repo, manifest.config)
            config = mf.parse_config(config_data)
            if len(config.diff_ids) != len(manifest.layers):
                raise InvalidArgument(
                    f"image config lists {len(config.diff_ids)} diff_ids for {len(manifest.layers)} layers")
            chains = mf.chain_ids(config.diff_ids)
            self.store.leases.add(chains)
            for blob_digest, data in ((top.digest, top.data), (manifest_digest, manifest_data)):
                await asyncio.to_thread(self.content.write_bytes, data, blob_digest)
            existed = self.store.get(manifest.config.digest) is not None
            layer_jobs = []
            for i, layer in enumerate(manifest.layers):
                parent = chains[i - 1] if i else ""
                layer_jobs.append(self._layer(client, repo, layer, chains[i], parent, config.diff_ids[i], progress))
            sizes = await settle(layer_jobs)
            record = ImageRecord(
                id=manifest.config.digest, manifest_digest=manifest_digest, manifest_media_type=manifest_type,
                config_digest=manifest.config.digest, created=mf.parse_timestamp(config.created),
                size=sum(sizes), os=config.os, architecture=config.architecture, variant=config.variant,
                top_chain_id=chains[-1] if chains else "",
            )
            layers = [LayerRecord(chains[i], config.diff_ids[i], lay.digest, lay.media_type)
                      for i, lay in enumerate(manifest.layers)]
            previous = self._tagged(ref)
            self.store.add(record, keys, layers, ref if ref.tag else None, f"{ref.name}@{top.digest}")
        finally:
            self.store.leases.release(keys)
            self.store.leases.release(chains)
        progress(PullEvent(status=f"Digest: {top.digest}"))
        fresh = not existed or previous != record.id
        status = "Downloaded newer image for" if fresh else "Image is up to date for"
        progress(PullEvent(status=f"Status: {status} {ref.familiar()}", digest=top.digest,
                           reference=str(ref), image_id=record.id))
        saved = self.store.get(record.id)
        assert saved is not None
        return saved

    def _check_sizes(self, manifest: mf.Manifest) -> None:
        """Refuse layers over the cap, and a pull that cannot fit on the data disk."""
        missing = 0
        for layer in manifest.layers:
            if layer.size > self.max_layer_size:
                raise TooLarge(f"layer {layer.digest} declares {layer.size} bytes,"
                               f" over the {self.max_layer_size}-byte cap")
            if not self.content.has(layer.digest):
                missing += layer.size - self.content.partial_size(layer.digest)
        free = shutil.disk_usage(self.content.root).free
        if missing > free:
            raise ResourceExhausted(
                f"not enough space in {self.content.root}: the layers need {missing} bytes, {free} are free")

    def _tagged(self, ref: Reference) -> str | None:
        if not ref.tag:
            return None
        row = self.store.db.query_one("SELECT image_id FROM tags WHERE name = ?", (str(ref),))
        return str(row["image_id"]) if row else None

    async def _config(self, client: RegistryClient, repo: str, desc: mf.Descriptor) -> bytes:
        if self.content.has(desc.digest):
            return await asyncio.to_thread(self.content.read_bytes, desc.digest,
                                           self.registry_config.max_config_size)
        data = await client.get_blob(repo, desc.digest, desc.size, self.registry_config.max_config_size)
        await asyncio.to_thread(self.content.write_bytes, data, desc.digest)
        return data

    async def _layer(self, client: RegistryClient, repo: str, desc: mf.Descriptor, chain_id: str,
                     parent: str, diff_id: str, progress: Progress) -> int:
        snap = self.snapshots.get(chain_id)
        if snap is not None:
            progress(PullEvent(id=short(desc.digest), status="Already exists"))
            return snap.size
        progress(PullEvent(id=short(desc.digest), status="Pulling fs layer"))

        started = asyncio.Event()
        download = asyncio.ensure_future(
            self._blobs.do(desc.digest, lambda: self._download(client, repo, desc, progress, started)))
        try:
            size = await self._unpack_layer(desc, chain_id, parent, diff_id, download, started, progress)
        finally:
            if not download.done():
                download.cancel()
            await asyncio.gather(download, return_exceptions=True)
        progress(PullEvent(id=short(desc.digest), status="Pull complete"))
        return size

    async def _unpack_layer(self, desc: mf.Descriptor, chain_id: str, parent: str, diff_id: str,
                            download: asyncio.Future[None], started: asyncio.Event, progress: Progress) -> int:
        """Unpack as the bytes arrive when this pull is the one downloading; else from the stored blob."""
        if self.stream_unpack:
            waiter: asyncio.Future[Any] = asyncio.ensure_future(started.wait())
            either: set[asyncio.Future[Any]] = {download, waiter}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if self.stream_unpack and started.is_set() and not download.done():
            if self.snapshots.get(chain_id) is None:
                progress(PullEvent(id=short(desc.digest), status="Extracting", total=desc.size))
            partial = self.content.ingest_dir / f"{desc.digest.removeprefix('sha256:')}.partial"
            return await self.unpacker.stream(chain_id, parent, diff_id, desc.digest, desc.media_type,
                                              partial, desc.size, download)
        await download
        if self.snapshots.get(chain_id) is None:
            progress(PullEvent(id=short(desc.digest), status="Extracting", total=desc.size))
        return await self.unpacker.ensure(chain_id, parent, diff_id, desc.digest, desc.media_type)

    async def _download(self, client: RegistryClient, repo: str, desc: mf.Descriptor,
                        progress: Progress, started: asyncio.Event | None = None) -> None:
        if self.content.has(desc.digest):
            if self.content.size(desc.digest) == desc.size:
                progress(PullEvent(id=short(desc.digest), status="Download complete"))
                return
            self.content.delete(desc.digest)
        lid = short(desc.digest)
        async with self.download_slots:
            for attempt in range(self.download_retries + 1):
                writer = await asyncio.to_thread(self.content.writer, desc.digest, desc.size)
                try:
                    await self._fetch_into(client, repo, desc, writer, progress, started)
                    progress(PullEvent(id=lid, status="Verifying Checksum"))
                    await asyncio.to_thread(writer.commit)
                    progress(PullEvent(id=lid, status="Download complete"))
                    return
                except DataCorruption:
                    await asyncio.to_thread(writer.discard)  # never resume from refused bytes
                    raise
                except (Unavailable, httpx.TransportError, OSError) as exc:
                    if attempt == self.download_retries:
                        raise Unavailable(f"downloading layer {desc.digest} from {client.host}:"
                                          f" {exc}") from exc
                    progress(PullEvent(id=lid, status=f"Retrying in {2 ** attempt}s"))
                    await asyncio.sleep(min(8.0, 0.2 * 2 ** attempt) * (0.5 + random.random()))
                finally:
                    writer.discard() if writer.offset == 0 else writer.close()  # empty: nothing to resume

    async def _fetch_into(self, client: RegistryClient, repo: str, desc: mf.Descriptor,
                          writer: BlobWriter, progress: Progress, started: asyncio.Event | None = None) -> None:
        lid = short(desc.digest)
        if writer.offset >= desc.size and desc.size > 0:
            return
        async with client.open_blob(repo, desc.digest, writer.offset) as stream:
            if stream.start != writer.offset:
                writer.restart()
            if started is not None:
                started.set()  # the partial file exists and grows from here: unpacking may follow it
            last = 0.0
            async for chunk in stream.chunks():  # ~1 MiB each: hashed and written off the loop
                await asyncio.to_thread(writer.write, chunk)
                now = time.monotonic()
                if now - last > 0.1:
                    last = now
                    progress(PullEvent(id=lid, status="Downloading", current=writer.offset, total=desc.size))
        progress(PullEvent(id=lid, status="Downloading", current=writer.offset, total=desc.size))


__all__ = ["PullEvent", "Puller"]
