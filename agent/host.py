"""Facts about the host the agent runs on: kernel, cgroup mode, memory, OS name."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[str, str]:
    """Mount point → filesystem type, from mountinfo (later mounts win)."""
    out: dict[str, str] = {}
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        out[fields[4].replace("\\040", " ")] = right.split()[0]
    return out


def cgroup_mode(mount_table: dict[str, str] | None = None, root: str = "/sys/fs/cgroup") -> str:
    """``v2`` (unified), ``hybrid`` (v1 controllers plus a cgroup2 mount) or ``v1``."""
    table = mounts() if mount_table is None else mount_table
    if table.get(root) == "cgroup2":
        return "v2"
    if table.get(f"{root}/unified") == "cgroup2":
        return "hybrid"
    return "v1"


def os_name(os_release: Path = Path("/etc/os-release")) -> str:
    try:
        for line in os_release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def kernel_version() -> str:
    return os.uname().release


def hostname() -> str:
    return os.uname().nodename
