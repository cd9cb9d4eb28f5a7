"""cgroup v2 (unified) manager: one directory per container under the cgroup2 root.

A controller's files appear in a cgroup only when its parent lists the
controller in ``cgroup.subtree_control``; :meth:`V2Manager.create` enables
cpu, cpuset, io, memory and pids (those the parent has) on every ancestor of
the new cgroup, never on the leaf itself, which holds the processes (the
"no internal processes" rule).  A controller the kernel refuses to enable shows
up later as an InvalidArgument from :meth:`V2Manager.apply` naming the flag.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path, PurePosixPath

from agent.runtime.cgroups import (
    CPU_PERIOD_US,
    BaseManager,
    CgroupFS,
    CgroupStats,
    Resources,
    cgroup_rel,
    check_controllers,
    cpu_quota,
    format_cpuset,
    freeze_unified,
    frozen_unified,
    parse_int,
    parse_keyed,
    parse_limit,
    read_file,
    shares_to_weight,
    write_file,
)

#: Controllers enabled for containers, where the parent has them.
WANTED_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "pids")


class V2Manager(BaseManager):
    """Pure cgroup v2, with cgroup2 mounted at ``root``."""

    def __init__(self, root: str | Path = "/sys/fs/cgroup", fs: CgroupFS | None = None) -> None:
        super().__init__(fs)
        self.root = Path(root)

    @property
    def mode(self) -> str:
        return "v2"

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(read_file(self.fs, self.root / "cgroup.controllers", "").split())

    def _dirs(self, rel: PurePosixPath) -> list[Path]:
        return [self.root / rel]

    def oom_file(self, path: str) -> Path | None:
        return self.root / cgroup_rel(path) / "memory.events"

    def _available(self) -> tuple[str, str]:
        cpus = read_file(self.fs, self.root / "cpuset.cpus.effective", "").strip()
        mems = read_file(self.fs, self.root / "cpuset.mems.effective", "").strip()
        return cpus or format_cpuset(os.sched_getaffinity(0)), mems or "0"

    # --- lifecycle ----------------------------------------------------------

    def create(self, path: str) -> None:
        rel = cgroup_rel(path)
        made: list[Path] = []
        cur = self.root
        try:
            for part in rel.parts:
                self._enable_controllers(cur)
                cur = cur / part
                if not self.fs.is_dir(cur):
                    try:
                        self.fs.mkdir(cur)
                        made.append(cur)
                    except FileExistsError:
                        pass
        except OSError:
            self._undo_mkdirs(made)
            raise

    def _enable_controllers(self, d: Path) -> None:
        available = read_file(self.fs, d / "cgroup.controllers").split()
        enabled = read_file(self.fs, d / "cgroup.subtree_control").split()
        missing = [c for c in WANTED_CONTROLLERS if c in available and c not in enabled]
        if not missing:
            return
        try:
            write_file(self.fs, d / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        except OSError:
            # One refusal (EBUSY: processes in d; EINVAL: a controller the kernel
            # will not enable here) fails the whole write: enable what we can.
            for c in missing:
                try:
                    write_file(self.fs, d / "cgroup.subtree_control", f"+{c}")
                except OSError:
                    pass

    def add_process(self, path: str, pid: int) -> None:
        write_file(self.fs, self.root / cgroup_rel(path) / "cgroup.procs", str(pid))

    # --- limits -------------------------------------------------------------

    def apply(self, path: str, resources: Resources) -> None:
        leaf = self.root / cgroup_rel(path)
        self.validate(resources)
        try:
            have = read_file(self.fs, leaf / "cgroup.controllers").split()
        except FileNotFoundError as exc:
            raise OSError(errno.ENOENT, "cgroup does not exist", str(leaf)) from exc
        check_controllers(resources, have, f"{leaf} (its parent's cgroup.subtree_control)")
        r = resources
        if r.memory is not None:
            write_file(self.fs, leaf / "memory.max", "max" if r.memory == -1 else str(r.memory))
        if r.memory_reservation is not None:
            write_file(self.fs, leaf / "memory.low", str(r.memory_reservation))
        swap = self._swap_value(r)
        if swap is not None and self.fs.exists(leaf / "memory.swap.max"):  # absent: no swap accounting
            write_file(self.fs, leaf / "memory.swap.max", swap)
        if r.cpus is not None:
            write_file(self.fs, leaf / "cpu.max", f"{cpu_quota(r.cpus)} {CPU_PERIOD_US}")
        if r.cpu_shares is not None:
            write_file(self.fs, leaf / "cpu.weight", str(shares_to_weight(r.cpu_shares)))
        if r.cpuset_mems is not None:
            write_file(self.fs, leaf / "cpuset.mems", r.cpuset_mems)
        if r.cpuset_cpus is not None:
            write_file(self.fs, leaf / "cpuset.cpus", r.cpuset_cpus)
        if r.pids_limit is not None:
            write_file(self.fs, leaf / "pids.max", "max" if r.pids_limit == -1 else str(r.pids_limit))

    @staticmethod
    def _swap_value(r: Resources) -> str | None:
        """Docker's memory+swap total → v2's swap-only memory.swap.max."""
        if r.memory_swap == -1 or (r.memory == -1 and r.memory_swap is None):
            return "max"
        if r.memory_swap is None or r.memory is None:
            return None
        return str(r.memory_swap - r.memory)

    # --- observation --------------------------------------------------------

    def stats(self, path: str) -> CgroupStats:
        leaf = self.root / cgroup_rel(path)
        fs = self.fs
        out = CgroupStats()
        if fs.exists(leaf / "memory.current"):
            peak = read_file(fs, leaf / "memory.peak", "")  # Linux 5.19+
            out = replace(
                out,
                memory_usage=parse_int(read_file(fs, leaf / "memory.current", "0")),
                memory_max_usage=parse_int(peak) if peak.strip() else None,
                memory_limit=parse_limit(read_file(fs, leaf / "memory.max", "max")),
                memory_stat=parse_keyed(read_file(fs, leaf / "memory.stat", "")),
                oom_kills=parse_keyed(read_file(fs, leaf / "memory.events", "")).get("oom_kill", 0),
            )
        if fs.exists(leaf / "pids.current"):
            out = replace(out, pids_current=parse_int(read_file(fs, leaf / "pids.current", "0")),
                          pids_limit=parse_limit(read_file(fs, leaf / "pids.max", "max")))
        stat = parse_keyed(read_file(fs, leaf / "cpu.stat", ""))
        return replace(
            out,
            cpu_usage_ns=stat.get("usage_usec", 0) * 1000,
            cpu_user_ns=stat.get("user_usec", 0) * 1000,
            cpu_system_ns=stat.get("system_usec", 0) * 1000,
            cpu_throttled_periods=stat.get("nr_throttled", 0),
            cpu_throttled_ns=stat.get("throttled_usec", 0) * 1000,
        )

    # --- freezer and signals ------------------------------------------------

    def can_freeze(self, path: str) -> bool:
        return self.fs.exists(self.root / cgroup_rel(path) / "cgroup.freeze")

    def freeze(self, path: str, timeout: float = 2.0) -> None:
        freeze_unified(self.fs, self.root / cgroup_rel(path), timeout)

    def thaw(self, path: str) -> None:
        write_file(self.fs, self.root / cgroup_rel(path) / "cgroup.freeze", "0")

    def frozen(self, path: str) -> bool:
        return frozen_unified(self.fs, self.root / cgroup_rel(path))

    def _kill_fast(self, rel: PurePosixPath) -> bool:
        kill = self.root / rel / "cgroup.kill"  # Linux 5.14+
        if not self.fs.exists(kill):
            return False
        write_file(self.fs, kill, "1")
        return True
