"""Local images: records, name and id resolution, tags, removal and garbage collection.

Images are keyed by their ID (the config digest).  ``tags`` maps a full
reference (``docker.io/library/busybox:latest``) to an image;
``repo_digests`` maps ``name@sha256:…`` to the image it was pulled as.
``image_blobs`` and ``image_layers`` say which blobs and layer snapshots each
image holds; garbage collection frees what no image (and no in-flight pull)
holds.
"""

from __future__ import annotations

import fnmatch
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.errors import ImageInUse, ImageNotFound, InvalidArgument, InvalidReference
from agent.images.content import ContentStore
from agent.images.reference import Reference, familiar_name, parse
from agent.images.snapshots import OverlaySnapshotter
from agent.metadata import Database


@dataclass(frozen=True)
class LayerRecord:
    chain_id: str
    diff_id: str
    digest: str
    media_type: str


@dataclass
class ImageRecord:
    id: str
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    created: int
    size: int
    os: str
    architecture: str
    variant: str = ""
    added: int = 0
    top_chain_id: str = ""
    tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]


@dataclass
class RemoveResult:
    untagged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    space_reclaimed: int = 0


class Leases:
    """Blobs and snapshots an in-flight operation holds, safe from garbage collection."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            left = self._counts.get(key, 0) - 1
            if left > 0:
                self._counts[key] = left
            else:
                self._counts.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._counts


class ImageStore:
    def __init__(self, db: Database, content: ContentStore, snapshots: OverlaySnapshotter) -> None:
        #: (container id, running) of the containers made from an image; set by the agent
        self.users: Callable[[str], list[tuple[str, bool]]] = lambda image_id: []
        self.db = db
        self.content = content
        self.snapshots = snapshots
        self.leases = Leases()

    # --- reading -----------------------------------------------------------

    def _record(self, r: sqlite3.Row) -> ImageRecord:
        image_id = r["id"]
        tags = [t["name"] for t in self.db.query(
            "SELECT name FROM tags WHERE image_id = ? ORDER BY name", (image_id,))]
        digests = [t["name"] for t in self.db.query(
            "SELECT name FROM repo_digests WHERE image_id = ? ORDER BY name", (image_id,))]
        return ImageRecord(
            id=image_id, manifest_digest=r["manifest_digest"],
            manifest_media_type=r["manifest_media_type"], config_digest=r["config_digest"],
            created=r["created"], size=r["size"], os=r["os"], architecture=r["architecture"],
            variant=r["variant"], added=r["added"], top_chain_id=r["top_chain_id"],
            tags=tags, repo_digests=digests,
        )

    def records(self) -> list[ImageRecord]:
        rows = self.db.query("SELECT * FROM images ORDER BY created DESC, id")
        return [self._record(r) for r in rows]

    def get(self, image_id: str) -> ImageRecord | None:
        row = self.db.query_one("SELECT * FROM images WHERE id = ?", (image_id,))
        return self._record(row) if row is not None else None

    def layers(self, image_id: str) -> list[LayerRecord]:
        rows = self.db.query(
            "SELECT chain_id, diff_id, layer_digest, media_type FROM image_layers"
            " WHERE image_id = ? ORDER BY position", (image_id,))
        return [LayerRecord(r["chain_id"], r["diff_id"], r["layer_digest"], r["media_type"]) for r in rows]

    def count(self) -> int:
        row = self.db.query_one("SELECT COUNT(*) AS n FROM images")
        return int(row["n"]) if row else 0

    def resolve(self, name: str) -> ImageRecord:
        """Find an image by name[:tag], name@digest, full or short ID, or ``sha256:`` prefix."""
        return self.lookup(name)[0]

    def lookup(self, name: str) -> tuple[ImageRecord, bool]:
        """Resolve ``name``; the flag says whether it matched as an ID rather than a name."""
        if not name:
            raise InvalidArgument("image name must not be empty")
        if not name.startswith("sha256:"):
            try:
                ref = parse(name)
            except InvalidReference:
                ref = None
            if ref is not None:
                if ref.digest:
                    row = self.db.query_one("SELECT image_id FROM repo_digests WHERE name = ?",
                                            (f"{ref.name}@{ref.digest}",))
                else:
                    row = self.db.query_one("SELECT image_id FROM tags WHERE name = ?", (str(ref),))
                record = self.get(row["image_id"]) if row is not None else None
                if record is not None:
                    return record, False
        hexpart = name.removeprefix("sha256:")
        if hexpart and len(hexpart) <= 64 and all(c in "0123456789abcdef" for c in hexpart):
            rows = self.db.query("SELECT * FROM images WHERE id LIKE ?", (f"sha256:{hexpart}%",))
            if len(rows) > 1:
                raise InvalidArgument(f"image id prefix {name!r} is ambiguous")
            if rows:
                return self._record(rows[0]), True
        raise ImageNotFound(f"No such image: {name}")

    # --- writing -----------------------------------------------------------

    def add(self, record: ImageRecord, blobs: Iterable[str], layers: list[LayerRecord],
            tag: Reference | None, repo_digest: str | None) -> None:
        """Record an image whose blobs and snapshots are all committed; move ``tag`` onto it."""
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM images WHERE id = ?", (record.id,)).fetchone() is None:
                conn.execute(
                    "INSERT INTO images (id, manifest_digest, manifest_media_type, config_digest, created,"
                    " size, os, architecture, variant, added, top_chain_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.id, record.manifest_digest, record.manifest_media_type, record.config_digest,
                     record.created, record.size, record.os, record.architecture, record.variant,
                     int(time.time()), record.top_chain_id),
                )
                conn.executemany(
                    "INSERT INTO image_layers (image_id, position, chain_id, diff_id, layer_digest, media_type)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(record.id, i, lay.chain_id, lay.diff_id, lay.digest, lay.media_type)
                     for i, lay in enumerate(layers)],
                )
            conn.executemany(
                "INSERT OR IGNORE INTO image_blobs (image_id, digest) VALUES (?, ?)",
                [(record.id, d) for d in set(blobs)],
            )
            if tag is not None:
                conn.execute("INSERT OR REPLACE INTO tags (name, image_id) VALUES (?, ?)",
                             (str(tag), record.id))
            if repo_digest is not None:
                conn.execute("INSERT OR REPLACE INTO repo_digests (name, image_id) VALUES (?, ?)",
                             (repo_digest, record.id))

    def tag(self, source: str, target: str) -> ImageRecord:
        record = self.resolve(source)
        ref = parse(target)
        if ref.digest:
            raise InvalidArgument(f"refusing to create a tag with a digest reference: {target}")
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO tags (name, image_id) VALUES (?, ?)", (str(ref), record.id))
        return record

    def remove(self, name: str, *, force: bool = False, prune: bool = True) -> RemoveResult:
        """Docker's ``rmi``: untag by name; delete the image when nothing refers to it any more."""
        record, by_id = self.lookup(name)
        result = RemoveResult()
        keep = False
        users = self.users(record.id)
        if users and (by_id or len(record.tags) <= 1):  # the image itself would go
            running = [cid for cid, up in users if up]
            if running:
                raise ImageInUse(f"conflict: unable to delete {record.short_id} (cannot be forced) - "
                                 f"image is being used by running container {running[0][:12]}")
            if not force:
                what = record.short_id if by_id else f'repository reference "{name}"'
                raise ImageInUse(f"conflict: unable to remove {what} (must force) - container "
                                 f"{users[0][0][:12]} is using its referenced image {record.short_id}")
            keep = True  # forced: untagged, but kept (dangling) while containers need its layers
        if by_id:
            repos = {t.rsplit(":", 1)[0] for t in record.tags}
            if len(repos) > 1 and not force:
                raise ImageInUse(
                    f"conflict: unable to delete {record.short_id} (must be forced)"
                    " - image is referenced in multiple repositories")
            with self.db.transaction() as conn:
                for tag in record.tags:
                    conn.execute("DELETE FROM tags WHERE name = ?", (tag,))
                    result.untagged.append(_display_ref(tag))
                for digest in record.repo_digests:
                    conn.execute("DELETE FROM repo_digests WHERE name = ?", (digest,))
                    result.untagged.append(_display_ref(digest))
        else:
            ref = parse(name)
            key = f"{ref.name}@{ref.digest}" if ref.digest else str(ref)
            table = "repo_digests" if ref.digest else "tags"
            with self.db.transaction() as conn:
                conn.execute(f"DELETE FROM {table} WHERE name = ?", (key,))
                result.untagged.append(_display_ref(key))
                left = conn.execute("SELECT COUNT(*) FROM tags WHERE image_id = ?", (record.id,)).fetchone()[0]
                if left == 0:
                    for digest in record.repo_digests:
                        if digest != key:
                            conn.execute("DELETE FROM repo_digests WHERE name = ?", (digest,))
                            result.untagged.append(_display_ref(digest))
        if self._unreferenced(record.id) and prune and not keep:
            self._delete_image(record.id)
            result.deleted.append(record.id)
            result.space_reclaimed = self.gc()
        return result

    def _unreferenced(self, image_id: str) -> bool:
        tags = self.db.query_one("SELECT COUNT(*) AS n FROM tags WHERE image_id = ?", (image_id,))
        digests = self.db.query_one("SELECT COUNT(*) AS n FROM repo_digests WHERE image_id = ?", (image_id,))
        return bool(tags and digests and tags["n"] == 0 and digests["n"] == 0)

    def _delete_image(self, image_id: str) -> None:
        with self.db.transaction() as conn:
            for table in ("tags", "repo_digests", "image_blobs", "image_layers"):
                conn.execute(f"DELETE FROM {table} WHERE image_id = ?", (image_id,))
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def prune(self, *, all_images: bool = False, filters: dict[str, list[str]] | None = None) -> RemoveResult:
        """Remove dangling images (no tags), or with ``all_images`` every image no container uses."""
        result = RemoveResult()
        for record in self.records():
            if record.tags and not all_images:
                continue
            if self.users(record.id):
                continue
            if not match_filters(record, filters or {}):
                continue
            for tag in record.tags:
                result.untagged.append(_display_ref(tag))
            for digest in record.repo_digests:
                result.untagged.append(_display_ref(digest))
            self._delete_image(record.id)
            result.deleted.append(record.id)
        result.space_reclaimed = self.gc()
        return result

    def gc(self) -> int:
        """Free blobs and layer snapshots that no image and no lease holds; return bytes freed."""
        freed = 0
        used_blobs = {r["digest"] for r in self.db.query("SELECT DISTINCT digest FROM image_blobs")}
        for digest in self.content.digests():
            if digest not in used_blobs and digest not in self.leases:
                freed += self.content.delete(digest)
        used_chains = {r["chain_id"] for r in self.db.query("SELECT DISTINCT chain_id FROM image_layers")}
        # Remove from the top of each chain down, so parents go after their children.
        while True:
            rows = self.db.query(
                "SELECT chain_id FROM snapshots s WHERE kind = 'layer' AND state = 'committed'"
                " AND NOT EXISTS (SELECT 1 FROM snapshots c WHERE c.parent = s.chain_id)")
            victims = [r["chain_id"] for r in rows
                       if r["chain_id"] not in used_chains and r["chain_id"] not in self.leases]
            if not victims:
                break
            for chain_id in victims:
                freed += self.snapshots.remove(chain_id)
        return freed


