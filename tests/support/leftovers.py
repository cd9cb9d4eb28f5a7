"""What a test may leave behind on the host for one agent: mounts, cgroups, shim processes.

Scoped to one agent (its root directory and its ``--cgroup-parent``) so
unrelated work on the machine does not count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroups(parent: str) -> set[str]:
    rel = parent.strip("/")
    found: set[str] = set()
    bases = [CGROUP_ROOT / rel] + [h / rel for h in CGROUP_ROOT.iterdir()] if CGROUP_ROOT.exists() else []
    for base in bases:
        if base.is_dir():
            found.update(f"{base}/{d.name}" for d in base.iterdir() if d.is_dir())
    return found


def _mounts(root: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return sorted(t for t in (line.split()[4] for line in f) if t.startswith(f"{root}/"))


def _serving_shims(shim_log: Path) -> set[int]:
    """Shims of this agent that serve a container: their stderr is the agent's shim.log and
    they are no longer skiffd's children (idle pool shims are)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if b"agent.shim" not in Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
            if os.readlink(f"/proc/{entry}/fd/2") != str(shim_log):
                continue
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"skiffd" in Path(f"/proc/{ppid}/cmdline").read_bytes():
                continue
        except (OSError, ValueError, IndexError):
            continue
        pids.add(int(entry))
    return pids


@dataclass(frozen=True)
class Leftovers:
    mounts: tuple[str, ...]
    cgroups: frozenset[str]
    shims: frozenset[int]

    @classmethod
    def snapshot(cls, root: Path, cgroup_parent: str, shim_log: Path) -> Leftovers:
        return cls(tuple(_mounts(root)), frozenset(_cgroups(cgroup_parent)), frozenset(_serving_shims(shim_log)))

    def assert_same_as(self, before: Leftovers) -> None:
        assert self.mounts == before.mounts, f"mounts left behind: {sorted(set(self.mounts) - set(before.mounts))}"
        assert not self.cgroups - before.cgroups, f"cgroups left behind: {sorted(self.cgroups - before.cgroups)}"
        assert not self.shims - before.shims, f"shims left behind: {sorted(self.shims - before.shims)}"
