"""The built-in executor's logic without root: path resolution, plans, mounts recorded by RecordingSyscalls."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from agent.runtime import syscalls as sc
from agent.runtime.cgroups import Resources
from agent.runtime.executor import BuiltinExecutor, ContainerStartError, read_messages
from agent.runtime.init import (
    Container,
    StageError,
    cgroup_hierarchies,
    device_rule_lines,
    env_mapping,
    exit_code_for,
    lookup_executable,
    namespace_plan,
    resources_from_spec,
    secure_join,
    send,
)
from agent.runtime.spec import ContainerSpecOptions, build_spec
from agent.runtime.spec import Resources as SpecResources

# --- secure_join ----------------------------------------------------------------


def test_secure_join_keeps_symlinks_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/abs").symlink_to("/etc/passwd")          # absolute: restarts at the root
    (root / "etc/up").symlink_to("../../../../../etc")     # climbs: stops at the root
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert secure_join(r, "/etc/abs") == f"{r}/etc/passwd"
    assert secure_join(r, "/etc/up/shadow") == f"{r}/etc/shadow"
    assert secure_join(r, "/../../x/./y/") == f"{r}/x/y"
    assert secure_join(r, "/missing/deeper") == f"{r}/missing/deeper"
    with pytest.raises(OSError) as info:
        secure_join(r, "/loop")
    assert info.value.errno == errno.ELOOP


# --- command lookup and exit codes ----------------------------------------------


def test_lookup_executable_uses_the_containers_path(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = tmp_path / "a" / "tool"
    plain.write_text("")
    runnable = tmp_path / "b" / "tool"
    runnable.write_text("#!/bin/sh\n")
    runnable.chmod(0o755)
    env = [f"PATH={tmp_path}/a:{tmp_path}/b"]
    assert lookup_executable("tool", env) == str(runnable)
    with pytest.raises(OSError) as info:
        lookup_executable("tool", [f"PATH={tmp_path}/a"])
    assert info.value.errno == errno.EACCES
    with pytest.raises(OSError) as info:
        lookup_executable("nope", env)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(OSError) as info:
        lookup_executable(str(tmp_path / "a"), env)   # a directory is not executable
    assert info.value.errno == errno.EACCES


def test_exit_codes_follow_docker() -> None:
    assert exit_code_for("exec", errno.ENOENT) == 127
    assert exit_code_for("exec", errno.EACCES) == 126
    assert exit_code_for("exec", errno.ENOEXEC) == 126
    assert exit_code_for("mount /proc", errno.ENOENT) == 125
    assert ContainerStartError("c1", "exec", "not found", errno.ENOENT).exit_code == 127
    assert "c1" in str(ContainerStartError("c1", "cgroup", "boom"))


def test_env_mapping() -> None:
    assert env_mapping(["A=1", "B=x=y", "bad", "A=2"]) == {"A": "2", "B": "x=y"}


# --- spec translation -------------------------------------------------------------


def _spec(**overrides: object) -> dict:  # type: ignore[type-arg]
    opts = ContainerSpecOptions(args=["sh"], rootfs=Path("/r"), cap_last_cap=40, **overrides)  # type: ignore[arg-type]
    return build_spec(opts)


def test_resources_from_spec_round_trips_build_spec() -> None:
    spec = _spec(resources=SpecResources(memory=64 << 20, cpus=1.5, cpuset_cpus="0", pids_limit=100))
    assert resources_from_spec(spec["linux"]["resources"]) == Resources(
        memory=64 << 20, memory_swap=128 << 20, cpus=1.5, cpuset_cpus="0", pids_limit=100)
    assert resources_from_spec(None) == Resources()


def test_namespace_plan() -> None:
    flags, joins = namespace_plan(_spec(network_mode="/run/netns/x")["linux"]["namespaces"])
    assert flags == sc.CLONE_NEWPID | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWNS | sc.CLONE_NEWCGROUP
    assert joins == [("/run/netns/x", sc.CLONE_NEWNET)]
    with pytest.raises(StageError):
        namespace_plan([{"type": "bogus"}])


MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 23 0:40 / /mnt/other rw - cgroup cgroup rw,pids
"""


def test_cgroup_hierarchies_from_mountinfo() -> None:
    hs = cgroup_hierarchies(MOUNTINFO)
    assert [(h.name, h.fstype, h.data) for h in hs] == [
        ("cpu,cpuacct", "cgroup", "cpu,cpuacct"), ("memory", "cgroup", "memory"),
        ("systemd", "cgroup", "xattr,name=systemd"), ("unified", "cgroup2", "")]


# --- the mount sequence, recorded --------------------------------------------------


def _container(tmp_path: Path, **overrides: object) -> tuple[Container, sc.RecordingSyscalls, str]:
    root = tmp_path / "rootfs"
    root.mkdir()
    (tmp_path / "hostname").write_text("box\n")
    spec = _spec(hostname_path=tmp_path / "hostname", readonly_rootfs=True, **overrides)
    spec["root"]["path"] = "rootfs"
    rec = sc.RecordingSyscalls()
    return Container(spec, str(tmp_path), rec, MOUNTINFO), rec, str(root)