def _display_ref(full: str) -> str:
    if "@" in full:
        name, _, digest = full.partition("@")
        return f"{familiar_name(name)}@{digest}"
    name, _, tag = full.rpartition(":")
    return f"{familiar_name(name)}:{tag}"


def display_ref(full: str) -> str:
    return _display_ref(full)


def parse_filters(items: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"bad format of filter (expected name=value): {item!r}")
        if key not in ("dangling", "reference", "label", "before", "since"):
            raise InvalidArgument(f"invalid filter {key!r}")
        out.setdefault(key, []).append(value)
    return out


def match_filters(record: ImageRecord, filters: dict[str, list[str]],
                  labels: dict[str, str] | None = None) -> bool:
    for value in filters.get("dangling", []):
        if value.lower() not in ("true", "false", "1", "0"):
            raise InvalidArgument(f"invalid filter 'dangling={value}'")
        dangling = value.lower() in ("true", "1")
        if dangling != (not record.tags):
            return False
    patterns = filters.get("reference", [])
    if patterns:
        names = [_display_ref(t) for t in record.tags]
        if not any(_reference_matches(p, n) for p in patterns for n in names):
            return False
    for want in filters.get("label", []):
        key, sep, value = want.partition("=")
        have = labels or {}
        if key not in have or (sep and have[key] != value):
            return False
    return True


def matching_tags(record: ImageRecord, filters: dict[str, list[str]]) -> list[str]:
    """The image's tags that a ``reference`` filter selects (all of them without one), as docker shows."""
    patterns = filters.get("reference", [])
    return [t for t in record.tags if not patterns or any(_reference_matches(p, _display_ref(t)) for p in patterns)]


def _reference_matches(pattern: str, familiar: str) -> bool:
    name, _, tag = familiar.rpartition(":")
    if ":" in pattern.rsplit("/", 1)[-1]:
        return fnmatch.fnmatchcase(familiar, pattern)
    return fnmatch.fnmatchcase(name, pattern)
