"""Container cgroups: what to limit, the manager interface, and what v1 and v2 share.

A container's cgroup is named by one path such as ``/skiff/<container-id>``,
relative to the root of every cgroup hierarchy.  :func:`detect` picks the
manager for this host once, at start (runc's habit):

* :class:`~agent.runtime.cgroups_v1.V1Manager` on cgroup v1 hosts, and on
  *hybrid* hosts (v1 controllers plus a cgroup2 mount at ``<root>/unified``),
  where it keeps the same path in every hierarchy, named and unified ones too,
  so a container's ``/proc/self/cgroup`` is consistent;
* :class:`~agent.runtime.cgroups_v2.V2Manager` on unified (pure v2) hosts.

Managers are mechanism only (STYLE habit 1): they write what they are given
and remember nothing.  Every root and the filesystem itself are injected
(:class:`CgroupFS`), so the logic runs in unit tests on a fake tree.

Errors: bad values raise :class:`~agent.errors.InvalidArgument` with Docker's
wording; the kernel refusing a write raises :class:`OSError` whose message
names the file and the value.
"""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from agent.errors import InvalidArgument

if TYPE_CHECKING:
    from agent.runtime.cgroups_v1 import V1Manager
    from agent.runtime.cgroups_v2 import V2Manager

#: Docker's smallest memory limit and reservation (``linuxMinMemory``).
MIN_MEMORY = 6 * 1024 * 1024
#: CFS period used for ``--cpus`` (Docker and runc use 100 ms).
CPU_PERIOD_US = 100_000
#: cpu.shares bounds the kernel accepts on v1.
MIN_CPU_SHARES, MAX_CPU_SHARES = 2, 262_144
#: v1 writes at or above this are "no limit" (the kernel rounds 2**63-1 down to a page).
UNLIMITED_THRESHOLD = 1 << 62

