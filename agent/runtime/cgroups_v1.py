"""cgroup v1 (and hybrid) manager: one directory per hierarchy for each container.

Hierarchies come from mountinfo: every ``cgroup`` mount under the root (co-mounted
ones such as ``cpu,cpuacct`` once, named ones such as ``name=systemd`` too) and,
on hybrid hosts, the ``cgroup2`` mount at ``<root>/unified``.  The container's
path is made in all of them, so its ``/proc/self/cgroup`` names one path
throughout; on hybrid hosts the unified directory also gives ``cgroup.kill``.

v1 gotchas handled here:

* a new cpuset cgroup starts with empty ``cpuset.cpus``/``cpuset.mems`` and
  refuses tasks (ENOSPC) until they are filled: :meth:`V1Manager.create` copies
  the parent's values into every level that is empty;
* ``memory.memsw.limit_in_bytes`` must stay >= ``memory.limit_in_bytes``, so
  the two are written in the order that keeps that true (runc's order);
* a frozen task does not act on SIGKILL until thawed (``kill_all`` thaws);
* ``oom_kill`` in ``memory.oom_control`` exists only from Linux 4.13.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath

from agent.runtime.cgroups import (
    CPU_PERIOD_US,
    MAX_CPU_SHARES,
    MIN_CPU_SHARES,
    BaseManager,
    CgroupFS,
    CgroupStats,
    Hierarchy,
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
    parse_mountinfo,
    read_file,
    read_mountinfo,
    write_file,
)


class V1Manager(BaseManager):
    """cgroup v1 / hybrid; ``mountinfo`` is the text of /proc/self/mountinfo (read when None)."""

    def __init__(self, root: str | Path = "/sys/fs/cgroup", mountinfo: str | None = None,
                 fs: CgroupFS | None = None) -> None:
        super().__init__(fs)
        self.root = Path(root)
        found = parse_mountinfo(read_mountinfo(mountinfo), self.root)
        # cgroup2 at the root itself would make this a v2 host; only a nested one counts.
        self.hierarchies: list[Hierarchy] = [h for h in found if h.mountpoint != self.root]
        self._by_controller: dict[str, Path] = {}
        for h in self.hierarchies:
            for c in h.controllers:
                self._by_controller.setdefault(c, h.mountpoint)
        self.unified: Path | None = next((h.mountpoint for h in self.hierarchies if h.version == 2), None)
        if not self._by_controller:
            raise OSError(errno.ENOENT, f"no cgroup v1 hierarchy is mounted under {self.root}")

    @property
    def mode(self) -> str:
        return "hybrid" if self.unified is not None else "v1"

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(c for c in self._by_controller if not c.startswith("name="))

    def _dir(self, controller: str, rel: PurePosixPath) -> Path | None:
        mount = self._by_controller.get(controller)
        return None if mount is None else mount / rel

    def _dirs(self, rel: PurePosixPath) -> list[Path]:
        return [h.mountpoint / rel for h in self.hierarchies]

    def oom_file(self, path: str) -> Path | None:
        mem = self._dir("memory", cgroup_rel(path))
        return None if mem is None else mem / "memory.oom_control"

    def _available(self) -> tuple[str, str]:
        mount = self._by_controller.get("cpuset")
        if mount is not None:
            cpus = (read_file(self.fs, mount / "cpuset.effective_cpus", "").strip()
                    or read_file(self.fs, mount / "cpuset.cpus", "").strip())
            mems = (read_file(self.fs, mount / "cpuset.effective_mems", "").strip()
                    or read_file(self.fs, mount / "cpuset.mems", "").strip())
            if cpus and mems:
                return cpus, mems
        return format_cpuset(os.sched_getaffinity(0)), "0"

    # --- lifecycle ----------------------------------------------------------

    def create(self, path: str) -> None:
        rel = cgroup_rel(path)
        made: list[Path] = []
        try:
            for h in self.hierarchies:
                cur = h.mountpoint
                for part in rel.parts:
                    parent, cur = cur, cur / part
                    if not self.fs.is_dir(cur):
                        try:
                            self.fs.mkdir(cur)
                            made.append(cur)
                        except FileExistsError:
                            pass
                    if "cpuset" in h.controllers:
                        self._inherit_cpuset(parent, cur)
        except OSError:
            self._undo_mkdirs(made)
            raise

    def _inherit_cpuset(self, parent: Path, child: Path) -> None:
        """Fill an empty cpuset.cpus/mems from the parent, or the cgroup takes no tasks."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not read_file(self.fs, child / name).strip():
                write_file(self.fs, child / name, read_file(self.fs, parent / name).strip())

    def add_process(self, path: str, pid: int) -> None:
        rel = cgroup_rel(path)
        for d in self._dirs(rel):
            write_file(self.fs, d / "cgroup.procs", str(pid))

    # --- limits -------------------------------------------------------------

    def apply(self, path: str, resources: Resources) -> None:
        rel = cgroup_rel(path)
        self.validate(resources)
        check_controllers(resources, self.controllers, f"this host (cgroup {self.mode} under {self.root})")
        r = resources
        mem = self._dir("memory", rel)
        if mem is not None:
            self._apply_memory(mem, r)
        cpu = self._dir("cpu", rel)
        if cpu is not None:
            if r.cpus is not None:
                self._write_cfs(cpu, cpu_quota(r.cpus))
            if r.cpu_shares is not None:
                shares = min(max(r.cpu_shares, MIN_CPU_SHARES), MAX_CPU_SHARES)
                write_file(self.fs, cpu / "cpu.shares", str(shares))
        cpuset = self._dir("cpuset", rel)
        if cpuset is not None:
            if r.cpuset_mems is not None:
                write_file(self.fs, cpuset / "cpuset.mems", r.cpuset_mems)
            if r.cpuset_cpus is not None:
                write_file(self.fs, cpuset / "cpuset.cpus", r.cpuset_cpus)
        pids = self._dir("pids", rel)
        if pids is not None and r.pids_limit is not None:
            write_file(self.fs, pids / "pids.max", "max" if r.pids_limit == -1 else str(r.pids_limit))

    def _apply_memory(self, d: Path, r: Resources) -> None:
        limit, memsw = d / "memory.limit_in_bytes", d / "memory.memsw.limit_in_bytes"
        has_memsw = self.fs.exists(memsw)  # absent when swap accounting is off
        swap = r.memory_swap if has_memsw else None
        if r.memory == -1 and swap is None and has_memsw:
            swap = -1
        if r.memory is not None and swap is not None:
            current = parse_limit(read_file(self.fs, limit))  # None: unlimited
            # memsw >= limit must hold after each write.
            order: list[tuple[Path, int | None]]
            if swap == -1 or (current is not None and current < swap):
                order = [(memsw, swap), (limit, r.memory)]
            else:
                order = [(limit, r.memory), (memsw, swap)]
        else:
            order = [(limit, r.memory), (memsw, swap)]
        for f, value in order:
            if value is not None:
                write_file(self.fs, f, str(value))
        if r.memory_reservation is not None:
            write_file(self.fs, d / "memory.soft_limit_in_bytes", str(r.memory_reservation))

    def _write_cfs(self, d: Path, quota: int) -> None:
        try:
            write_file(self.fs, d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        except OSError as exc:
            # The old quota may not fit the new period; quota first, then retry.
            if exc.errno != errno.EINVAL:
                raise
            write_file(self.fs, d / "cpu.cfs_quota_us", str(quota))
            write_file(self.fs, d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            return
        write_file(self.fs, d / "cpu.cfs_quota_us", str(quota))

    # --- observation --------------------------------------------------------

    def stats(self, path: str) -> CgroupStats:
        rel = cgroup_rel(path)
        fs = self.fs
        out = CgroupStats()
        mem = self._dir("memory", rel)
        if mem is not None:
            out = replace(
                out,
                memory_usage=parse_int(read_file(fs, mem / "memory.usage_in_bytes", "0")),
                memory_max_usage=parse_int(read_file(fs, mem / "memory.max_usage_in_bytes", "0")),
                memory_limit=parse_limit(read_file(fs, mem / "memory.limit_in_bytes", "max")),
                memory_stat=parse_keyed(read_file(fs, mem / "memory.stat", "")),
                oom_kills=parse_keyed(read_file(fs, mem / "memory.oom_control", "")).get("oom_kill"),
            )
        pids = self._dir("pids", rel)
        if pids is not None:
            out = replace(out, pids_current=parse_int(read_file(fs, pids / "pids.current", "0")),
                          pids_limit=parse_limit(read_file(fs, pids / "pids.max", "max")))
        acct = self._dir("cpuacct", rel)
        if acct is not None:
            if fs.exists(acct / "cpuacct.usage_user"):
                user = parse_int(read_file(fs, acct / "cpuacct.usage_user", "0"))
                system = parse_int(read_file(fs, acct / "cpuacct.usage_sys", "0"))
            else:  # older kernels: clock ticks in cpuacct.stat
                ticks = parse_keyed(read_file(fs, acct / "cpuacct.stat", ""))
                ns_per_tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
                user, system = ticks.get("user", 0) * ns_per_tick, ticks.get("system", 0) * ns_per_tick
            out = replace(out, cpu_usage_ns=parse_int(read_file(fs, acct / "cpuacct.usage", "0")),
                          cpu_user_ns=user, cpu_system_ns=system)
        cpu = self._dir("cpu", rel)
        if cpu is not None:
            stat = parse_keyed(read_file(fs, cpu / "cpu.stat", ""))
            out = replace(out, cpu_throttled_periods=stat.get("nr_throttled", 0),
                          cpu_throttled_ns=stat.get("throttled_time", 0))
        return out

    # --- freezer and signals ------------------------------------------------

    def can_freeze(self, path: str) -> bool:
        rel = cgroup_rel(path)
        freezer = self._dir("freezer", rel)
        if freezer is not None:
            return self.fs.exists(freezer / "freezer.state")
        return self.unified is not None and self.fs.exists(self.unified / rel / "cgroup.freeze")

    def freeze(self, path: str, timeout: float = 2.0) -> None:
        rel = cgroup_rel(path)
        freezer = self._dir("freezer", rel)
        if freezer is None:
            if self.unified is None:
                raise OSError(errno.ENOTSUP, f"cannot freeze {path}: no freezer hierarchy under {self.root}")
            freeze_unified(self.fs, self.unified / rel, timeout)
            return
        state = freezer / "freezer.state"
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            write_file(self.fs, state, "FROZEN")
            if read_file(self.fs, state).strip() == "FROZEN":
                return
            if time.monotonic() >= deadline:
                write_file(self.fs, state, "THAWED")
                raise OSError(errno.EBUSY, f"cgroup did not freeze within {timeout:g}s", str(state))
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def thaw(self, path: str) -> None:
        rel = cgroup_rel(path)
        freezer = self._dir("freezer", rel)
        if freezer is not None:
            write_file(self.fs, freezer / "freezer.state", "THAWED")
        elif self.unified is not None:
            write_file(self.fs, self.unified / rel / "cgroup.freeze", "0")
        else:
            raise OSError(errno.ENOTSUP, f"cannot thaw {path}: no freezer hierarchy under {self.root}")

    def frozen(self, path: str) -> bool:
        rel = cgroup_rel(path)
        freezer = self._dir("freezer", rel)
        if freezer is not None:
            return read_file(self.fs, freezer / "freezer.state").strip() == "FROZEN"
        return self.unified is not None and frozen_unified(self.fs, self.unified / rel)

    def _kill_fast(self, rel: PurePosixPath) -> bool:
        # Hybrid: the unified directory holds the same processes and has cgroup.kill (5.14+).
        if self.unified is None or not self.fs.exists(self.unified / rel / "cgroup.kill"):
            return False
        write_file(self.fs, self.unified / rel / "cgroup.kill", "1")
        return True
