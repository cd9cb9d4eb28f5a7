"""``save`` and ``load``: docker-archive tars, which are also OCI image layouts.

A saved archive holds ``manifest.json`` (the docker-archive index that
``docker load``, ``podman load`` and ``skopeo copy docker-archive:`` read) and
``oci-layout`` + ``index.json`` + ``blobs/sha256/…`` (an OCI image layout), as
Docker 25+ writes them.  Layers are stored uncompressed, so their digests are
the config's diff_ids.

``load`` accepts a docker-archive (with or without the OCI files; layers plain,
gzip or zstd) or a plain OCI-layout tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.errors import ArchiveError, DigestMismatch, InvalidReference, TooLarge
from agent.images import manifest as mf
from agent.images.content import ContentStore, split_digest
from agent.images.layerstream import decompressed_chunks
from agent.images.reference import Reference, parse
from agent.images.store import ImageRecord, ImageStore, display_ref

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MAX_JSON = 16 << 20
CHUNK = 1 << 20


# --- save --------------------------------------------------------------------


@dataclass
class _SaveItem:
    record: ImageRecord
    tags: list[str]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 0
    tar.addfile(info)


def _spool_layer(content: ContentStore, digest: str, media_type: str, diff_id: str, spool_dir: Path) -> Path:
    """Decompress one stored layer blob to a temp file, checking it against its diff_id."""
    fd, name = tempfile.mkstemp(prefix="layer-", dir=spool_dir)
    hasher = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        for chunk in decompressed_chunks(str(content.path(digest)), media_type):
            hasher.update(chunk)
            out.write(chunk)
    if "sha256:" + hasher.hexdigest() != diff_id:
        os.unlink(name)
        raise DigestMismatch(f"stored layer {digest} no longer matches its diff_id {diff_id}")
    return Path(name)


def write_archive(store: ImageStore, names: list[str], out: IO[bytes], spool_dir: Path) -> None:
    """Write a docker-archive / OCI-layout tar of the named images to ``out``."""
    items: list[_SaveItem] = []
    for name in names:
        record, by_id = store.lookup(name)
        tags: list[str] = []
        if not by_id:
            ref = parse(name)
            if ref.tag:
                tags.append(str(ref.with_tag(ref.tag)))
        existing = next((i for i in items if i.record.id == record.id), None)
        if existing is not None:
            existing.tags.extend(t for t in tags if t not in existing.tags)
        else:
            items.append(_SaveItem(record, tags))
    written: set[str] = set()
    manifest_json: list[dict[str, Any]] = []
    index: list[dict[str, Any]] = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_dir(tar, "blobs/")
        _add_dir(tar, "blobs/sha256/")

        def blob(digest: str, data: bytes) -> None:
            if digest not in written:
                written.add(digest)
                _add_bytes(tar, f"blobs/sha256/{split_digest(digest)}", data)

        for item in items:
            record = item.record
            config = store.content.read_bytes(record.config_digest, MAX_JSON)
            blob(record.config_digest, config)
            layers = store.layers(record.id)
            descriptors: list[dict[str, Any]] = []
            for layer in layers:
                path = _spool_layer(store.content, layer.digest, layer.media_type, layer.diff_id, spool_dir)
                try:
                    size = path.stat().st_size
                    if layer.diff_id not in written:
                        written.add(layer.diff_id)
                        info = tarfile.TarInfo(f"blobs/sha256/{split_digest(layer.diff_id)}")
                        info.size, info.mtime, info.mode = size, 0, 0o644
                        with open(path, "rb") as fh:
                            tar.addfile(info, fh)
                finally:
                    path.unlink(missing_ok=True)
                descriptors.append({"mediaType": LAYER_TAR, "digest": layer.diff_id, "size": size})
            oci_manifest = json.dumps({
                "schemaVersion": 2, "mediaType": mf.OCI_MANIFEST,
                "config": {"mediaType": mf.OCI_CONFIG, "digest": record.config_digest, "size": len(config)},
                "layers": descriptors,
            }, separators=(",", ":")).encode()
            manifest_digest = "sha256:" + hashlib.sha256(oci_manifest).hexdigest()
            blob(manifest_digest, oci_manifest)
            refs = item.tags or [""]
            for full in refs:
                entry: dict[str, Any] = {"mediaType": mf.OCI_MANIFEST, "digest": manifest_digest,
                                         "size": len(oci_manifest)}
                if full:
                    entry["annotations"] = {"io.containerd.image.name": full,
                                            "org.opencontainers.image.ref.name": full.rpartition(":")[2]}
                index.append(entry)
            manifest_json.append({
                "Config": f"blobs/sha256/{split_digest(record.config_digest)}",
                "RepoTags": [display_ref(t) for t in item.tags],
                "Layers": [f"blobs/sha256/{split_digest(d['digest'])}" for d in descriptors],
            })
        _add_bytes(tar, "index.json", json.dumps(
            {"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": index}, separators=(",", ":")).encode())
        _add_bytes(tar, "manifest.json", json.dumps(manifest_json, separators=(",", ":")).encode())


# --- load --------------------------------------------------------------------


@dataclass
class LoadedImage:
    config: bytes
    config_digest: str
    layer_paths: list[str]  # member names inside the archive
    tags: list[Reference] = field(default_factory=list)


class ArchiveReader:
    """Random access to an archive spooled on disk, members checked against size caps."""

    def __init__(self, path: Path) -> None:
        try:
            self.tar = tarfile.open(path, mode="r:")
            members = self.tar.getmembers()
        except (tarfile.TarError, OSError) as exc:
            raise ArchiveError(f"not a tar archive, or a truncated one: {exc}") from exc
        self.members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            name = os.path.normpath(member.name).lstrip("/")
            if member.isreg():
                self.members[name] = member

    def close(self) -> None:
        self.tar.close()

    def has(self, name: str) -> bool:
        return os.path.normpath(name).lstrip("/") in self.members

    def member(self, name: str) -> tarfile.TarInfo:
        key = os.path.normpath(name).lstrip("/")
        if key.startswith("..") or key not in self.members:
            raise ArchiveError(f"archive has no file {name!r}")
        return self.members[key]

    def read(self, name: str, limit: int = MAX_JSON) -> bytes:
        member = self.member(name)
        if member.size > limit:
            raise TooLarge(f"archive member {name} is {member.size} bytes, over the {limit}-byte cap")
        fh = self.tar.extractfile(member)
        if fh is None:
            raise ArchiveError(f"archive member {name} is not a regular file")
        return fh.read()

    def open(self, name: str) -> IO[bytes]:
        fh = self.tar.extractfile(self.member(name))
        if fh is None:
            raise ArchiveError(f"archive member {name} is not a regular file")
        return fh

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as exc:
            raise ArchiveError(f"archive member {name} is not valid JSON: {exc}") from exc


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{split_digest(digest)}"


def _ref_or_none(text: str) -> Reference | None:
    try:
        ref = parse(text)
    except InvalidReference:
        return None
    return ref if ref.tag else None


def read_images(reader: ArchiveReader, platform: mf.Platform) -> list[LoadedImage]:
    """The images an archive holds: from manifest.json if present, else from index.json."""
    if reader.has("manifest.json"):
        doc = reader.json("manifest.json")
        if not isinstance(doc, list):
            raise ArchiveError("manifest.json is not a list")
        images = []
        for entry in doc:
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                    or not isinstance(entry.get("Layers"), list):
                raise ArchiveError("manifest.json entry lacks Config or Layers")
            config = reader.read(entry["Config"])
            tags = [r for r in (_ref_or_none(t) for t in entry.get("RepoTags") or [] if isinstance(t, str)) if r]
            images.append(LoadedImage(config, "sha256:" + hashlib.sha256(config).hexdigest(),
                                      [str(p) for p in entry["Layers"]], tags))
        return images
    if reader.has("index.json"):
        return _read_oci_layout(reader, platform)
    raise ArchiveError("archive has neither manifest.json (docker-archive) nor index.json (OCI layout)")


def _read_oci_layout(reader: ArchiveReader, platform: mf.Platform) -> list[LoadedImage]:
    index = mf.parse_index(reader.read("index.json"), mf.OCI_INDEX)
    images: dict[str, LoadedImage] = {}
    for desc in index.manifests:
        target = desc
        if desc.media_type in mf.INDEX_TYPES:
            target = mf.select_platform(mf.parse_index(_verified(reader, desc), desc.media_type), platform)
        manifest = mf.parse_manifest(_verified(reader, target), target.media_type or mf.OCI_MANIFEST)
        config = _verified(reader, manifest.config)
        image = images.get(manifest.config.digest)
        if image is None:
            image = LoadedImage(config, manifest.config.digest, [_blob_path(lay.digest) for lay in manifest.layers])
            images[manifest.config.digest] = image
        name = desc.annotations.get("io.containerd.image.name") or desc.annotations.get(
            "org.opencontainers.image.ref.name", "")
        ref = _ref_or_none(name) if name else None
        if ref is not None:
            image.tags.append(ref)
    return list(images.values())


def _verified(reader: ArchiveReader, desc: mf.Descriptor) -> bytes:
    data = reader.read(_blob_path(desc.digest))
    if "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
        raise DigestMismatch(f"archive blob {desc.digest} does not match its digest")
    return data


def sniff_layer_type(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "application/vnd.oci.image.layer.v1.tar+gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "application/vnd.oci.image.layer.v1.tar+zstd"
    return LAYER_TAR


def import_layer(reader: ArchiveReader, content: ContentStore, name: str) -> tuple[str, int, str]:
    """Copy one archive layer into the content store; return (digest, size, media type)."""
    fh = reader.open(name)
    head = fh.read(4)
    media_type = sniff_layer_type(head)
    fd, tmp = tempfile.mkstemp(prefix="load-", dir=content.ingest_dir)
    hasher = hashlib.sha256(head)
    size = len(head)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(head)
            while chunk := fh.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = "sha256:" + hasher.hexdigest()
        if not content.has(digest):
            os.rename(tmp, content.path(digest))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest, size, media_type


def spool(chunks: Iterator[bytes], directory: Path, max_size: int) -> Path:
    """Write the incoming archive to a temp file under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="archive-", suffix=".tar", dir=directory)
    total = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                total += len(chunk)
                if total > max_size:
                    raise TooLarge(f"archive larger than the {max_size}-byte cap")
                out.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


__all__ = ["ArchiveReader", "LoadedImage", "import_layer", "read_images", "spool", "write_archive"]
