"""Overlay snapshots of image layers (and, later, of container root filesystems).

Each committed layer lives in ``<root>/<n>/fs`` with a short numeric ``n`` so a
stack of 100+ lowerdirs still fits a mount's option page when the runtime
mounts with paths relative to ``root``.  The snapshotter only *describes*
mounts; it never mounts anything (the runtime does, in a helper process).

Rows in the ``snapshots`` table move ``pending`` → ``committed``; a crash
leaves ``pending`` rows, which :meth:`OverlaySnapshotter.recover` removes with
their directories at start-up.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.errors import Conflict, NotFound
from agent.metadata import Database

PENDING = "pending"
COMMITTED = "committed"
LAYER = "layer"
ACTIVE = "active"


@dataclass(frozen=True)
class Mount:
    """One mount to perform: what ``mount -t type -o options source target`` would take."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)
    target: str = ""  # relative to the container root; "" is the root itself


@dataclass(frozen=True)
class Snapshot:
    id: int
    chain_id: str
    parent: str
    diff_id: str
    kind: str
    state: str
    size: int
    path: Path  # the snapshot's directory; layer content is in path / "fs"


class Snapshotter(Protocol):
    """What the image and container code needs from a snapshotter."""

    def get(self, chain_id: str) -> Snapshot | None: ...
    def begin_layer(self, chain_id: str, parent: str, diff_id: str) -> Snapshot: ...
    def commit(self, snapshot: Snapshot, size: int) -> Snapshot: ...
    def abort(self, snapshot: Snapshot) -> None: ...
    def view(self, chain_id: str) -> list[Mount]: ...
    def prepare(self, key: str, parent: str) -> list[Mount]: ...
    def remove(self, key: str) -> int: ...
    def recover(self) -> int: ...


