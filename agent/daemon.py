"""The agent's object graph: stores, snapshotter, puller, built once from a DaemonConfig."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
import uuid
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

from agent.config import DaemonConfig
from agent.containers.manager import ContainerManager
from agent.containers.shims import ShimPool
from agent.containers.store import ContainerStore
from agent.errors import Conflict
from agent.images.auth import CredentialStore
from agent.images.content import ContentStore
from agent.images.pull import Puller
from agent.images.registry import RegistryConfig
from agent.images.snapshots import OverlaySnapshotter
from agent.images.store import ImageStore
from agent.images.unpacker import Unpacker
from agent.metadata import Database


def _warm() -> int:
    """Imported and run once in each worker so the first unpack does not pay the start-up."""
    import agent.images.unpack  # noqa: F401

    return os.getpid()


class Daemon:
    def __init__(self, config: DaemonConfig, executor: Executor | None = None) -> None:
        self.config = config
        for path in (config.data_root, config.exec_root):
            path.mkdir(parents=True, exist_ok=True, mode=0o711)
        self._lock_fd = self._lock(config.data_root / "skiffd.lock")
        self.agent_id = self._agent_id(config.data_root / "agent-id")
        self.db = Database(config.db_path)
        self.content = ContentStore(config.content_root)
        self.snapshots = OverlaySnapshotter(config.snapshots_root, self.db)
        self.images = ImageStore(self.db, self.content, self.snapshots)
        self.credentials = CredentialStore(config.credentials_path)
        self.registry_config = RegistryConfig(
            insecure_registries=list(config.insecure_registries), ca_dir=config.certs_dir)
        self._own_executor = executor is None
        self.executor = executor or ProcessPoolExecutor(
            max_workers=max(1, len(os.sched_getaffinity(0))),
            mp_context=multiprocessing.get_context("spawn"))
        self.unpacker = Unpacker(self.content, self.snapshots, self.executor)
        self.puller = Puller(self.images, self.credentials, self.registry_config, self.unpacker,
                             max_concurrent_downloads=max(1, config.max_concurrent_downloads))
        self.shims = ShimPool(config.exec_root / "shim.log")
        self.containers = ContainerManager(config.data_root, config.exec_root, ContainerStore(self.db),
                                           self.images, self.content, self.snapshots, self.shims,
                                           cgroup_parent=config.cgroup_parent)
        self.images.users = lambda image_id: [(c.id, c.running) for c in self.containers.store.using_image(image_id)]

    @staticmethod
    def _lock(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise Conflict(f"another skiffd is using the data root {path.parent}") from exc
        return fd

    @staticmethod
    def _agent_id(path: Path) -> str:
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            agent_id = str(uuid.uuid4())
            path.write_text(agent_id + "\n")
            return agent_id

    def recover(self) -> dict[str, int]:
        """Undo what a crash left half-done; partial blob ingests are kept for resuming."""
        tmp = self.config.data_root / "tmp"
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for leftover in [*self.content.ingest_dir.glob("load-*"), *self.content.ingest_dir.glob("*.tmp")]:
            leftover.unlink(missing_ok=True)
        # Verified blobs of a pull cut short stay: the next pull reuses them.
        return {"snapshots_removed": self.snapshots.recover()}

    def warm_up(self) -> None:
        if isinstance(self.executor, ProcessPoolExecutor):
            workers = getattr(self.executor, "_max_workers", 1)
            for _ in range(workers):
                self.executor.submit(_warm)

    def close(self) -> None:
        self.shims.close()
        if self._own_executor:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.db.close()
        os.close(self._lock_fd)
