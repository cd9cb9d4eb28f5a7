"""The OCI runtime-spec ``config.json`` for a container, with Docker's defaults.

:func:`build_spec` turns a :class:`ContainerSpecOptions` (what ``run``'s
flags and the image config resolved to, see :mod:`agent.runtime.imageconfig`)
into an OCI runtime-spec 1.0.2 document.  The built-in executor and
``runc run`` take the same bundle, so the document must satisfy both.

Defaults follow dockerd (moby ``oci/defaults.go``, ``oci/caps`` and
``daemon/oci_linux.go``):

* Docker's 14 default capabilities in the bounding, effective and permitted
  sets; inheritable and ambient empty; for a non-root user only the bounding
  set, as Docker does since the CVE-2022-24769 fix (execve would clear the
  others anyway).  ``--cap-add``/``--cap-drop`` with Docker's ``ALL`` rules.
* Namespaces pid, ipc, uts, mount, cgroup, and network unless ``host``.
* Docker's mounts (/proc, a tmpfs /dev, /dev/pts, /dev/shm 64 MiB,
  /dev/mqueue, read-only /sys and /sys/fs/cgroup), the container's
  /etc/hostname, /etc/hosts and /etc/resolv.conf, then the extra mounts.
* Docker's masked and read-only paths; a device cgroup that denies all but
  the standard nodes (runc creates those nodes itself).
* RLIMIT_NOFILE inherited from the agent unless ``--ulimit nofile`` says
  otherwise (never above the agent's hard limit by default: without
  CAP_SYS_RESOURCE a runtime cannot raise it); ``oomScoreAdj`` 0.
* A pids limit by default (:data:`DEFAULT_PIDS_LIMIT`), unlike Docker.

Describe, don't do: this module reads nothing but ``getrlimit`` and
``/proc/sys/kernel/cap_last_cap`` and mounts nothing.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from agent.errors import InvalidArgument

OCI_VERSION = "1.0.2"

#: every container gets a pids limit unless it asks for none (``--pids-limit -1``).
#: 4096 tasks (threads count) is far above what one service normally needs and
#: stops a fork bomb long before the host's pid space (podman picks 2048).
DEFAULT_PIDS_LIMIT = 4096

#: Docker's default /dev/shm size
DEFAULT_SHM_SIZE = 64 << 20

#: dockerd refuses memory limits below this (``--memory``/``--memory-reservation``)
MIN_MEMORY = 6 << 20

#: CFS period dockerd uses to express ``--cpus``
CPU_PERIOD = 100_000

#: an rlimit of ``-1`` in a ulimit means unlimited, RLIM_INFINITY in the spec
RLIM_INFINITY = 2**64 - 1

#: Linux capability numbers (include/uapi/linux/capability.h)
CAPABILITIES: dict[str, int] = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
    "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27,
    "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}

#: Docker's default set (moby ``oci/caps.DefaultCapabilities``), CapEff 0xa80425fb
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

#: Docker's masked paths (a file gets /dev/null over it, a directory an empty tmpfs)
DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
    "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)

#: Docker's read-only paths
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)

#: ``--ulimit`` names (Docker's, from go-units) → rlimit type
ULIMITS: dict[str, str] = {
    name: "RLIMIT_" + name.upper()
    for name in ("as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
                 "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")
}

_MAX_HOSTNAME = 64
_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


@dataclass(frozen=True)
class Mount:
    """One entry of the spec's ``mounts``; volumes and ``--tmpfs`` extend this list."""

    destination: str
    type: str
    source: str
    options: list[str] = field(default_factory=list)

    def to_oci(self) -> dict[str, Any]:
        return {"destination": self.destination, "type": self.type, "source": self.source,
                "options": list(self.options)}


