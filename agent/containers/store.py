"""Container records in the metadata database, and how a user's name for one resolves.

A record holds what ``create`` decided (``config``: the resolved command,
environment, limits, …) and what has happened since (``state``, Docker's
``State`` fields).  Both are JSON documents so new fields need no migration.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from agent.errors import Conflict, ContainerNotFound, InvalidArgument
from agent.metadata import Database

NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")

CREATED = "created"
RUNNING = "running"
EXITED = "exited"
REMOVING = "removing"
DEAD = "dead"
STATUSES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")

_LEFT = ("agile", "bold", "brave", "calm", "clever", "crisp", "eager", "fair", "fond", "gentle", "happy",
         "keen", "kind", "lucid", "merry", "nimble", "noble", "quick", "quiet", "rapid", "sharp", "steady",
         "swift", "tidy", "vivid", "warm", "wise", "zesty")
_RIGHT = ("babbage", "bohr", "curie", "darwin", "dijkstra", "euler", "faraday", "fermi", "gauss", "hopper",
          "hypatia", "kepler", "knuth", "lamarr", "lovelace", "maxwell", "meitner", "noether", "pascal",
          "ritchie", "shannon", "thompson", "turing", "volta", "wozniak", "yonath")


@dataclass
class ContainerRecord:
    id: str
    name: str
    image: str
    image_id: str
    created: int                       # unix ns
    config: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.state.get("status") or CREATED)

    @property
    def running(self) -> bool:
        return self.status == RUNNING


def new_state() -> dict[str, Any]:
    return {"status": CREATED, "pid": 0, "exit_code": 0, "oom_killed": False, "error": "",
            "started_at": 0, "finished_at": 0, "restart_count": 0}


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
    return name.lstrip("/")


class ContainerStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _record(row: Any) -> ContainerRecord:
        return ContainerRecord(row["id"], row["name"], row["image"], row["image_id"], row["created"],
                               json.loads(row["config"]), json.loads(row["state"]))

    def all(self) -> list[ContainerRecord]:
        """Every container, newest first."""
        return [self._record(r) for r in self.db.query("SELECT * FROM containers ORDER BY created DESC")]

    def get(self, container_id: str) -> ContainerRecord | None:
        row = self.db.query_one("SELECT * FROM containers WHERE id = ?", (container_id,))
        return self._record(row) if row else None

    def resolve(self, ref: str) -> ContainerRecord:
        """Docker's lookup order: full id, exact name, then a unique id prefix."""
        if not ref:
            raise InvalidArgument("container name or id must not be empty")
        name = ref.lstrip("/")
        row = (self.db.query_one("SELECT * FROM containers WHERE id = ?", (ref,))
               or self.db.query_one("SELECT * FROM containers WHERE name = ?", (name,)))
        if row:
            return self._record(row)
        if re.fullmatch(r"[0-9a-f]{1,64}", ref):
            rows = self.db.query("SELECT * FROM containers WHERE id LIKE ? LIMIT 2", (ref + "%",))
            if len(rows) > 1:
                raise InvalidArgument(f"multiple IDs found with provided prefix: {ref}")
            if rows:
                return self._record(rows[0])
        raise ContainerNotFound(f"No such container: {ref}")

    def generate_name(self) -> str:
        rng = random.SystemRandom()
        for attempt in range(20):
            name = f"{rng.choice(_LEFT)}_{rng.choice(_RIGHT)}"
            if attempt > 5:
                name += str(rng.randint(0, 99))
            if not self.db.query_one("SELECT 1 FROM containers WHERE name = ?", (name,)):
                return name
        raise Conflict("could not generate a unique container name")

    def _name_conflict(self, name: str) -> Conflict:
        row = self.db.query_one("SELECT id FROM containers WHERE name = ?", (name,))
        holder = row["id"] if row else "?"
        return Conflict(f'Conflict. The container name "/{name}" is already in use by container "{holder}". '
                        "You have to remove (or rename) that container to be able to reuse that name.")

    def add(self, record: ContainerRecord) -> None:
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO containers (id, name, image, image_id, created, config, state) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (record.id, record.name, record.image, record.image_id, record.created,
                     json.dumps(record.config), json.dumps(record.state)))
        except Exception as exc:
            if "UNIQUE" in str(exc) and "name" in str(exc):
                raise self._name_conflict(record.name) from None
            raise

    def save_state(self, record: ContainerRecord) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE containers SET state = ? WHERE id = ?", (json.dumps(record.state), record.id))

    def rename(self, record: ContainerRecord, name: str) -> None:
        name = check_name(name)
        if name == record.name:
            raise InvalidArgument("Renaming a container with the same name as its current name")
        try:
            with self.db.transaction() as conn:
                conn.execute("UPDATE containers SET name = ? WHERE id = ?", (name, record.id))
        except Exception as exc:
            if "UNIQUE" in str(exc):
                raise self._name_conflict(name) from None
            raise
        record.name = name

    def remove(self, container_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM containers WHERE id = ?", (container_id,))

    def using_image(self, image_id: str) -> list[ContainerRecord]:
        return [self._record(r) for r in self.db.query("SELECT * FROM containers WHERE image_id = ?",
                                                        (image_id,))]


def now_ns() -> int:
    return time.time_ns()