def test_mounts_in_spec_order_inside_the_root(tmp_path: Path) -> None:
    c, rec, root = _container(tmp_path)
    c.prepare_root()
    c.do_mounts()
    mounts = rec.calls_of("mount")
    assert mounts[0] == ("mount", None, "/", None, sc.MS_REC | sc.MS_PRIVATE, None)
    assert mounts[1] == ("mount", root, root, None, sc.MS_BIND | sc.MS_REC, None)
    targets = [call[2] for call in mounts]
    order = [targets.index(f"{root}{d}") for d in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue",
                                                    "/sys", "/sys/fs/cgroup", "/etc/hostname")]
    assert order == sorted(order)
    assert all(t.startswith(root) for t in targets[1:])
    assert ("mount", "proc", f"{root}/proc", "proc", sc.MS_NOSUID | sc.MS_NOEXEC | sc.MS_NODEV, None) in mounts
    assert ("mount", "devpts", f"{root}/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5") in mounts
    # /etc/hostname: a file bound, then remounted read-only, then made private
    host = str(tmp_path / "hostname")
    i = mounts.index(("mount", host, f"{root}/etc/hostname", None, sc.MS_BIND | sc.MS_REC, None))
    assert mounts[i + 1] == ("mount", None, f"{root}/etc/hostname", None,
                             sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY, None)
    assert Path(root, "etc/hostname").is_file()
    # cgroup v1: a tmpfs, one mount per hierarchy, co-mount symlinks, then read-only
    assert ("mount", "cgroup", f"{root}/sys/fs/cgroup/memory", "cgroup",
            sc.MS_NOSUID | sc.MS_NOEXEC | sc.MS_NODEV | sc.MS_RDONLY, "memory") in mounts
    assert ("mount", "cgroup", f"{root}/sys/fs/cgroup/unified", "cgroup2",
            sc.MS_NOSUID | sc.MS_NOEXEC | sc.MS_NODEV | sc.MS_RDONLY, None) in mounts
    assert os.readlink(f"{root}/sys/fs/cgroup/cpu") == "cpu,cpuacct"
    # the standard device nodes, bound from the host, and the /dev symlinks
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists(f"/dev/{name}"):
            assert ("mount", f"/dev/{name}", f"{root}/dev/{name}", None, sc.MS_BIND, None) in mounts
    assert os.readlink(f"{root}/dev/ptmx") == "pts/ptmx"
    assert os.readlink(f"{root}/dev/fd") == "/proc/self/fd"


def test_a_symlinked_mount_target_stays_inside(tmp_path: Path) -> None:
    c, rec, root = _container(tmp_path)
    Path(root, "etc").mkdir()
    os.symlink("/tmp/outside", f"{root}/etc/hostname")
    c.do_mounts()
    targets = {call[2] for call in rec.calls_of("mount")}
    assert f"{root}/tmp/outside" in targets
    assert "/tmp/outside" not in targets


def test_pivot_root_sequence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c, rec, _ = _container(tmp_path)
    monkeypatch.chdir(tmp_path)
    c.pivot()
    assert rec.calls == [("pivot_root", ".", "."), ("mount", None, ".", None, sc.MS_SLAVE | sc.MS_REC, None),
                         ("umount2", ".", sc.MNT_DETACH)]


def test_masked_paths_missing_ones_skipped(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    f = tmp_path / "file"
    f.write_text("x")
    c, rec, _ = _container(tmp_path, masked_paths=[str(d), str(f), str(tmp_path / "gone")])
    rec.fail("mount", errno.ENOENT, match=lambda call: call[2].endswith("gone"))
    c.mask_paths()
    assert rec.calls_of("mount") == [
        ("mount", "tmpfs", str(d), "tmpfs", sc.MS_RDONLY, None),
        ("mount", "/dev/null", str(f), None, sc.MS_BIND, None),
        ("mount", "/dev/null", str(tmp_path / "gone"), None, sc.MS_BIND, None),
    ]


def test_a_failing_mount_names_its_stage(tmp_path: Path) -> None:
    c, rec, root = _container(tmp_path)
    rec.fail("mount", errno.EPERM, match=lambda call: call[2] == f"{root}/sys")
    with pytest.raises(PermissionError):
        c.do_mounts()
    assert c.stage == "mount /sys"


# --- the sync pipe -------------------------------------------------------------------


def test_sync_messages_until_ready_and_eof() -> None:
    r, w = os.pipe()
    try:
        send(w, {"pid": 42})
        send(w, {"ready": True})
        assert read_messages(r, until_ready=True, timeout=1) == [{"pid": 42}, {"ready": True}]
        send(w, {"error": "exec: nope", "errno": errno.ENOENT, "stage": "exec"})
        os.close(w)
        w = -1
        assert read_messages(r, until_ready=False, timeout=1) == [
            {"error": "exec: nope", "errno": errno.ENOENT, "stage": "exec"}]
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_builtin_command_line_and_state(tmp_path: Path) -> None:
    ex = BuiltinExecutor(tmp_path / "state", python="/py", require_subreaper=False)
    cmd = ex.command(Path("/b"), "c1", "/skiff/c1", 5, None)
    assert cmd == ["/py", "-S", "-m", "agent.runtime.init", "--bundle", "/b", "--id", "c1",
                   "--cgroup-path", "/skiff/c1", "--sync-fd", "5"]
    ex.state.save("c1", pid=7, cgroup="/skiff/c1", bundle="/b")
    assert json.loads((tmp_path / "state/c1/state.json").read_text())["pid"] == 7
    with pytest.raises(Exception, match="invalid container id"):
        ex.state.path("../x")


def test_device_rules_as_v1_lines() -> None:
    rules = _spec()["linux"]["resources"]["devices"]
    lines = device_rule_lines(rules)
    assert lines[0] == ("devices.deny", "a")
    assert ("devices.allow", "c *:* m") in lines
    assert ("devices.allow", "c 1:3 rwm") in lines
    assert ("devices.allow", "c 136:* rwm") in lines
