"""What a test may leave behind on the host: mounts, skiff cgroups, shim processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _skiff_cgroups() -> set[str]:
    found = set()
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.exists() else []:
        base = hierarchy / "skiff"
        if base.is_dir():
            found.update(f"{hierarchy.name}/skiff/{d.name}" for d in base.iterdir() if d.is_dir())
    base = CGROUP_ROOT / "skiff"
    if base.is_dir():
        found.update(f"skiff/{d.name}" for d in base.iterdir() if d.is_dir())
    return found


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return sorted(line.split()[4] for line in f)


def _shims() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"agent.shim" in cmdline:
            pids.add(int(entry))
    return pids


@dataclass(frozen=True)
class Leftovers:
    mounts: tuple[str, ...]
    cgroups: frozenset[str]
    shims: frozenset[int]

    @classmethod
    def snapshot(cls) -> Leftovers:
        return cls(tuple(_mounts()), frozenset(_skiff_cgroups()), frozenset(_shims()))

    def assert_same_as(self, before: Leftovers) -> None:
        new_mounts = sorted(set(self.mounts) - set(before.mounts))
        assert not new_mounts, f"mounts left behind: {new_mounts}"
        assert len(self.mounts) == len(before.mounts), "mount count changed"
        assert not self.cgroups - before.cgroups, f"cgroups left behind: {sorted(self.cgroups - before.cgroups)}"
        # idle pool shims belong to the running agent; only count those that serve a container
        extra = {pid for pid in self.shims - before.shims if _serving(pid)}
        assert not extra, f"shims left behind: {sorted(extra)}"


def _serving(pid: int) -> bool:
    """A shim that has taken a container: idle pool shims are still skiffd's children."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return False
    return b"skiffd" not in parent