@dataclass
class Resources:
    """cgroup limits: ``--memory``, ``--memory-reservation``, ``--memory-swap``,
    ``--cpus``, ``--cpuset-cpus``, ``--pids-limit``.

    ``memory_swap`` None means Docker's default (twice ``memory``, when the
    host accounts swap); -1 means unlimited.  ``pids_limit`` 0 or negative
    means no limit.
    """

    memory: int | None = None
    memory_reservation: int | None = None
    memory_swap: int | None = None
    cpus: float | None = None
    cpuset_cpus: str | None = None
    pids_limit: int | None = DEFAULT_PIDS_LIMIT


@dataclass
class ContainerSpecOptions:
    """Everything :func:`build_spec` needs, already resolved against the image."""

    args: list[str]
    rootfs: Path
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    hostname: str = ""
    terminal: bool = False
    readonly_rootfs: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    no_new_privileges: bool = False
    privileged: bool = False
    #: "none", "host", or the path of a network namespace to join (``/run/netns/x``)
    network_mode: str = "none"
    #: "" for a private namespace, "host" to share the host's (docker's --pid/--ipc/--uts)
    pid_mode: str = ""
    ipc_mode: str = ""
    uts_mode: str = ""
    #: host files bind-mounted over /etc/hostname, /etc/hosts, /etc/resolv.conf
    hostname_path: Path | None = None
    hosts_path: Path | None = None
    resolv_conf_path: Path | None = None
    #: extra mounts (volumes, binds, tmpfs), mounted after the defaults, parents first
    mounts: list[Mount] = field(default_factory=list)
    #: None means Docker's lists; privileged containers get none
    masked_paths: list[str] | None = None
    readonly_paths: list[str] | None = None
    #: ``--ulimit``: name ("nofile", …) → (soft, hard); -1 is unlimited
    ulimits: dict[str, tuple[int, int]] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    #: absolute cgroup path (cgroupfs), e.g. ``/skiff/<id>``; None leaves it to the runtime
    cgroups_path: str | None = None
    #: a seccomp profile in OCI form, or None for unconfined
    seccomp: dict[str, Any] | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    oom_score_adj: int | None = 0
    shm_size: int = DEFAULT_SHM_SIZE
    #: whether the host accounts swap in the memory cgroup (Docker drops swap limits otherwise)
    swap_limit_supported: bool = True
    #: highest capability the kernel knows; None reads /proc/sys/kernel/cap_last_cap
    cap_last_cap: int | None = None


# --- capabilities -------------------------------------------------------------


