"""Docker-compatible documents for ``image inspect`` and ``image history``."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from agent.images import manifest as mf
from agent.images.store import ImageRecord, ImageStore, display_ref

_EMPTY_LAYER = "<missing>"


def _rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def inspect_document(store: ImageStore, record: ImageRecord) -> dict[str, Any]:
    config = mf.parse_config(store.content.read_bytes(record.config_digest, 16 << 20))
    raw = config.raw
    layers = store.layers(record.id)
    lowers: list[str] = []
    if record.top_chain_id:
        try:
            lowers = store.snapshots.lowerdirs(record.top_chain_id)
        except Exception:  # a view of a broken chain must not break inspect
            lowers = []
    doc: dict[str, Any] = {
        "Id": record.id,
        "RepoTags": [display_ref(t) for t in record.tags],
        "RepoDigests": [display_ref(d) for d in record.repo_digests],
        "Parent": "",
        "Comment": str(raw.get("comment", "")),
        "Created": config.created or _rfc3339(record.created),
        "DockerVersion": str(raw.get("docker_version", "")),
        "Author": str(raw.get("author", "")),
        "Config": raw.get("config") if isinstance(raw.get("config"), dict) else {},
        "Architecture": record.architecture,
        "Os": record.os,
        "Size": record.size,
        "GraphDriver": {
            "Name": "overlay",
            "Data": {"LowerDir": ":".join(lowers[1:]), "UpperDir": lowers[0] if lowers else ""},
        },
        "RootFS": {"Type": "layers", "Layers": [lay.diff_id for lay in layers]},
        "Metadata": {"LastTagTime": _rfc3339(record.added) if record.added else ""},
        "Descriptor": {"mediaType": record.manifest_media_type, "digest": record.manifest_digest,
                       "size": store.content.size(record.manifest_digest)
                       if store.content.has(record.manifest_digest) else 0},
    }
    if record.variant:
        doc["Variant"] = record.variant
    return doc


def inspect_json(store: ImageStore, record: ImageRecord) -> bytes:
    return json.dumps(inspect_document(store, record)).encode()


def history(store: ImageStore, record: ImageRecord) -> list[dict[str, Any]]:
    """Newest first, like docker: the top entry carries the image id and tags."""
    config = mf.parse_config(store.content.read_bytes(record.config_digest, 16 << 20))
    layers = store.layers(record.id)
    sizes: list[int] = []
    for lay in layers:
        snap = store.snapshots.get(lay.chain_id)
        sizes.append(snap.size if snap else 0)
    entries: list[dict[str, Any]] = []
    entries_src = config.history or [{"created": config.created, "created_by": ""} for _ in layers]
    layer_index = 0
    for item in entries_src:
        empty = bool(item.get("empty_layer"))
        size = 0
        if not empty and layer_index < len(sizes):
            size = sizes[layer_index]
            layer_index += 1
        entries.append({
            "Id": _EMPTY_LAYER,
            "Created": mf.parse_timestamp(str(item.get("created", ""))),
            "CreatedBy": str(item.get("created_by", "")),
            "Size": size,
            "Comment": str(item.get("comment", "")),
            "Tags": [],
        })
    entries.reverse()
    if entries:
        entries[0]["Id"] = record.id
        entries[0]["Tags"] = [display_ref(t) for t in record.tags]
    return entries