class OverlaySnapshotter:
    """Snapshots as overlayfs layers under ``root``, metadata in ``db``."""

    def __init__(self, root: Path, db: Database) -> None:
        self.root = root
        self.db = db
        root.mkdir(parents=True, exist_ok=True)

    def _row(self, where: str, value: object) -> Snapshot | None:
        row = self.db.query_one(f"SELECT * FROM snapshots WHERE {where} = ?", (value,))
        if row is None:
            return None
        return Snapshot(
            id=row["id"], chain_id=row["chain_id"], parent=row["parent"], diff_id=row["diff_id"],
            kind=row["kind"], state=row["state"], size=row["size"], path=self.root / str(row["id"]),
        )

    def get(self, chain_id: str) -> Snapshot | None:
        """The committed snapshot with this key, or None."""
        snap = self._row("chain_id", chain_id)
        return snap if snap is not None and snap.state == COMMITTED else None

    def begin_layer(self, chain_id: str, parent: str, diff_id: str) -> Snapshot:
        """Reserve a directory for unpacking one layer; returns a pending snapshot."""
        with self.db.transaction() as conn:
            existing = conn.execute(
                "SELECT state FROM snapshots WHERE chain_id = ?", (chain_id,)
            ).fetchone()
            if existing is not None:
                raise Conflict(f"snapshot {chain_id} already exists ({existing['state']})")
            cur = conn.execute(
                "INSERT INTO snapshots (chain_id, parent, diff_id, kind, state, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (chain_id, parent, diff_id, LAYER, PENDING, int(time.time())),
            )
            snap_id = cur.lastrowid
        path = self.root / str(snap_id)
        shutil.rmtree(path, ignore_errors=True)
        (path / "fs").mkdir(parents=True)
        snap = self._row("id", snap_id)
        assert snap is not None
        return snap

    def commit(self, snapshot: Snapshot, size: int) -> Snapshot:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE snapshots SET state = ?, size = ? WHERE id = ?",
                (COMMITTED, size, snapshot.id),
            )
        committed = self._row("id", snapshot.id)
        assert committed is not None
        return committed

    def abort(self, snapshot: Snapshot) -> None:
        shutil.rmtree(snapshot.path, ignore_errors=True)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM snapshots WHERE id = ? AND state = ?", (snapshot.id, PENDING))

    def chain(self, chain_id: str) -> list[Snapshot]:
        """The committed layers from ``chain_id`` down to the base, top first."""
        out: list[Snapshot] = []
        key = chain_id
        while key:
            snap = self.get(key)
            if snap is None:
                raise NotFound(f"snapshot {key} not found (chain of {chain_id})")
            out.append(snap)
            key = snap.parent
        return out

    def lowerdirs(self, chain_id: str) -> list[str]:
        return [str(s.path / "fs") for s in self.chain(chain_id)]

    def view(self, chain_id: str) -> list[Mount]:
        """Read-only mounts showing the image's filesystem."""
        lowers = self.lowerdirs(chain_id)
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ["ro", "rbind"])]
        return [Mount("overlay", "overlay", ["ro", "lowerdir=" + ":".join(lowers)])]

    def prepare(self, key: str, parent: str) -> list[Mount]:
        """A writable snapshot over ``parent`` (a container's root): overlay with upper and work."""
        lowers = self.lowerdirs(parent) if parent else []
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM snapshots WHERE chain_id = ?", (key,)).fetchone():
                raise Conflict(f"snapshot {key} already exists")
            cur = conn.execute(
                "INSERT INTO snapshots (chain_id, parent, kind, state, created) VALUES (?, ?, ?, ?, ?)",
                (key, parent, ACTIVE, COMMITTED, int(time.time())),
            )
            path = self.root / str(cur.lastrowid)
        (path / "fs").mkdir(parents=True)
        (path / "work").mkdir()
        return self._active_mounts(path, lowers)

    @staticmethod
    def _active_mounts(path: Path, lowers: list[str]) -> list[Mount]:
        if not lowers:
            return [Mount("bind", str(path / "fs"), ["rw", "rbind"])]
        options = [f"lowerdir={':'.join(lowers)}", f"upperdir={path / 'fs'}", f"workdir={path / 'work'}"]
        return [Mount("overlay", "overlay", options)]

    def _active(self, key: str) -> Snapshot:
        snap = self._row("chain_id", key)
        if snap is None or snap.kind != ACTIVE:
            raise NotFound(f"active snapshot {key} not found")
        return snap

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot made by :meth:`prepare` (again, for each start)."""
        snap = self._active(key)
        return self._active_mounts(snap.path, self.lowerdirs(snap.parent) if snap.parent else [])

    def layers(self, key: str) -> list[Path]:
        """An active snapshot's directories, topmost first: its upper dir, then the image's layers."""
        snap = self._active(key)
        lowers = self.lowerdirs(snap.parent) if snap.parent else []
        return [snap.path / "fs", *(Path(d) for d in lowers)]

    def children(self, chain_id: str) -> list[str]:
        return [r["chain_id"] for r in self.db.query(
            "SELECT chain_id FROM snapshots WHERE parent = ?", (chain_id,))]

    def remove(self, key: str) -> int:
        """Remove a snapshot with no children; return the bytes it recorded."""
        snap = self._row("chain_id", key)
        if snap is None:
            return 0
        if self.children(key):
            raise Conflict(f"snapshot {key} has children")
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        shutil.rmtree(snap.path, ignore_errors=True)
        return snap.size

    def recover(self) -> int:
        """Drop pending snapshots and directories with no row; return how many were removed."""
        removed = 0
        for row in self.db.query("SELECT id FROM snapshots WHERE state = ?", (PENDING,)):
            shutil.rmtree(self.root / str(row["id"]), ignore_errors=True)
            removed += 1
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM snapshots WHERE state = ?", (PENDING,))
        known = {str(r["id"]) for r in self.db.query("SELECT id FROM snapshots")}
        for entry in self.root.iterdir():
            if entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
