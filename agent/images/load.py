"""Importing the images of a spooled archive: blobs into the store, layers unpacked, tags set."""

from __future__ import annotations

import asyncio
import json
import tarfile
from pathlib import Path

from agent.errors import ArchiveError
from agent.images import manifest as mf
from agent.images.archive import ArchiveReader, LoadedImage, import_layer, read_images
from agent.images.store import ImageRecord, ImageStore, LayerRecord
from agent.images.unpacker import Unpacker, settle


async def load_archive(store: ImageStore, unpacker: Unpacker, path: Path, platform: mf.Platform) -> list[str]:
    """Load every image in the archive at ``path``; return docker's "Loaded image…" lines."""
    reader = await asyncio.to_thread(ArchiveReader, path)
    try:
        images = await asyncio.to_thread(read_images, reader, platform)
        if not images:
            raise ArchiveError("archive holds no images")
        lines: list[str] = []
        for image in images:
            lines.extend(await _load_one(store, unpacker, reader, image))
        return lines
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"archive is corrupt or truncated: {exc}") from exc
    finally:
        reader.close()


async def _load_one(store: ImageStore, unpacker: Unpacker, reader: ArchiveReader, image: LoadedImage) -> list[str]:
    config = mf.parse_config(image.config)
    if len(config.diff_ids) != len(image.layer_paths):
        raise ArchiveError(
            f"image {image.config_digest}: config lists {len(config.diff_ids)} diff_ids"
            f" for {len(image.layer_paths)} layers")
    content = store.content
    config_digest = await asyncio.to_thread(content.write_bytes, image.config, image.config_digest)
    chains = mf.chain_ids(config.diff_ids)
    keys = [config_digest, *chains]
    store.leases.add(keys)
    layer_digests: list[str] = []
    try:
        layers: list[LayerRecord] = []
        descriptors = []
        jobs = []
        for i, member in enumerate(image.layer_paths):
            digest, size, media_type = await asyncio.to_thread(import_layer, reader, content, member)
            store.leases.add([digest])
            layer_digests.append(digest)
            layers.append(LayerRecord(chains[i], config.diff_ids[i], digest, media_type))
            descriptors.append({"mediaType": media_type, "digest": digest, "size": size})
            jobs.append(unpacker.ensure(chains[i], chains[i - 1] if i else "", config.diff_ids[i], digest, media_type))
        sizes = await settle(jobs)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": mf.OCI_MANIFEST,
            "config": {"mediaType": mf.OCI_CONFIG, "digest": config_digest, "size": len(image.config)},
            "layers": descriptors,
        }, separators=(",", ":")).encode()
        manifest_digest = await asyncio.to_thread(content.write_bytes, manifest)
        record = ImageRecord(
            id=config_digest, manifest_digest=manifest_digest, manifest_media_type=mf.OCI_MANIFEST,
            config_digest=config_digest, created=mf.parse_timestamp(config.created), size=sum(sizes),
            os=config.os, architecture=config.architecture, variant=config.variant,
            top_chain_id=chains[-1] if chains else "",
        )
        blobs = [config_digest, manifest_digest, *layer_digests]
        if not image.tags:
            store.add(record, blobs, layers, None, None)
            return [f"Loaded image ID: {record.id}"]
        for ref in image.tags:
            store.add(record, blobs, layers, ref, None)
        return [f"Loaded image: {ref.familiar()}" for ref in image.tags]
    finally:
        store.leases.release(keys)
        store.leases.release(layer_digests)
