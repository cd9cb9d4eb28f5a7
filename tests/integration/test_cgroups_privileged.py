"""Real cgroups on this host, through the manager :func:`detect` picks.

Requires root and the cpu, cpuset, memory and pids controllers (the freezer for
the freeze test); each test skips with the reason otherwise.  Everything lives
under one parent cgroup named ``skiff-test-<random>``; the fixture kills every
child and removes that parent from every hierarchy even when a test fails, first
through the manager and then by hand, and fails if anything is left.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.runtime.cgroups import CgroupManager, Resources, detect
from agent.runtime.cgroups_v1 import V1Manager
from agent.runtime.cgroups_v2 import V2Manager

MiB = 1024 * 1024
NEEDED = {"cpu", "cpuset", "memory", "pids"}
# Children wait for a line on stdin, so they start counting only once inside the cgroup.
GATE = "import sys\nsys.stdin.readline()\n"

pytestmark = pytest.mark.timeout(60)


def _cgroup_mounts() -> list[Path]:
    """Every cgroup/cgroup2 mount under /sys/fs/cgroup, read without the code under test."""
    seen: set[str] = set()
    out: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if right.split()[:1] in (["cgroup"], ["cgroup2"]) and fields[4].startswith("/sys/fs/cgroup") \
                    and fields[2] not in seen:
                seen.add(fields[2])
                out.append(Path(fields[4]))
    return out


def _raw_cleanup(parent: str) -> list[str]:
    """Thaw and SIGKILL everything under ``parent`` in every hierarchy, then rmdir it
    everywhere, by hand; returns what could not be removed."""
    trees: list[list[Path]] = []
    for mount in _cgroup_mounts():
        top = mount / parent.strip("/")
        if top.is_dir():
            trees.append(sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top])
    for dirs in trees:  # all hierarchies first: a v1-frozen task dies only once thawed
        for d in reversed(dirs):
            for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
                try:
                    (d / name).write_text(value)
                except OSError:
                    pass
            for pid in (d / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    left: list[str] = []
    for dirs in trees:
        for d in dirs:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
            else:
                left.append(str(d))
    return left


@dataclass
class Lab:
    mgr: V1Manager | V2Manager
    parent: str
    children: list[subprocess.Popen[str]] = field(default_factory=list)

    def cgroup(self, name: str, resources: Resources | None = None) -> str:
        path = f"{self.parent}/{name}"
        self.mgr.create(path)
        if resources is not None:
            self.mgr.apply(path, resources)
        return path

    def spawn(self, path: str, code: str, *args: str) -> subprocess.Popen[str]:
        """A Python child moved into ``path`` before it runs ``code``."""
        child = subprocess.Popen([sys.executable, "-c", GATE + code, *args], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        self.children.append(child)
        self.mgr.add_process(path, child.pid)
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        return child

    def dirs(self, path: str) -> list[Path]:
        rel = path.strip("/")
        if isinstance(self.mgr, V1Manager):
            return [h.mountpoint / rel for h in self.mgr.hierarchies]
        return [self.mgr.root / rel]

    def file(self, path: str, controller: str, name: str) -> Path:
        rel = path.strip("/")
        if isinstance(self.mgr, V1Manager):
            mount = next(h.mountpoint for h in self.mgr.hierarchies if controller in h.controllers)
            return mount / rel / name
        return self.mgr.root / rel / name


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("requires root")
    try:
        mgr = detect()
    except OSError as exc:
        pytest.skip(f"requires mounted cgroups: {exc}")
    missing = NEEDED - mgr.controllers
    if missing:
        pytest.skip(f"requires cgroup controllers {sorted(missing)} (host has {sorted(mgr.controllers)})")
    lab = Lab(mgr, f"/skiff-test-{secrets.token_hex(4)}")
    try:
        mgr.create(lab.parent)
        yield lab
    finally:
        for child in lab.children:
            if child.poll() is None:
                child.kill()
        try:
            mgr.destroy(lab.parent, kill=True, timeout=5)
        finally:
            left = _raw_cleanup(lab.parent)
            for child in lab.children:
                child.wait(5)
                for stream in (child.stdin, child.stdout):
                    if stream is not None:
                        stream.close()
        assert left == [], f"cgroups left behind: {left}"


def test_detect_matches_the_host(lab: Lab) -> None:
    assert isinstance(lab.mgr, CgroupManager)
    mounts = {str(m) for m in _cgroup_mounts()}
    if "/sys/fs/cgroup" in mounts:
        assert lab.mgr.mode == "v2"
    else:
        assert lab.mgr.mode == ("hybrid" if "/sys/fs/cgroup/unified" in mounts else "v1")
    assert all(d.is_dir() for d in lab.dirs(lab.parent))


def test_limits_are_written_and_enforced(lab: Lab) -> None:
    path = lab.cgroup("limits", Resources(memory=32 * MiB, pids_limit=20, cpus=0.5, cpuset_cpus="0"))
    spin = "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\nprint(time.process_time())\n"
    child = lab.spawn(path, spin)

    if isinstance(lab.mgr, V1Manager):
        assert lab.file(path, "memory", "memory.limit_in_bytes").read_text().strip() == str(32 * MiB)
        assert lab.file(path, "cpu", "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert lab.file(path, "cpu", "cpu.cfs_period_us").read_text().strip() == "100000"
    else:
        assert lab.file(path, "memory", "memory.max").read_text().strip() == str(32 * MiB)
        assert lab.file(path, "cpu", "cpu.max").read_text().strip() == "50000 100000"
    assert lab.file(path, "pids", "pids.max").read_text().strip() == "20"
    assert lab.file(path, "cpuset", "cpuset.cpus").read_text().strip() == "0"

    status = Path(f"/proc/{child.pid}/status").read_text()
    assert "Cpus_allowed_list:\t0\n" in status
    # One path in every hierarchy (name=systemd and the unified one on hybrid hosts too).
    lines = Path(f"/proc/{child.pid}/cgroup").read_text().splitlines()
    managed = len(lab.dirs(path))
    assert sum(line.split(":", 2)[2] == path for line in lines) == managed, lines
    assert lab.mgr.pids(path) == [child.pid]

    out, _ = child.communicate(timeout=10)
    cpu_seconds = float(out)
    # The quota is a ceiling; a busy CI host may give less, never more.
    assert 0.05 < cpu_seconds < 0.7, f"half a CPU for 1 s gave {cpu_seconds:.2f} s of CPU"
    stats = lab.mgr.stats(path)
    assert 0.05e9 < stats.cpu_usage_ns < 0.75e9
    if cpu_seconds > 0.4:
        assert stats.cpu_throttled_periods > 0
    assert stats.memory_limit == 32 * MiB and stats.pids_limit == 20


def test_memory_hog_is_oom_killed_and_reported(lab: Lab) -> None:
    path = lab.cgroup("oom", Resources(memory=32 * MiB, memory_swap=32 * MiB))
    hog = "chunks = []\nfor _ in range(100):\n    chunks.append(b'x' * (1 << 20))\nprint('survived')\n"
    child = lab.spawn(path, hog)
    out, _ = child.communicate(timeout=15)
    assert child.returncode == -signal.SIGKILL, f"hog exited {child.returncode}: {out!r}"
    stats = lab.mgr.stats(path)
    if stats.oom_kills is None:
        pytest.skip("requires a kernel that counts oom_kill (v1: Linux 4.13+)")
    assert stats.oom_killed and stats.oom_kills >= 1
    assert stats.memory_max_usage is None or stats.memory_max_usage > 24 * MiB


def test_pids_limit_stops_a_fork_bomb(lab: Lab) -> None:
    path = lab.cgroup("forks", Resources(pids_limit=20))
    bomb = (
        "import errno, subprocess\n"
        "procs, failed = [], 0\n"
        "for _ in range(50):\n"
        "    try:\n"
        "        procs.append(subprocess.Popen(['sleep', '30']))\n"
        "    except OSError as exc:\n"
        "        assert exc.errno == errno.EAGAIN, exc\n"
        "        failed += 1\n"
        "print(len(procs), failed, flush=True)\n"
        "sys.stdin.readline()\n"
        "for p in procs:\n"
        "    p.kill()\n"
        "    p.wait()\n"
    )
    child = lab.spawn(path, bomb)
    assert child.stdout is not None and child.stdin is not None
    started, failed = map(int, child.stdout.readline().split())
    assert started + failed == 50
    assert 0 < started <= 19 and failed >= 31  # the Python process itself is one of the 20
    stats = lab.mgr.stats(path)
    assert stats.pids_current == len(lab.mgr.pids(path)) == started + 1 <= 20
    child.stdin.write("done\n")
    child.stdin.flush()
    child.wait(10)
    assert child.returncode == 0


def test_freeze_and_thaw(lab: Lab, tmp_path: Path) -> None:
    path = lab.cgroup("freeze")
    if not lab.mgr.can_freeze(path):
        pytest.skip("requires the freezer (v1 freezer hierarchy or cgroup.freeze)")
    counter = tmp_path / "counter"
    tick = ("import os, time\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\ni = 0\n"
            "while True:\n    i += 1\n    os.pwrite(fd, b'%12d' % i, 0)\n    time.sleep(0.01)\n")
    child = lab.spawn(path, tick, str(counter))

    def count() -> int:
        text = counter.read_text() if counter.exists() else ""
        return int(text) if text.strip() else 0

    deadline = time.monotonic() + 5
    while count() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count() >= 3, "the ticking child never started"

    lab.mgr.freeze(path)
    assert lab.mgr.frozen(path)
    if isinstance(lab.mgr, V1Manager) and "freezer" in lab.mgr.controllers:
        assert lab.file(path, "freezer", "freezer.state").read_text().strip() == "FROZEN"
    frozen_at = count()
    time.sleep(0.3)
    assert count() == frozen_at, "a frozen child kept running"
    assert child.poll() is None

    lab.mgr.thaw(path)
    assert not lab.mgr.frozen(path)
    time.sleep(0.3)
    assert count() > frozen_at, "a thawed child did not resume"


def test_destroy_kills_a_paused_container_and_removes_every_hierarchy(lab: Lab) -> None:
    path = lab.cgroup("destroy")
    inner = lab.cgroup("destroy/inner")
    outer_child = lab.spawn(path, "import time\ntime.sleep(60)\n")
    inner_child = lab.spawn(inner, "import time\ntime.sleep(60)\n")
    assert lab.mgr.pids(path) == sorted([outer_child.pid, inner_child.pid])
    if lab.mgr.can_freeze(path):
        lab.mgr.freeze(path)  # a paused container: v1 holds SIGKILL until thawed

    started = time.monotonic()
    lab.mgr.destroy(path, kill=True, timeout=5)
    assert time.monotonic() - started < 3
    assert outer_child.wait(5) == -signal.SIGKILL
    assert inner_child.wait(5) == -signal.SIGKILL
    gone = lab.dirs(path)
    assert len(gone) >= 1 and not any(d.exists() for d in gone), [str(d) for d in gone if d.exists()]
    assert all(d.is_dir() for d in lab.dirs(lab.parent))  # only what was asked
    assert not lab.mgr.exists(path)
    lab.mgr.destroy(path)  # already gone: fine
