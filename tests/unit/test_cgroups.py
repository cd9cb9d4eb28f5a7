"""cgroup managers on fake trees: regular files and directories in tmp_path standing in
for cgroupfs, with a fake filesystem seam that behaves like the kernel where it matters
(interface files appear on mkdir, ENOSPC from an empty v1 cpuset, memsw >= limit,
subtree_control only for available controllers, SIGKILL held while v1-frozen).

One conformance suite runs against V1Manager (hybrid tree) and V2Manager; the
version-specific files are checked after it.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.errors import InvalidArgument
from agent.runtime.cgroups import (
    CgroupFS,
    CgroupManager,
    Resources,
    detect,
    format_cpuset,
    parse_cpuset,
    parse_mountinfo,
    shares_to_weight,
    validate_resources,
)
from agent.runtime.cgroups_v1 import V1Manager
from agent.runtime.cgroups_v2 import V2Manager

MiB = 1024 * 1024
UNLIMITED = "9223372036854771712"

# --- the fake kernel ----------------------------------------------------------

V1_FILES: dict[str, dict[str, str]] = {
    "cpu,cpuacct": {
        "cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n", "cpu.shares": "1024\n",
        "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
        "cpuacct.usage": "0\n", "cpuacct.usage_user": "0\n", "cpuacct.usage_sys": "0\n",
        "cpuacct.stat": "user 0\nsystem 0\n",
    },
    "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n"},
    "memory": {
        "memory.limit_in_bytes": UNLIMITED, "memory.memsw.limit_in_bytes": UNLIMITED,
        "memory.soft_limit_in_bytes": UNLIMITED, "memory.usage_in_bytes": "0\n",
        "memory.max_usage_in_bytes": "0\n", "memory.stat": "cache 0\nrss 0\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    },
    "devices": {"devices.list": "a *:* rwm\n"},
    "freezer": {"freezer.state": "THAWED\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "systemd": {},
    "unified": {"cgroup.kill": "", "cgroup.freeze": "0\n", "cgroup.events": "populated 0\nfrozen 0\n"},
}
V1_ROOT_ONLY = {"cpuset.cpus": "0-3\n", "cpuset.mems": "0\n", "cpuset.effective_cpus": "0-3\n",
                "cpuset.effective_mems": "0\n"}
V1_NOT_AT_ROOT = {"freezer.state", "cgroup.kill", "cgroup.freeze", "pids.max", "pids.current"}
V1_MOUNTS = [  # directory, fstype, super options
    ("cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"), ("cpuset", "cgroup", "rw,cpuset"),
    ("memory", "cgroup", "rw,memory"), ("devices", "cgroup", "rw,devices"),
    ("freezer", "cgroup", "rw,freezer"), ("pids", "cgroup", "rw,pids"),
    ("systemd", "cgroup", "rw,xattr,name=systemd"), ("unified", "cgroup2", "rw,nsdelegate"),
]
V2_CORE = {"cgroup.subtree_control": "", "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.freeze": "0\n",
           "cgroup.kill": "", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"}
V2_FILES: dict[str, dict[str, str]] = {
    "memory": {"memory.max": "max\n", "memory.low": "0\n", "memory.swap.max": "max\n", "memory.current": "0\n",
               "memory.peak": "0\n", "memory.stat": "anon 0\nfile 0\n",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"},
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
    "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "io": {"io.max": ""},
}


def _limit(text: str) -> int:
    value = int(text.strip())
    return int(UNLIMITED) if value == -1 else value


class FakeCgroupFS(CgroupFS):
    """Directories and files under tmp_path behaving like cgroupfs, plus fake processes."""

    def __init__(self, hierarchies: dict[Path, str]) -> None:
        self.hierarchies = hierarchies  # mountpoint -> key of V1_FILES, or "v2"
        self.alive: set[int] = set()
        self.signals: list[tuple[int, int]] = []
        self.held: set[int] = set()  # SIGKILLed while v1-frozen
        self.refuse: set[str] = set()  # controllers subtree_control refuses (EINVAL)
        self.fail_mkdir_in: Path | None = None
        self.omit: set[str] = set()  # interface files this "kernel" lacks
        self.writes: list[tuple[Path, str]] = []
        self._next_pid = 40000

    def spawn(self) -> int:
        self._next_pid += 1
        self.alive.add(self._next_pid)
        return self._next_pid

    def _hierarchy(self, path: Path) -> tuple[Path, str]:
        for mount, kind in self.hierarchies.items():
            if path == mount or mount in path.parents:
                return mount, kind
        raise AssertionError(f"{path} is in no fake hierarchy")

    def _procs_files(self) -> Iterable[Path]:
        for mount in self.hierarchies:
            yield from mount.rglob("cgroup.procs")

    def _die(self, pid: int) -> None:
        self.alive.discard(pid)
        for procs in self._procs_files():
            procs.write_text("".join(f"{p}\n" for p in procs.read_text().split() if int(p) != pid))

    def _frozen_v1(self, pid: int) -> bool:
        for mount, kind in self.hierarchies.items():
            if kind == "freezer":
                for procs in mount.rglob("cgroup.procs"):
                    if str(pid) in procs.read_text().split():
                        return (procs.parent / "freezer.state").read_text().strip() == "FROZEN"
        return False

    def mkdir(self, path: Path) -> None:
        if self.fail_mkdir_in is not None and self.fail_mkdir_in in path.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        os.mkdir(path)
        _, kind = self._hierarchy(path)
        files = {"cgroup.procs": ""}
        if kind == "v2":
            enabled = (path.parent / "cgroup.subtree_control").read_text().split()
            files |= V2_CORE | {"cgroup.controllers": " ".join(enabled)}
            for c in enabled:
                files |= V2_FILES.get(c, {})
        else:
            files |= V1_FILES[kind]
        for name, text in files.items():
            if name not in self.omit:
                (path / name).write_text(text)

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if any(p.is_dir() for p in path.iterdir()) or (path / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        for f in path.iterdir():
            f.unlink()
        os.rmdir(path)

    def write(self, path: Path, value: str) -> None:
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        self.writes.append((path, value))
        d, name = path.parent, path.name
        if name == "cgroup.procs":
            mount, kind = self._hierarchy(d)
            if kind == "cpuset" and not (d / "cpuset.cpus").read_text().strip():
                raise OSError(errno.ENOSPC, "No space left on device")
            for procs in mount.rglob("cgroup.procs"):
                procs.write_text("".join(f"{p}\n" for p in procs.read_text().split() if p != value))
            path.write_text(path.read_text() + f"{value}\n")
        elif name == "cgroup.subtree_control":
            have = (d / "cgroup.controllers").read_text().split()
            enabled = set(path.read_text().split())
            for token in value.split():
                if token[1:] not in have or token[1:] in self.refuse:
                    raise OSError(errno.EINVAL, "Invalid argument")
                (enabled.add if token[0] == "+" else enabled.discard)(token[1:])
            path.write_text(" ".join(sorted(enabled)))
        elif name == "cgroup.freeze":
            path.write_text(value)
            (d / "cgroup.events").write_text(f"populated 0\nfrozen {value.strip()}\n")
        elif name == "cgroup.kill":
            for procs in d.rglob("cgroup.procs"):
                for victim in procs.read_text().split():
                    self._sigkill(int(victim))
        elif name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            limit = _limit(value if name == "memory.limit_in_bytes" else (d / "memory.limit_in_bytes").read_text())
            memsw_file = d / "memory.memsw.limit_in_bytes"
            if memsw_file.exists():
                memsw = _limit(value if name != "memory.limit_in_bytes" else memsw_file.read_text())
                if memsw < limit:
                    raise OSError(errno.EINVAL, "Invalid argument")
            path.write_text(UNLIMITED if value.strip() == "-1" else value)
        else:
            path.write_text(value)
            if name == "freezer.state" and value == "THAWED":
                for thawed in [int(p) for p in (d / "cgroup.procs").read_text().split()]:
                    if thawed in self.held:
                        self.held.discard(thawed)
                        self._die(thawed)

    def kill(self, pid: int, sig: int) -> None:
        if pid not in self.alive:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        self.signals.append((pid, sig))
        if sig == signal.SIGKILL:
            self._sigkill(pid)

    def _sigkill(self, pid: int) -> None:
        if self._frozen_v1(pid):
            self.held.add(pid)  # a frozen v1 task dies once thawed
        else:
            self._die(pid)


# --- fake trees -----------------------------------------------------------------


def _escape(path: Path) -> str:
    return str(path).replace(" ", "\\040")


def v1_tree(tmp_path: Path, *, unified: bool = True, memsw: bool = True,
            skip: Iterable[str] = ()) -> tuple[V1Manager, FakeCgroupFS]:
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    lines = ["22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
             f"25 27 0:24 / {_escape(root)} rw,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755"]
    hierarchies: dict[Path, str] = {}
    for i, (name, fstype, opts) in enumerate(V1_MOUNTS):
        if name in skip or (name == "unified" and not unified):
            continue
        mount = root / name
        mount.mkdir()
        files = {"cgroup.procs": "1\n"} | {k: v for k, v in V1_FILES[name].items() if k not in V1_NOT_AT_ROOT}
        if name == "cpuset":
            files |= V1_ROOT_ONLY
        if name == "memory" and not memsw:
            del files["memory.memsw.limit_in_bytes"]
        if name == "unified":
            files |= {"cgroup.controllers": "", "cgroup.subtree_control": ""}
        for fname, text in files.items():
            (mount / fname).write_text(text)
        lines.append(f"{30 + i} 25 0:{40 + i} / {_escape(mount)} rw,nosuid,nodev,noexec,relatime shared:{9 + i}"
                     f" - {fstype} {fstype} {opts}")
        hierarchies[mount] = name
    if "cpu,cpuacct" in hierarchies.values():
        (root / "cpu").symlink_to("cpu,cpuacct")
        (root / "cpuacct").symlink_to("cpu,cpuacct")
    fs = FakeCgroupFS(hierarchies)
    if not memsw:
        fs.omit.add("memory.memsw.limit_in_bytes")  # swap accounting off
    return V1Manager(root, mountinfo="\n".join(lines) + "\n", fs=fs), fs


def v2_tree(tmp_path: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc",
            ) -> tuple[V2Manager, FakeCgroupFS]:
    root = tmp_path / "cgroup"
    root.mkdir()
    files = {"cgroup.controllers": controllers, "cgroup.subtree_control": "", "cgroup.procs": "1\n",
             "cpuset.cpus.effective": "0-3\n", "cpuset.mems.effective": "0\n", "cpu.stat": "usage_usec 5\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    fs = FakeCgroupFS({root: "v2"})
    return V2Manager(root, fs=fs), fs


@dataclass
class Tree:
    manager: V1Manager | V2Manager
    fs: FakeCgroupFS

    def dirs(self, path: str) -> list[Path]:
        rel = path.strip("/")
        if isinstance(self.manager, V1Manager):
            return [h.mountpoint / rel for h in self.manager.hierarchies]
        return [self.manager.root / rel]


@pytest.fixture(params=["v1", "v2"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> Tree:
    manager, fs = v1_tree(tmp_path) if request.param == "v1" else v2_tree(tmp_path)
    return Tree(manager, fs)


# --- conformance: the same behaviour from both managers -------------------------


def test_is_a_cgroup_manager(tree: Tree) -> None:
    assert isinstance(tree.manager, CgroupManager)
    assert tree.manager.mode in ("hybrid", "v2")
    assert {"memory", "cpu", "cpuset", "pids"} <= tree.manager.controllers


def test_create_makes_the_path_everywhere_and_is_idempotent(tree: Tree) -> None:
    tree.manager.create("/skiff/abc")
    tree.manager.create("/skiff/abc")
    assert all(d.is_dir() for d in tree.dirs("/skiff/abc"))
    assert tree.manager.exists("/skiff/abc")
    assert not tree.manager.exists("/skiff/other")


@pytest.mark.parametrize("bad", ["", "/", "/skiff/../etc", "skiff//./x", "/a b", "/x\n"])
def test_bad_paths_are_refused(tree: Tree, bad: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid cgroup path"):
        tree.manager.create(bad)


def test_add_process_and_pids_include_descendants(tree: Tree) -> None:
    tree.manager.create("/skiff/c")
    tree.manager.create("/skiff/c/inner")
    a, b = tree.fs.spawn(), tree.fs.spawn()
    tree.manager.add_process("/skiff/c", a)
    tree.manager.add_process("/skiff/c/inner", b)
    assert tree.manager.pids("/skiff/c") == [a, b]
    assert tree.manager.pids("/skiff/c/inner") == [b]
    for d in tree.dirs("/skiff/c"):
        assert (d / "cgroup.procs").read_text().split() == [str(a)]


def test_freeze_and_thaw(tree: Tree) -> None:
    tree.manager.create("/skiff/c")
    assert tree.manager.can_freeze("/skiff/c")
    assert not tree.manager.frozen("/skiff/c")
    tree.manager.freeze("/skiff/c")
    assert tree.manager.frozen("/skiff/c")
    tree.manager.thaw("/skiff/c")
    assert not tree.manager.frozen("/skiff/c")


def test_kill_all_sends_the_signal_to_every_process(tree: Tree) -> None:
    tree.manager.create("/skiff/c/inner")
    pids = [tree.fs.spawn(), tree.fs.spawn()]
    tree.manager.add_process("/skiff/c", pids[0])
    tree.manager.add_process("/skiff/c/inner", pids[1])
    tree.manager.kill_all("/skiff/c", signal.SIGTERM)
    assert sorted(p for p, s in tree.fs.signals if s == signal.SIGTERM) == pids
    assert not tree.manager.frozen("/skiff/c")  # frozen only while signalling
    tree.manager.kill_all("/skiff/c")
    assert tree.manager.pids("/skiff/c") == []
    assert tree.fs.alive.isdisjoint(pids)


def test_kill_all_of_a_paused_cgroup_kills_and_thaws(tree: Tree) -> None:
    tree.manager.create("/skiff/c")
    pid = tree.fs.spawn()
    tree.manager.add_process("/skiff/c", pid)
    tree.manager.freeze("/skiff/c")
    tree.manager.kill_all("/skiff/c", signal.SIGKILL)
    assert pid not in tree.fs.alive
    assert not tree.manager.frozen("/skiff/c")


def test_destroy_kills_inside_a_frozen_child_cgroup(tree: Tree) -> None:
    tree.manager.create("/skiff/c/inner")
    pid = tree.fs.spawn()
    tree.manager.add_process("/skiff/c/inner", pid)
    tree.manager.freeze("/skiff/c/inner")  # frozen on its own; thawing /skiff/c does not thaw it
    tree.manager.destroy("/skiff/c", kill=True, timeout=1)
    assert pid not in tree.fs.alive
    assert not any(d.exists() for d in tree.dirs("/skiff/c"))


def test_destroy_kills_and_removes_everywhere_and_tolerates_gone(tree: Tree) -> None:
    tree.manager.create("/skiff/c/inner")
    pid = tree.fs.spawn()
    tree.manager.add_process("/skiff/c/inner", pid)
    tree.manager.destroy("/skiff/c", kill=True, timeout=1)
    assert pid not in tree.fs.alive
    assert not any(d.exists() for d in tree.dirs("/skiff/c"))
    assert all(d.is_dir() for d in tree.dirs("/skiff"))  # the parent stays
    tree.manager.destroy("/skiff/c")  # already gone: fine
    assert not tree.manager.exists("/skiff/c")


def test_destroy_without_kill_waits_then_names_the_processes(tree: Tree) -> None:
    tree.manager.create("/skiff/c")
    pid = tree.fs.spawn()
    tree.manager.add_process("/skiff/c", pid)
    with pytest.raises(OSError, match=rf"/skiff/c still has processes \[{pid}\]") as info:
        tree.manager.destroy("/skiff/c", timeout=0.05)
    assert info.value.errno == errno.EBUSY
    assert pid in tree.fs.alive and tree.manager.exists("/skiff/c")


def test_apply_to_a_missing_cgroup_names_the_file(tree: Tree) -> None:
    with pytest.raises(OSError, match="nope") as info:
        tree.manager.apply("/skiff/nope", Resources(pids_limit=10))
    assert info.value.errno == errno.ENOENT


def test_invalid_resources_are_refused_before_any_write(tree: Tree) -> None:
    tree.manager.create("/skiff/c")
    tree.fs.writes.clear()
    with pytest.raises(InvalidArgument, match="Minimum memory limit allowed is 6MB"):
        tree.manager.apply("/skiff/c", Resources(memory=4 * MiB, pids_limit=10))
    with pytest.raises(InvalidArgument, match="Requested CPUs are not available - requested 0-7, available: 0-3"):
        tree.manager.apply("/skiff/c", Resources(cpuset_cpus="0-7"))
    with pytest.raises(InvalidArgument, match="Range of CPUs is from 0.01 to 4.00, as there are only 4 CPUs"):
        tree.manager.apply("/skiff/c", Resources(cpus=4.5))
    assert tree.fs.writes == []


def test_add_process_after_apply_with_cpuset(tree: Tree) -> None:
    tree.manager.create("/skiff/c")
    tree.manager.apply("/skiff/c", Resources(cpuset_cpus="1", cpuset_mems="0"))
    tree.manager.add_process("/skiff/c", tree.fs.spawn())  # no ENOSPC


# --- v1 / hybrid ------------------------------------------------------------------


def test_v1_apply_writes_the_v1_files(tmp_path: Path) -> None:
    m, _fs = v1_tree(tmp_path)
    m.create("/skiff/c")
    m.apply("/skiff/c", Resources(memory=32 * MiB, memory_reservation=16 * MiB, memory_swap=64 * MiB, cpus=0.5,
                                  cpu_shares=512, cpuset_cpus="0-1,3", cpuset_mems="0", pids_limit=20))
    root = m.root

    def read(rel: str) -> str:
        return (root / rel).read_text().strip()

    assert read("memory/skiff/c/memory.limit_in_bytes") == str(32 * MiB)
    assert read("memory/skiff/c/memory.memsw.limit_in_bytes") == str(64 * MiB)
    assert read("memory/skiff/c/memory.soft_limit_in_bytes") == str(16 * MiB)
    assert read("cpu/skiff/c/cpu.cfs_period_us") == "100000"
    assert read("cpu/skiff/c/cpu.cfs_quota_us") == "50000"
    assert read("cpu,cpuacct/skiff/c/cpu.shares") == "512"
    assert read("cpuset/skiff/c/cpuset.cpus") == "0-1,3"
    assert read("cpuset/skiff/c/cpuset.mems") == "0"
    assert read("pids/skiff/c/pids.max") == "20"
    m.apply("/skiff/c", Resources(pids_limit=-1, memory=-1, cpu_shares=1))
    assert read("pids/skiff/c/pids.max") == "max"
    assert read("memory/skiff/c/memory.limit_in_bytes") == UNLIMITED
    assert read("memory/skiff/c/memory.memsw.limit_in_bytes") == UNLIMITED
    assert read("cpu/skiff/c/cpu.shares") == "2"  # clamped to the kernel's minimum


def test_v1_memory_and_memsw_are_written_in_an_order_the_kernel_accepts(tmp_path: Path) -> None:
    m, _fs = v1_tree(tmp_path)
    m.create("/skiff/c")
    limit = m.root / "memory/skiff/c/memory.limit_in_bytes"
    memsw = m.root / "memory/skiff/c/memory.memsw.limit_in_bytes"
    for memory, swap in [(64 * MiB, 128 * MiB), (256 * MiB, 512 * MiB), (32 * MiB, 32 * MiB), (-1, -1),
                         (16 * MiB, 16 * MiB)]:
        m.apply("/skiff/c", Resources(memory=memory, memory_swap=swap))
        assert (limit.read_text(), memsw.read_text()) == (
            str(memory) if memory > 0 else UNLIMITED, str(swap) if swap > 0 else UNLIMITED)


def test_v1_without_swap_accounting_ignores_memory_swap(tmp_path: Path) -> None:
    m, _fs = v1_tree(tmp_path, memsw=False)
    m.create("/skiff/c")
    m.apply("/skiff/c", Resources(memory=32 * MiB, memory_swap=64 * MiB))
    assert (m.root / "memory/skiff/c/memory.limit_in_bytes").read_text() == str(32 * MiB)
    assert not (m.root / "memory/skiff/c/memory.memsw.limit_in_bytes").exists()


def test_v1_cpuset_is_copied_into_new_and_empty_parents(tmp_path: Path) -> None:
    m, fs = v1_tree(tmp_path)
    cpuset = m.root / "cpuset"
    fs.mkdir(cpuset / "skiff")  # an existing, still empty, parent
    m.create("/skiff/pod/c")
    for rel in ("skiff", "skiff/pod", "skiff/pod/c"):
        assert (cpuset / rel / "cpuset.cpus").read_text() == "0-3", rel
        assert (cpuset / rel / "cpuset.mems").read_text() == "0", rel
    m.add_process("/skiff/pod/c", fs.spawn())  # would be ENOSPC with an empty cpuset


def test_v1_hierarchies_mode_and_comounted_controllers(tmp_path: Path) -> None:
    m, _fs = v1_tree(tmp_path)
    assert m.mode == "hybrid" and m.unified == m.root / "unified"
    assert m.controllers == {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "pids"}
    m.create("/skiff/c")
    made = sorted(p.relative_to(m.root).as_posix() for p in m.root.glob("*/skiff/c") if not p.parent.parent.is_symlink())
    assert made == sorted(f"{name}/skiff/c" for name, _, _ in V1_MOUNTS)  # incl. name=systemd, unified; once each
    plain, _ = v1_tree(tmp_path / "plain", unified=False)
    assert plain.mode == "v1"


def test_v1_create_failure_removes_what_it_made(tmp_path: Path) -> None:
    m, fs = v1_tree(tmp_path)
    fs.fail_mkdir_in = m.root / "freezer"
    with pytest.raises(PermissionError):
        m.create("/skiff/c")
    assert list(m.root.glob("*/skiff")) == []


def test_v1_missing_controller_names_the_flag(tmp_path: Path) -> None:
    m, _fs = v1_tree(tmp_path, skip=["pids"])
    m.create("/skiff/c")
    with pytest.raises(InvalidArgument, match="--pids-limit needs the pids cgroup controller"):
        m.apply("/skiff/c", Resources(pids_limit=10))
    m.apply("/skiff/c", Resources(memory=32 * MiB))


def test_v1_kill_all_uses_unified_cgroup_kill(tmp_path: Path) -> None:
    m, fs = v1_tree(tmp_path)
    m.create("/skiff/c")
    pid = fs.spawn()
    m.add_process("/skiff/c", pid)
    m.kill_all("/skiff/c")
    assert pid not in fs.alive and fs.signals == []  # one write to cgroup.kill, no kill(2)


def test_v1_kill_all_without_unified_freezes_signals_thaws(tmp_path: Path) -> None:
    m, fs = v1_tree(tmp_path, unified=False)
    m.create("/skiff/c")
    pid = fs.spawn()
    m.add_process("/skiff/c", pid)
    m.kill_all("/skiff/c")
    assert fs.signals == [(pid, signal.SIGKILL)] and pid not in fs.alive
    states = [v for p, v in fs.writes if p.name == "freezer.state"]
    assert states[0] == "FROZEN" and states[-1] == "THAWED"


def test_v1_stats(tmp_path: Path) -> None:
    m, _fs = v1_tree(tmp_path)
    m.create("/skiff/c")
    m.apply("/skiff/c", Resources(memory=32 * MiB, pids_limit=20))
    leaf = {h: m.root / h / "skiff/c" for h in ("memory", "pids", "cpu,cpuacct")}
    (leaf["memory"] / "memory.usage_in_bytes").write_text("33439744\n")
    (leaf["memory"] / "memory.max_usage_in_bytes").write_text("33554432\n")
    (leaf["memory"] / "memory.stat").write_text("cache 4096\nrss 33000000\ntotal_inactive_file 4096\n")
    (leaf["memory"] / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (leaf["pids"] / "pids.current").write_text("3\n")
    (leaf["cpu,cpuacct"] / "cpuacct.usage").write_text("123456789\n")
    (leaf["cpu,cpuacct"] / "cpuacct.usage_user").write_text("100000000\n")
    (leaf["cpu,cpuacct"] / "cpuacct.usage_sys").write_text("23456789\n")
    (leaf["cpu,cpuacct"] / "cpu.stat").write_text("nr_periods 10\nnr_throttled 4\nthrottled_time 5000\n")
    s = m.stats("/skiff/c")
    assert (s.memory_usage, s.memory_max_usage, s.memory_limit) == (33439744, 33554432, 32 * MiB)
    assert s.memory_stat["total_inactive_file"] == 4096
    assert s.oom_kills == 1 and s.oom_killed
    assert (s.pids_current, s.pids_limit) == (3, 20)
    assert (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns) == (123456789, 100000000, 23456789)
    assert (s.cpu_throttled_periods, s.cpu_throttled_ns) == (4, 5000)


def test_v1_stats_on_old_kernels(tmp_path: Path) -> None:
    m, _fs = v1_tree(tmp_path)
    m.create("/skiff/c")
    acct = m.root / "cpu,cpuacct/skiff/c"
    (m.root / "memory/skiff/c/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")  # < 4.13
    (acct / "cpuacct.usage_user").unlink()
    (acct / "cpuacct.usage_sys").unlink()
    (acct / "cpuacct.stat").write_text("user 30\nsystem 7\n")
    s = m.stats("/skiff/c")
    assert s.oom_kills is None and not s.oom_killed
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert (s.cpu_user_ns, s.cpu_system_ns) == (30 * tick, 7 * tick)
    assert (s.memory_limit, s.pids_limit) == (None, None)


# --- v2 -----------------------------------------------------------------------------


def test_v2_enables_controllers_on_ancestors_only(tmp_path: Path) -> None:
    m, fs = v2_tree(tmp_path)
    (m.root / "cgroup.subtree_control").write_text("memory")
    m.create("/skiff/pod/c")
    want = "cpu cpuset io memory pids"
    for rel in (".", "skiff", "skiff/pod"):
        assert (m.root / rel / "cgroup.subtree_control").read_text() == want, rel
    assert (m.root / "skiff/pod/c/cgroup.subtree_control").read_text() == ""  # the leaf holds processes
    assert sorted((m.root / "skiff/pod/c/cgroup.controllers").read_text().split()) == want.split()
    root_writes = [v for p, v in fs.writes if p == m.root / "cgroup.subtree_control"]
    assert root_writes == ["+cpuset +cpu +io +pids"]  # memory was already on


def test_v2_enables_what_it_can_when_one_controller_is_refused(tmp_path: Path) -> None:
    m, fs = v2_tree(tmp_path)
    fs.refuse = {"io"}
    m.create("/skiff/c")
    assert (m.root / "skiff/cgroup.controllers").read_text().split() == ["cpu", "cpuset", "memory", "pids"]


def test_v2_apply_writes_the_v2_files(tmp_path: Path) -> None:
    m, _fs = v2_tree(tmp_path)
    m.create("/skiff/c")
    m.apply("/skiff/c", Resources(memory=32 * MiB, memory_reservation=16 * MiB, memory_swap=64 * MiB, cpus=1.5,
                                  cpu_shares=1024, cpuset_cpus="0,2", cpuset_mems="0", pids_limit=20))
    leaf = m.root / "skiff/c"

    def read(name: str) -> str:
        return (leaf / name).read_text()

    assert read("memory.max") == str(32 * MiB)
    assert read("memory.low") == str(16 * MiB)
    assert read("memory.swap.max") == str(32 * MiB)  # swap only, not memory+swap
    assert read("cpu.max") == "150000 100000"
    assert read("cpu.weight") == "39"
    assert (read("cpuset.cpus"), read("cpuset.mems")) == ("0,2", "0")
    assert read("pids.max") == "20"
    m.apply("/skiff/c", Resources(memory=-1, pids_limit=-1))
    assert (read("memory.max"), read("memory.swap.max"), read("pids.max")) == ("max", "max", "max")


def test_v2_missing_controller_names_the_flag(tmp_path: Path) -> None:
    m, _fs = v2_tree(tmp_path, controllers="cpu memory")
    m.create("/skiff/c")
    assert m.controllers == {"cpu", "memory"}
    with pytest.raises(InvalidArgument, match="--pids-limit needs the pids cgroup controller"):
        m.apply("/skiff/c", Resources(pids_limit=10))
    m.apply("/skiff/c", Resources(memory=32 * MiB, cpus=1))


def test_v2_kill_all_uses_cgroup_kill(tmp_path: Path) -> None:
    m, fs = v2_tree(tmp_path)
    m.create("/skiff/c")
    pid = fs.spawn()
    m.add_process("/skiff/c", pid)
    m.kill_all("/skiff/c")
    assert pid not in fs.alive and fs.signals == []


def test_v2_stats(tmp_path: Path) -> None:
    m, _fs = v2_tree(tmp_path)
    m.create("/skiff/c")
    leaf = m.root / "skiff/c"
    (leaf / "memory.current").write_text("33439744\n")
    (leaf / "memory.peak").write_text("33554432\n")
    (leaf / "memory.max").write_text("33554432\n")
    (leaf / "memory.stat").write_text("anon 33000000\nfile 8192\ninactive_file 4096\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 120\noom 2\noom_kill 2\noom_group_kill 0\n")
    (leaf / "pids.current").write_text("4\n")
    (leaf / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 9\n"
                                   "nr_throttled 3\nthrottled_usec 250\n")
    s = m.stats("/skiff/c")
    assert (s.memory_usage, s.memory_max_usage, s.memory_limit) == (33439744, 33554432, 33554432)
    assert s.memory_stat == {"anon": 33000000, "file": 8192, "inactive_file": 4096}
    assert s.oom_kills == 2 and s.oom_killed
    assert (s.pids_current, s.pids_limit) == (4, None)
    assert (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns) == (1_500_000, 1_000_000, 500_000)
    assert (s.cpu_throttled_periods, s.cpu_throttled_ns) == (3, 250_000)
    (leaf / "memory.peak").unlink()  # before Linux 5.19
    (leaf / "memory.events").write_text("oom_kill 0\n")
    s = m.stats("/skiff/c")
    assert s.memory_max_usage is None and s.oom_kills == 0 and not s.oom_killed


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(("resources", "message"), [
    (Resources(memory=6 * MiB - 1), "Minimum memory limit allowed is 6MB"),
    (Resources(memory=0), "Minimum memory limit allowed is 6MB"),
    (Resources(memory_reservation=MiB), "Minimum memory reservation allowed is 6MB"),
    (Resources(memory=16 * MiB, memory_reservation=32 * MiB),
     "Minimum memory limit can not be less than memory reservation limit, see usage"),
    (Resources(memory_swap=64 * MiB), "You should always set the Memory limit when using Memoryswap limit"),
    (Resources(memory=64 * MiB, memory_swap=32 * MiB), "Minimum memoryswap limit should be larger than memory limit"),
    (Resources(cpus=0), r"Range of CPUs is from 0.01 to 4.00, as there are only 4 CPUs available"),
    (Resources(cpus=-1.0), r"Range of CPUs is from 0.01 to 4.00"),
    (Resources(cpus=4.01), r"Range of CPUs is from 0.01 to 4.00"),
    (Resources(cpus=float("nan")), r"Range of CPUs is from 0.01 to 4.00"),
    (Resources(cpu_shares=-5), r"invalid CPU shares \(-5\): value must be a positive integer"),
    (Resources(cpuset_cpus="0-"), "Invalid value 0- for cpuset cpus"),
    (Resources(cpuset_cpus="a"), "Invalid value a for cpuset cpus"),
    (Resources(cpuset_cpus="3-1"), "Invalid value 3-1 for cpuset cpus"),
    (Resources(cpuset_cpus=""), "Invalid value  for cpuset cpus"),
    (Resources(cpuset_cpus="0,4"), "Requested CPUs are not available - requested 0,4, available: 0-3"),
    (Resources(cpuset_mems="0-x"), "Invalid value 0-x for cpuset mems"),
    (Resources(cpuset_mems="1"), "Requested memory nodes are not available - requested 1, available: 0"),
    (Resources(pids_limit=0), r"invalid pids limit 0: must be -1 \(unlimited\) or at least 1"),
    (Resources(pids_limit=-2), "invalid pids limit -2"),
])
def test_validation_messages(resources: Resources, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_resources(resources, cpus_available="0-3", mems_available="0")


@pytest.mark.parametrize("resources", [
    Resources(),
    Resources(memory=6 * MiB, memory_reservation=6 * MiB, memory_swap=6 * MiB),
    Resources(memory=-1, memory_swap=-1, pids_limit=-1),
    Resources(memory=64 * MiB, memory_swap=-1),
    Resources(cpus=0.01, cpu_shares=1), Resources(cpus=4.0),
    Resources(cpuset_cpus="0-1,3", cpuset_mems="0"),
    Resources(pids_limit=1),
])
def test_validation_accepts(resources: Resources) -> None:
    validate_resources(resources, cpus_available="0-3", mems_available="0")


def test_cpuset_lists_and_weights() -> None:
    assert parse_cpuset("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert format_cpuset({8, 0, 1, 2, 5, 7}) == "0-2,5,7-8"
    assert format_cpuset([3]) == "3"
    assert (shares_to_weight(2), shares_to_weight(1024), shares_to_weight(262144)) == (1, 39, 10000)
    assert Resources(memory=MiB * 32, pids_limit=5).controllers() == {"memory", "pids"}


# --- detect -----------------------------------------------------------------------------

V1_ONLY = """\
18 60 0:17 / /sys rw,nosuid,nodev,noexec,relatime shared:6 - sysfs sysfs rw
24 18 0:20 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:7 - tmpfs tmpfs ro,mode=755
25 24 0:21 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup rw,xattr,\
release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
28 24 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
29 24 0:25 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup \
rw,net_cls,net_prio
30 24 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
31 24 0:27 / /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpuset
32 24 0:28 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,pids
33 24 0:29 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,freezer
90 80 0:26 / /var/lib/docker/memory rw,relatime - cgroup cgroup rw,memory
91 24 0:26 / /sys/fs/cgroup/memory2 rw,relatime - cgroup cgroup rw,memory
"""

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

V2_ONLY = """\
22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
26 23 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,\
memory_recursiveprot
"""


def test_detect_v1_only() -> None:
    m = detect(mountinfo=V1_ONLY)
    assert isinstance(m, V1Manager) and m.mode == "v1"
    assert m.controllers == {"cpu", "cpuacct", "net_cls", "net_prio", "memory", "cpuset", "pids", "freezer"}
    mounts = [str(h.mountpoint) for h in m.hierarchies]
    assert mounts.count("/sys/fs/cgroup/cpu,cpuacct") == 1
    assert "/sys/fs/cgroup/systemd" in mounts  # named hierarchy kept
    assert "/var/lib/docker/memory" not in mounts and "/sys/fs/cgroup/memory2" not in mounts  # elsewhere; repeat


def test_detect_hybrid() -> None:
    m = detect(mountinfo=HYBRID)
    assert isinstance(m, V1Manager) and m.mode == "hybrid"
    assert m.unified == Path("/sys/fs/cgroup/unified")
    assert len(m.hierarchies) == 10


def test_detect_v2() -> None:
    m = detect(mountinfo=V2_ONLY)
    assert isinstance(m, V2Manager) and m.mode == "v2" and m.root == Path("/sys/fs/cgroup")


def test_detect_nothing_mounted() -> None:
    with pytest.raises(OSError, match="no cgroup filesystem is mounted"):
        detect(mountinfo="22 27 0:21 / /proc rw - proc proc rw\n")


def test_detect_with_an_injected_root() -> None:
    text = HYBRID.replace("/sys/fs/cgroup", "/tmp/x\\040y")
    m = detect("/tmp/x y", mountinfo=text)
    assert isinstance(m, V1Manager) and m.mode == "hybrid"
    assert Path("/tmp/x y/memory") in [h.mountpoint for h in parse_mountinfo(text, "/tmp/x y")]
