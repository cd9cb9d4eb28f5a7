"""The agent's metadata database: one SQLite file in WAL mode.

Schema changes are numbered migrations applied in order and recorded in
``PRAGMA user_version``; later features (containers, volumes, networks, IPAM)
append migrations rather than editing earlier ones.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIGRATIONS: list[str] = [
    # 1: images, tags, digests, blobs and layer snapshots
    """
    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        manifest_digest TEXT NOT NULL,
        manifest_media_type TEXT NOT NULL,
        config_digest TEXT NOT NULL,
        created INTEGER NOT NULL,
        size INTEGER NOT NULL,
        os TEXT NOT NULL,
        architecture TEXT NOT NULL,
        variant TEXT NOT NULL DEFAULT '',
        added INTEGER NOT NULL,
        top_chain_id TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE tags (
        name TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(id)
    );
    CREATE INDEX tags_image ON tags(image_id);
    CREATE TABLE repo_digests (
        name TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(id)
    );
    CREATE INDEX repo_digests_image ON repo_digests(image_id);
    CREATE TABLE image_blobs (
        image_id TEXT NOT NULL REFERENCES images(id),
        digest TEXT NOT NULL,
        PRIMARY KEY (image_id, digest)
    );
    CREATE INDEX image_blobs_digest ON image_blobs(digest);
    CREATE TABLE image_layers (
        image_id TEXT NOT NULL REFERENCES images(id),
        position INTEGER NOT NULL,
        chain_id TEXT NOT NULL,
        diff_id TEXT NOT NULL,
        layer_digest TEXT NOT NULL,
        media_type TEXT NOT NULL,
        PRIMARY KEY (image_id, position)
    );
    CREATE INDEX image_layers_chain ON image_layers(chain_id);
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        chain_id TEXT NOT NULL UNIQUE,
        parent TEXT NOT NULL DEFAULT '',
        diff_id TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        size INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL
    );
    """,
    # 2: containers (config and state are JSON documents; names are unique)
    """
    CREATE TABLE containers (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        image TEXT NOT NULL,
        image_id TEXT NOT NULL,
        created INTEGER NOT NULL,
        config TEXT NOT NULL,
        state TEXT NOT NULL
    );
    CREATE INDEX containers_image ON containers(image_id);
    """,
]


class Database:
    """A thin owner of the SQLite connection; callers write SQL in their own modules."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
        return row

    def close(self) -> None:
        self.conn.close()