@cache
def host_cap_last_cap() -> int:
    """The kernel's highest capability number (what ``ALL`` expands to)."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text().strip())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


def normalize_capability(name: str) -> str:
    """``chown``, ``CAP_CHOWN``, ``Cap_Chown`` → ``CAP_CHOWN``; ``all`` → ``ALL``.

    An unknown name is :class:`InvalidArgument`.
    """
    upper = name.strip().upper()
    if upper == "ALL":
        return "ALL"
    full = upper if upper.startswith("CAP_") else "CAP_" + upper
    if full not in CAPABILITIES:
        raise InvalidArgument(f"unknown capability: {name!r}")
    return full


def all_capabilities(cap_last_cap: int | None = None) -> list[str]:
    """Every capability the kernel knows, in number order; on the host (``cap_last_cap``
    None), only those in this process's bounding set: a container cannot be given what the
    agent does not have (a nested or confined agent lacks some), and asking fails capset."""
    last = host_cap_last_cap() if cap_last_cap is None else cap_last_cap
    bounding = _own_bounding_set() if cap_last_cap is None else ~0
    return [name for name, number in sorted(CAPABILITIES.items(), key=lambda kv: kv[1])
            if number <= last and bounding >> number & 1]


def _own_bounding_set() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return ~0


def tweak_capabilities(cap_add: list[str], cap_drop: list[str], *, privileged: bool = False,
                       cap_last_cap: int | None = None) -> list[str]:
    """Docker's default set adjusted by ``--cap-add``/``--cap-drop``.

    As moby's ``TweakCapabilities``: privileged gets everything; ``--cap-add
    ALL`` is everything but the drops; ``--cap-drop ALL`` leaves only the
    adds; otherwise drop from the defaults, then add.  Names are validated
    even when privileged.
    """
    adds = _dedupe(normalize_capability(c) for c in cap_add)
    drops = _dedupe(normalize_capability(c) for c in cap_drop)
    if privileged:
        return all_capabilities(cap_last_cap)
    if "ALL" in adds:
        return [c for c in all_capabilities(cap_last_cap) if c not in drops]
    if "ALL" in drops:
        return [c for c in adds if c != "ALL"]
    kept = [c for c in DEFAULT_CAPABILITIES if c not in drops]
    return _dedupe(kept + adds)


def capability_mask(names: list[str] | tuple[str, ...]) -> int:
    """The bit mask of ``names``, as ``CapEff`` in /proc/<pid>/status shows it."""
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITIES[normalize_capability(name)]
    return mask


def _dedupe(items: Any) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


# --- mounts ---------------------------------------------------------------------


def default_mounts(*, shm_size: int = DEFAULT_SHM_SIZE, privileged: bool = False) -> list[Mount]:
    """Docker's mounts for every container, in mount order."""
    sys_mode = "rw" if privileged else "ro"
    return [
        Mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        Mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        Mount("/dev/pts", "devpts", "devpts",
              ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        Mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", f"size={shm_size}"]),
        Mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        Mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", sys_mode]),
        Mount("/sys/fs/cgroup", "cgroup", "cgroup", ["nosuid", "noexec", "nodev", sys_mode]),
    ]


def _check_destination(dest: str) -> str:
    if not dest.startswith("/") or "\0" in dest or ".." in dest.split("/"):
        raise InvalidArgument(f"invalid mount destination {dest!r}: must be an absolute path without '..'")
    return dest


def _mounts(opts: ContainerSpecOptions) -> list[dict[str, Any]]:
    extra = sorted(opts.mounts, key=lambda m: len([p for p in m.destination.split("/") if p]))
    for m in extra:
        _check_destination(m.destination)
    user_dests = {m.destination.rstrip("/") or "/" for m in extra}

    net_files: list[Mount] = []
    bind_opts = ["rbind", "rprivate"] + (["ro"] if opts.readonly_rootfs else [])
    for dest, source in (("/etc/hostname", opts.hostname_path), ("/etc/hosts", opts.hosts_path),
                         ("/etc/resolv.conf", opts.resolv_conf_path)):
        if source is not None and dest not in user_dests:
            net_files.append(Mount(dest, "bind", str(source), list(bind_opts)))

    defaults = [m for m in default_mounts(shm_size=opts.shm_size, privileged=opts.privileged)
                if m.destination not in user_dests
                and not ("/dev" in user_dests and m.destination.startswith("/dev/"))]
    return [m.to_oci() for m in defaults + net_files + extra]


# --- resources and limits ---------------------------------------------------------


#: the device cgroup: deny everything, then allow mknod of any node and the
#: standard character devices (null zero full random urandom tty console ptmx pts)
_DEVICE_RULES: list[dict[str, Any]] = [
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
]


def device_rules(privileged: bool = False) -> list[dict[str, Any]]:
    if privileged:
        return [{"allow": True, "access": "rwm"}]
    return [dict(rule) for rule in _DEVICE_RULES]


def _check_cpuset(value: str) -> str:
    if not _CPUSET.match(value):
        raise InvalidArgument(f"invalid --cpuset-cpus {value!r}: expected a list like 0-2,4")
    for part in value.split(","):
        lo, _, hi = part.partition("-")
        if hi and int(hi) < int(lo):
            raise InvalidArgument(f"invalid --cpuset-cpus {value!r}: range {part} is reversed")
    return value


def linux_resources(res: Resources, *, privileged: bool = False,
                    swap_limit_supported: bool = True) -> dict[str, Any]:
    """``linux.resources``, validated as dockerd validates the flags."""
    out: dict[str, Any] = {"devices": device_rules(privileged)}
    memory: dict[str, Any] = {}
    if res.memory is not None and res.memory != 0:
        if res.memory < MIN_MEMORY:
            raise InvalidArgument(f"--memory {res.memory}: minimum memory limit allowed is 6MB")
        memory["limit"] = res.memory
    if res.memory_reservation is not None and res.memory_reservation != 0:
        if res.memory_reservation < MIN_MEMORY:
            raise InvalidArgument(f"--memory-reservation {res.memory_reservation}: "
                                  "minimum memory reservation allowed is 6MB")
        if "limit" in memory and res.memory_reservation > memory["limit"]:
            raise InvalidArgument(f"--memory {memory['limit']} is less than --memory-reservation "
                                  f"{res.memory_reservation}: the limit must be at least the reservation")
        memory["reservation"] = res.memory_reservation
    if res.memory_swap is not None and res.memory_swap != 0:
        if "limit" not in memory:
            raise InvalidArgument("--memory-swap needs --memory as well")
        if res.memory_swap != -1 and res.memory_swap < memory["limit"]:
            raise InvalidArgument(f"--memory-swap {res.memory_swap} must be at least --memory {memory['limit']}")
    if swap_limit_supported and "limit" in memory:
        swap = res.memory_swap if res.memory_swap else 2 * memory["limit"]
        memory["swap"] = swap
    if memory:
        out["memory"] = memory

    cpu: dict[str, Any] = {}
    if res.cpus is not None and res.cpus != 0:
        if res.cpus < 0.01:
            raise InvalidArgument(f"--cpus {res.cpus}: the range of CPUs starts at 0.01")
        cpu["quota"] = round(res.cpus * CPU_PERIOD)
        cpu["period"] = CPU_PERIOD
    if res.cpuset_cpus:
        cpu["cpus"] = _check_cpuset(res.cpuset_cpus)
    if cpu:
        out["cpu"] = cpu

    if res.pids_limit is not None and res.pids_limit > 0:
        out["pids"] = {"limit": res.pids_limit}
    return out


def _spec_rlimit(value: int) -> int:
    return RLIM_INFINITY if value in (-1, resource.RLIM_INFINITY) else value


def rlimits(ulimits: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """``process.rlimits``: RLIMIT_NOFILE from the agent unless overridden, then the ulimits.

    Names are Docker's (``nofile``, ``nproc``, ``core``, …); soft must not
    exceed hard; -1 is unlimited.
    """
    limits: dict[str, tuple[int, int]] = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits["RLIMIT_NOFILE"] = (_spec_rlimit(soft), _spec_rlimit(hard))
    for name, pair in ulimits.items():
        kind = ULIMITS.get(name.strip().lower())
        if kind is None:
            raise InvalidArgument(f"invalid ulimit type: {name!r}")
        if len(pair) != 2:
            raise InvalidArgument(f"ulimit {name}: expected (soft, hard), got {pair!r}")
        u_soft, u_hard = pair
        for value in (u_soft, u_hard):
            if value < -1:
                raise InvalidArgument(f"ulimit {name}: invalid value {value} (use -1 for unlimited)")
        s, h = _spec_rlimit(u_soft), _spec_rlimit(u_hard)
        if s > h:
            raise InvalidArgument(f"ulimit {name}: soft limit must be less than or equal to hard limit: "
                                  f"{u_soft} > {u_hard}")
        limits[kind] = (s, h)
    return [{"type": kind, "soft": s, "hard": h} for kind, (s, h) in limits.items()]


# --- the spec -----------------------------------------------------------------------


def _namespaces(network_mode: str, pid_mode: str = "", ipc_mode: str = "",
                uts_mode: str = "") -> list[dict[str, str]]:
    for flag, mode in (("--pid", pid_mode), ("--ipc", ipc_mode), ("--uts", uts_mode)):
        if mode not in ("", "host"):
            raise InvalidArgument(f"invalid {flag} mode {mode!r}: use host, or leave it private")
    shared = {"pid": pid_mode, "ipc": ipc_mode, "uts": uts_mode}
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup") if shared.get(t) != "host"]
    if network_mode == "none":
        namespaces.append({"type": "network"})
    elif network_mode.startswith("/"):
        namespaces.append({"type": "network", "path": network_mode})
    elif network_mode != "host":
        raise InvalidArgument(f"network mode {network_mode!r} is not supported: use none, host "
                              "or the path of a network namespace")
    return namespaces


def _check_options(opts: ContainerSpecOptions) -> None:
    if not opts.args:
        raise InvalidArgument("no command specified")
    if not opts.cwd.startswith("/"):
        raise InvalidArgument(f"the working directory {opts.cwd!r} is invalid, it needs to be an absolute path")
    if len(opts.hostname) > _MAX_HOSTNAME or "\0" in opts.hostname:
        raise InvalidArgument(f"invalid hostname {opts.hostname!r}: at most {_MAX_HOSTNAME} characters")
    for what, value in (("uid", opts.uid), ("gid", opts.gid), *(("gid", g) for g in opts.additional_gids)):
        if not 0 <= value <= 2**31 - 1:
            raise InvalidArgument(f"{what} {value} out of range 0-{2**31 - 1}")
    if opts.oom_score_adj is not None and not -1000 <= opts.oom_score_adj <= 1000:
        raise InvalidArgument(f"invalid --oom-score-adj {opts.oom_score_adj}: must be in -1000..1000")
    if opts.shm_size <= 0:
        raise InvalidArgument(f"invalid --shm-size {opts.shm_size}: must be positive")
    if opts.cgroups_path is not None and (not opts.cgroups_path.startswith("/")
                                          or ".." in opts.cgroups_path.split("/")):
        raise InvalidArgument(f"invalid cgroups path {opts.cgroups_path!r}: must be absolute without '..'")


def build_spec(opts: ContainerSpecOptions) -> dict[str, Any]:
    """The OCI runtime-spec ``config.json`` document for ``opts`` (see the module doc)."""
    _check_options(opts)
    caps = tweak_capabilities(opts.cap_add, opts.cap_drop, privileged=opts.privileged,
                              cap_last_cap=opts.cap_last_cap)
    root_user = opts.uid == 0
    user: dict[str, Any] = {"uid": opts.uid, "gid": opts.gid}
    if opts.additional_gids:
        user["additionalGids"] = list(opts.additional_gids)
    process: dict[str, Any] = {
        "terminal": opts.terminal,
        "user": user,
        "args": list(opts.args),
        "env": list(opts.env),
        "cwd": opts.cwd,
        "capabilities": {
            "bounding": list(caps),
            "effective": list(caps) if root_user else [],
            "permitted": list(caps) if root_user else [],
            "inheritable": [],
            "ambient": [],
        },
        "rlimits": rlimits(opts.ulimits),
        "noNewPrivileges": opts.no_new_privileges,
    }
    if opts.oom_score_adj is not None:
        process["oomScoreAdj"] = opts.oom_score_adj

    masked = [] if opts.privileged else list(DEFAULT_MASKED_PATHS if opts.masked_paths is None
                                             else opts.masked_paths)
    readonly = [] if opts.privileged else list(DEFAULT_READONLY_PATHS if opts.readonly_paths is None
                                               else opts.readonly_paths)
    linux: dict[str, Any] = {
        "namespaces": _namespaces(opts.network_mode, opts.pid_mode, opts.ipc_mode, opts.uts_mode),
        "resources": linux_resources(opts.resources, privileged=opts.privileged,
                                     swap_limit_supported=opts.swap_limit_supported),
        "maskedPaths": masked,
        "readonlyPaths": readonly,
    }
    if opts.cgroups_path is not None:
        linux["cgroupsPath"] = opts.cgroups_path
    if opts.seccomp is not None and not opts.privileged:
        linux["seccomp"] = opts.seccomp

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(opts.rootfs), "readonly": opts.readonly_rootfs},
        "mounts": _mounts(opts),
        "linux": linux,
    }
    if opts.hostname and opts.uts_mode != "host":  # the host's name is not ours to set
        spec["hostname"] = opts.hostname
    if opts.annotations:
        spec["annotations"] = dict(opts.annotations)
    return spec