# Docker's flag for each Resources field, for messages.
FLAGS: Mapping[str, str] = {
    "memory": "--memory",
    "memory_reservation": "--memory-reservation",
    "memory_swap": "--memory-swap",
    "cpus": "--cpus",
    "cpu_shares": "--cpu-shares",
    "cpuset_cpus": "--cpuset-cpus",
    "cpuset_mems": "--cpuset-mems",
    "pids_limit": "--pids-limit",
}
# The controller each Resources field needs.
CONTROLLERS: Mapping[str, str] = {
    "memory": "memory",
    "memory_reservation": "memory",
    "memory_swap": "memory",
    "cpus": "cpu",
    "cpu_shares": "cpu",
    "cpuset_cpus": "cpuset",
    "cpuset_mems": "cpuset",
    "pids_limit": "pids",
}


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Limits for one container, in Docker's units; ``None`` leaves a limit unset.

    ``memory``, ``memory_reservation``: bytes (``-1`` for unlimited memory).
    ``memory_swap``: memory *plus* swap in bytes, as Docker's ``--memory-swap``
    (``-1`` unlimited swap; equal to ``memory`` for no swap).  Docker's default
    of twice ``memory`` when only ``memory`` is given is the caller's policy.
    ``cpus``: CPUs as a float, written as a CFS quota over a 100 ms period.
    ``cpu_shares``: Docker's relative weight (1024 default); v2 maps it to
    ``cpu.weight``.  ``cpuset_cpus``/``cpuset_mems``: lists like ``"0-1,3"``.
    ``pids_limit``: at least 1, or ``-1`` for unlimited.
    """

    memory: int | None = None
    memory_reservation: int | None = None
    memory_swap: int | None = None
    cpus: float | None = None
    cpu_shares: int | None = None
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None
    pids_limit: int | None = None

    def requested(self) -> dict[str, object]:
        """The fields that are set, by name."""
        return {name: getattr(self, name) for name in FLAGS if getattr(self, name) is not None}

    def controllers(self) -> set[str]:
        """Controllers these limits need."""
        return {CONTROLLERS[name] for name in self.requested()}


@dataclass(frozen=True, kw_only=True)
class CgroupStats:
    """What a container's cgroup reports; v1 and v2 mapped to one shape.

    ``memory_max_usage`` and ``oom_kills`` are ``None`` where the kernel does
    not keep them (``memory.peak`` before Linux 5.19; ``oom_kill`` in v1's
    ``memory.oom_control`` before 4.13).  ``memory_limit`` and ``pids_limit``
    are ``None`` when unlimited.  ``memory_stat`` is ``memory.stat`` as is
    (v1 names its hierarchical totals ``total_*``).
    """

    memory_usage: int = 0
    memory_max_usage: int | None = None
    memory_limit: int | None = None
    memory_stat: Mapping[str, int] = field(default_factory=dict)
    oom_kills: int | None = None
    pids_current: int = 0
    pids_limit: int | None = None
    cpu_usage_ns: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    cpu_throttled_periods: int = 0
    cpu_throttled_ns: int = 0

    @property
    def oom_killed(self) -> bool:
        """Whether the OOM killer killed a process of this cgroup."""
        return bool(self.oom_kills)


@runtime_checkable
class CgroupManager(Protocol):
    """One host's cgroups, v1/hybrid or v2, behind one interface."""

    @property
    def mode(self) -> str:
        """``"v1"``, ``"hybrid"`` or ``"v2"``."""
        ...

    @property
    def controllers(self) -> frozenset[str]:
        """Controllers a container can be limited by on this host."""
        ...

    def validate(self, resources: Resources) -> None:
        """Raise InvalidArgument (Docker's wording) for limits this host cannot take."""
        ...

    def create(self, path: str) -> None:
        """Make the cgroup (and missing parents) in every hierarchy; idempotent."""
        ...

    def apply(self, path: str, resources: Resources) -> None:
        """Validate, then write the limits that are set."""
        ...

    def add_process(self, path: str, pid: int) -> None:
        """Move ``pid`` into the cgroup in every hierarchy."""
        ...

    def pids(self, path: str) -> list[int]:
        """Processes in the cgroup and its descendants, sorted."""
        ...

    def stats(self, path: str) -> CgroupStats:
        ...

    def freeze(self, path: str, timeout: float = 2.0) -> None:
        """Freeze every process; returns once the kernel reports the cgroup frozen."""
        ...

    def thaw(self, path: str) -> None:
        ...

    def frozen(self, path: str) -> bool:
        ...

    def can_freeze(self, path: str) -> bool:
        """Whether this cgroup can be frozen (a freezer hierarchy, or cgroup.freeze)."""
        ...

    def kill_all(self, path: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process in the cgroup (atomically where the kernel can).
        After SIGKILL nothing in the subtree is left frozen."""
        ...

    def destroy(self, path: str, *, kill: bool = False, timeout: float = 5.0) -> None:
        """Kill what is left (if ``kill``), wait until empty, remove the cgroup and its
        descendants from every hierarchy.  A cgroup already gone is fine."""
        ...


# --- the filesystem seam ----------------------------------------------------


class CgroupFS:
    """The calls managers make on cgroupfs, plus ``kill``.

    Unit tests pass a subclass in which ``mkdir`` creates the interface files
    the kernel would and ``rmdir`` removes a directory still holding them.
    """

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: Path) -> bool:
        return os.path.isdir(path)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def subdirs(self, path: Path) -> list[Path]:
        with os.scandir(path) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]

    def read(self, path: Path) -> str:
        with open(path, encoding="ascii") as f:
            return f.read()

    def write(self, path: Path, value: str) -> None:
        # No O_CREAT: a missing interface file is an error, never a new file.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)


def write_file(fs: CgroupFS, path: Path, value: str) -> None:
    """Write one value, naming the file and value when the kernel refuses."""
    try:
        fs.write(path, value)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {value!r}: {exc.strerror}", str(path)) from exc


def read_file(fs: CgroupFS, path: Path, default: str | None = None) -> str:
    """Read one file; ``default`` (when given) stands in for a file that is missing."""
    try:
        return fs.read(path)
    except FileNotFoundError:
        if default is None:
            raise
        return default


# --- paths ------------------------------------------------------------------


_PART = re.compile(r"[A-Za-z0-9_.:@+-]+")


def cgroup_rel(path: str) -> PurePosixPath:
    """``"/skiff/abc"`` → ``skiff/abc``; refuses the root, ``..`` and odd names."""
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") or not _PART.fullmatch(p) for p in parts):
        raise InvalidArgument(f"invalid cgroup path {path!r}: want /name[/name...] of [A-Za-z0-9_.:@+-]")
    return PurePosixPath(*parts)


# --- validation -------------------------------------------------------------


def parse_cpuset(spec: str) -> set[int]:
    """``"0-1,3"`` → {0, 1, 3}; raises ValueError on bad syntax (Docker's ParseUintList)."""
    out: set[int] = set()
    if not spec:
        raise ValueError("empty list")
    for item in spec.split(","):
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"invalid item {item!r}")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise ValueError(f"invalid range {item!r}")
        out.update(range(first, last + 1))
    return out


def format_cpuset(cpus: Iterable[int]) -> str:
    """{0, 1, 3} → ``"0-1,3"``."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def validate_resources(resources: Resources, *, cpus_available: str, mems_available: str) -> None:
    """Check ``resources`` against Docker's rules and this host's CPUs and memory nodes.

    ``cpus_available``/``mems_available`` are the cpuset lists the host offers
    (``"0-3"``); their CPU count bounds ``cpus``.
    """
    r = resources
    if r.memory is not None and r.memory != -1 and r.memory < MIN_MEMORY:
        raise InvalidArgument("Minimum memory limit allowed is 6MB")
    if r.memory_reservation is not None:
        if r.memory_reservation < MIN_MEMORY:
            raise InvalidArgument("Minimum memory reservation allowed is 6MB")
        if r.memory is not None and r.memory != -1 and r.memory < r.memory_reservation:
            raise InvalidArgument("Minimum memory limit can not be less than memory reservation limit, see usage")
    if r.memory_swap is not None and r.memory_swap != -1:
        if r.memory is None or r.memory == -1:
            raise InvalidArgument("You should always set the Memory limit when using Memoryswap limit, see usage")
        if r.memory_swap < r.memory:
            raise InvalidArgument("Minimum memoryswap limit should be larger than memory limit, see usage")
    ncpu = len(parse_cpuset(cpus_available))
    if r.cpus is not None and (math.isnan(r.cpus) or r.cpus < 0.01 or r.cpus > ncpu):
        raise InvalidArgument(f"Range of CPUs is from 0.01 to {ncpu}.00, as there are only {ncpu} CPUs available")
    if r.cpu_shares is not None and r.cpu_shares < 1:
        raise InvalidArgument(f"invalid CPU shares ({r.cpu_shares}): value must be a positive integer")
    if r.cpuset_cpus is not None:
        _check_cpuset(r.cpuset_cpus, cpus_available, "cpus", "CPUs")
    if r.cpuset_mems is not None:
        _check_cpuset(r.cpuset_mems, mems_available, "mems", "memory nodes")
    if r.pids_limit is not None and r.pids_limit != -1 and r.pids_limit < 1:
        raise InvalidArgument(f"invalid pids limit {r.pids_limit}: must be -1 (unlimited) or at least 1")


def _check_cpuset(spec: str, available: str, kind: str, noun: str) -> None:
    try:
        wanted = parse_cpuset(spec)
    except ValueError:
        raise InvalidArgument(f"Invalid value {spec} for cpuset {kind}") from None
    if not wanted <= parse_cpuset(available):
        raise InvalidArgument(f"Requested {noun} are not available - requested {spec}, available: {available}")


def check_controllers(resources: Resources, available: Iterable[str], where: str) -> None:
    """InvalidArgument naming the flag when a needed controller is missing."""
    have = set(available)
    for name in resources.requested():
        if CONTROLLERS[name] not in have:
            raise InvalidArgument(
                f"{FLAGS[name]} needs the {CONTROLLERS[name]} cgroup controller, which {where} does not have")


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) → cpu.weight (1..10000), runc's mapping."""
    shares = min(max(shares, MIN_CPU_SHARES), MAX_CPU_SHARES)
    return 1 + ((shares - 2) * 9999) // 262142


def cpu_quota(cpus: float) -> int:
    """CFS quota in µs for ``cpus`` over :data:`CPU_PERIOD_US` (the kernel's minimum is 1000)."""
    return max(1000, round(cpus * CPU_PERIOD_US))


# --- parsing ----------------------------------------------------------------


def parse_keyed(text: str) -> dict[str, int]:
    """``"key value"`` lines (memory.stat, memory.events, cpu.stat, oom_control) → dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        try:
            out[key] = int(value.strip())
        except ValueError:
            continue
    return out


def parse_limit(text: str) -> int | None:
    """``"max"`` or a huge v1 value → None (unlimited); otherwise the number."""
    text = text.strip()
    if not text or text == "max":
        return None
    value = int(text)
    return None if value < 0 or value >= UNLIMITED_THRESHOLD else value


def parse_int(text: str, default: int = 0) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return default


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: v1 with its controllers (``name=systemd`` for a
    named one), or the cgroup2 mount (no controllers listed)."""

    mountpoint: Path
    version: int
    controllers: frozenset[str]


V1_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio",
    "blkio", "perf_event", "hugetlb", "pids", "rdma", "misc", "debug",
})


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def parse_mountinfo(text: str, root: str | Path = "/sys/fs/cgroup") -> list[Hierarchy]:
    """Cgroup hierarchies mounted at or under ``root``, in mount order, each once."""
    base = Path(root)
    seen: set[str] = set()
    out: list[Hierarchy] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mountpoint = Path(_unescape(fields[4]))
        if mountpoint != base and base not in mountpoint.parents:
            continue
        if fields[2] in seen:  # same superblock mounted twice
            continue
        seen.add(fields[2])
        if tail[0] == "cgroup2":
            out.append(Hierarchy(mountpoint, 2, frozenset()))
        else:
            opts = tail[2].split(",")
            ctrls = frozenset(o for o in opts if o in V1_CONTROLLERS or o.startswith("name="))
            out.append(Hierarchy(mountpoint, 1, ctrls))
    return out


def read_mountinfo(mountinfo: str | None) -> str:
    if mountinfo is not None:
        return mountinfo
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return f.read()


_HOST_MANAGER: V1Manager | V2Manager | None = None


def detect(root: str | Path = "/sys/fs/cgroup", mountinfo: str | None = None,
           fs: CgroupFS | None = None) -> V1Manager | V2Manager:
    """The manager for this host: v2 when cgroup2 is mounted at ``root``, else v1/hybrid.

    ``mountinfo`` is the text of ``/proc/self/mountinfo`` (read when ``None``).
    The host's manager (all defaults) is made once per process: the cgroup
    mounts do not change under a running agent or shim, and reading them
    costs milliseconds on every container start and exit.
    """
    global _HOST_MANAGER
    host = str(root) == "/sys/fs/cgroup" and mountinfo is None and fs is None
    if host and _HOST_MANAGER is not None:
        return _HOST_MANAGER
    manager = _detect(root, mountinfo, fs)
    if host:
        _HOST_MANAGER = manager
    return manager


def _detect(root: str | Path, mountinfo: str | None, fs: CgroupFS | None) -> V1Manager | V2Manager:
    from agent.runtime.cgroups_v1 import V1Manager
    from agent.runtime.cgroups_v2 import V2Manager

    text = read_mountinfo(mountinfo)
    hierarchies = parse_mountinfo(text, root)
    if any(h.version == 2 and h.mountpoint == Path(root) for h in hierarchies):
        return V2Manager(root, fs=fs)
    if any(h.version == 1 for h in hierarchies):
        return V1Manager(root, mountinfo=text, fs=fs)
    raise OSError(errno.ENOENT, f"no cgroup filesystem is mounted at or under {root} (per /proc/self/mountinfo)")


def freeze_unified(fs: CgroupFS, d: Path, timeout: float) -> None:
    """Freeze a cgroup2 directory and wait until ``cgroup.events`` says ``frozen 1``."""
    write_file(fs, d / "cgroup.freeze", "1")
    deadline = time.monotonic() + timeout
    delay = 0.001
    while parse_keyed(read_file(fs, d / "cgroup.events", "")).get("frozen") != 1:
        if time.monotonic() >= deadline:
            write_file(fs, d / "cgroup.freeze", "0")
            raise OSError(errno.EBUSY, f"cgroup did not freeze within {timeout:g}s", str(d))
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def frozen_unified(fs: CgroupFS, d: Path) -> bool:
    return parse_keyed(read_file(fs, d / "cgroup.events", "")).get("frozen") == 1


# --- shared behaviour -------------------------------------------------------


class BaseManager:
    """What v1 and v2 managers do alike: validation, pids, signalling, teardown.

    Subclasses provide ``_dirs`` (the cgroup's directory in every hierarchy),
    ``_available`` (cpus, mems), ``freeze``/``thaw``/``frozen`` and ``_kill_fast``.
    """

    def __init__(self, fs: CgroupFS | None) -> None:
        self.fs = fs if fs is not None else CgroupFS()

    # hooks
    def _dirs(self, rel: PurePosixPath) -> list[Path]:
        raise NotImplementedError

    def _available(self) -> tuple[str, str]:
        raise NotImplementedError

    def _kill_fast(self, rel: PurePosixPath) -> bool:
        """Kill the whole cgroup in one write (cgroup.kill); False when not possible."""
        return False

    def freeze(self, path: str, timeout: float = 2.0) -> None:
        raise NotImplementedError

    def thaw(self, path: str) -> None:
        raise NotImplementedError

    def frozen(self, path: str) -> bool:
        raise NotImplementedError

    def can_freeze(self, path: str) -> bool:
        raise NotImplementedError

    # shared
    def validate(self, resources: Resources) -> None:
        cpus, mems = self._available()
        validate_resources(resources, cpus_available=cpus, mems_available=mems)

    def dirs(self, path: str) -> list[Path]:
        """The cgroup's directory in every hierarchy (one on v2)."""
        return self._dirs(cgroup_rel(path))

    def oom_file(self, path: str) -> Path | None:
        """The file whose ``oom_kill`` line counts the cgroup's OOM kills (None without memory)."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        return any(self.fs.is_dir(d) for d in self._dirs(cgroup_rel(path)))

    def pids(self, path: str) -> list[int]:
        found: set[int] = set()
        for top in self._dirs(cgroup_rel(path)):
            for d in self._walk(top):
                try:
                    text = self.fs.read(d / "cgroup.procs")
                except FileNotFoundError:
                    continue
                found.update(int(x) for x in text.split())
        return sorted(found)

    def _walk(self, top: Path) -> list[Path]:
        """``top`` and its descendants, children before parents; [] when ``top`` is gone."""
        try:
            subs = self.fs.subdirs(top)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out: list[Path] = []
        for sub in subs:
            out.extend(self._walk(sub))
        out.append(top)
        return out

    def kill_all(self, path: str, sig: int = signal.SIGKILL) -> None:
        rel = cgroup_rel(path)
        if sig == signal.SIGKILL and self._kill_fast(rel):
            self._thaw_all(path)
            if not self.pids(path):
                return
        # Freeze first so nothing forks past us, signal, then restore.
        was_frozen = froze = False
        if self.can_freeze(path):
            was_frozen = self.frozen(path)
            try:
                self.freeze(path)
                froze = True
            except OSError:
                pass
        try:
            for pid in self.pids(path):
                try:
                    self.fs.kill(pid, sig)
                except ProcessLookupError:
                    pass
        finally:
            if froze and (sig == signal.SIGKILL or not was_frozen):
                self.thaw(path)
        if sig == signal.SIGKILL:
            self._thaw_all(path)

    def _thaw_all(self, path: str) -> None:
        """Thaw the cgroup and every frozen descendant, parents first: a frozen v1 task
        acts on SIGKILL only once thawed, and thawing a parent leaves a child that was
        frozen itself frozen."""
        rel = cgroup_rel(path)
        subpaths: dict[str, None] = {}
        for top in self._dirs(rel):
            for d in reversed(self._walk(top)):
                subpaths.setdefault(str(PurePosixPath("/", rel, d.relative_to(top))), None)
        for sub in subpaths:
            try:
                if self.can_freeze(sub) and self.frozen(sub):
                    self.thaw(sub)
            except (FileNotFoundError, InvalidArgument):
                continue

    def destroy(self, path: str, *, kill: bool = False, timeout: float = 5.0) -> None:
        rel = cgroup_rel(path)
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            left = self.pids(path)
            if not left:
                break
            if time.monotonic() >= deadline:
                raise OSError(errno.EBUSY, f"cgroup {path} still has processes {left} after {timeout:g}s")
            if kill:
                self.kill_all(path, signal.SIGKILL)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        deadline = max(deadline, time.monotonic() + 0.5)  # rmdir gets its own brief retries
        for top in self._dirs(rel):
            for d in self._walk(top):
                self._rmdir(d, deadline)

    def _rmdir(self, d: Path, deadline: float) -> None:
        """rmdir, retrying briefly on EBUSY (the kernel lags behind exiting tasks)."""
        delay = 0.01
        while True:
            try:
                self.fs.rmdir(d)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise OSError(exc.errno, f"cannot remove cgroup: {exc.strerror}", str(d)) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.16)

    def _undo_mkdirs(self, made: list[Path]) -> None:
        for d in reversed(made):
            try:
                self.fs.rmdir(d)
            except OSError:
                pass
