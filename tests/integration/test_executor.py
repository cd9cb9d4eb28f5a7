"""The built-in executor runs the same bundles as runc, with the same observable isolation.

Requires root, /usr/sbin/runc and /bin/busybox (as test_spec_runc, whose
bundle helpers this module reuses); skips with the reason otherwise.  Every
test runs under both executors (``builtin`` and ``runc``).  The pytest process
becomes a child subreaper for the duration of each test (the shim's role), so
it is the container's parent and reaps it.  The fixture deletes every
container and cgroup, even on failure, and then checks that the host's mount
table and the set of cgroup directories under the test parent are unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.runtime import syscalls as sc
from agent.runtime.executor import (
    BuiltinExecutor,
    ContainerProcess,
    ContainerStartError,
    Executor,
    RuncExecutor,
    Stdio,
    is_child_subreaper,
)
from agent.runtime.imageconfig import resolve_user
from agent.runtime.spec import DEFAULT_MASKED_PATHS, DEFAULT_PIDS_LIMIT, ContainerSpecOptions, Resources
from tests.integration.test_spec_runc import (  # the same bundles as the runc test
    CGROUP_PARENT,
    DEFAULT_MASK,
    RUN_TIMEOUT,
    Runc,
    _cgroup_dirs,
    _cgroup_mounts,
    _ifaces,
    _requirements,
    _status,
    rootfs,
)

__all__ = ["rootfs"]  # the shared busybox rootfs fixture

pytestmark = pytest.mark.skipif(bool(_requirements()), reason="; ".join(_requirements()))


def _mountinfo_count() -> int:
    return len(Path("/proc/self/mountinfo").read_text().splitlines())


def _cgroup_tree() -> set[Path]:
    out: set[Path] = set()
    for top in _cgroup_dirs(CGROUP_PARENT):
        out |= {Path(d) for d, _, _ in os.walk(top)}
    return out


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class Harness:
    """Bundles from test_spec_runc's Runc helper, run by one executor."""

    def __init__(self, kind: str, rootfs: Path, workdir: Path) -> None:
        self.kind = kind
        self.bundles = Runc(rootfs, workdir)
        self.executor: Executor
        if kind == "builtin":
            self.executor = BuiltinExecutor(workdir / "builtin-state")
        else:
            self.executor = RuncExecutor(workdir / "runc-state")
        self.created: list[str] = []

    def options(self, script: str, **overrides: object) -> ContainerSpecOptions:
        return self.bundles.options(script, **overrides)

    def start(self, opts: ContainerSpecOptions, stdio: Stdio) -> tuple[str, ContainerProcess]:
        cid, bundle = self.bundles.bundle(opts)
        self.created.append(cid)
        return cid, self.executor.run(bundle, cid, stdio)

    def run(self, opts: ContainerSpecOptions) -> Result:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            try:
                cid, process = self.start(opts, Stdio(None, out_w, err_w))
            finally:
                os.close(out_w)
                os.close(err_w)
            with os.fdopen(out_r, "rb", closefd=False) as out, os.fdopen(err_r, "rb", closefd=False) as err:
                stdout = out.read().decode()  # EOF: every holder (the container) is gone
                stderr = err.read().decode()
            code = process.wait(timeout=RUN_TIMEOUT)
            self.executor.delete(cid)
            return Result(code, stdout, stderr)
        finally:
            os.close(out_r)
            os.close(err_r)

    def ok(self, opts: ContainerSpecOptions) -> str:
        result = self.run(opts)
        assert result.code == 0, f"{self.kind}: exited {result.code}: {result.stderr}{result.stdout}"
        return result.stdout

    def cleanup(self) -> None:
        for cid in self.created:
            with contextlib.suppress(Exception):  # already deleted, or never got that far
                self.executor.delete(cid)
        self.bundles.cleanup()


@pytest.fixture(params=["builtin", "runc"])
def box(request: pytest.FixtureRequest, rootfs: Path, tmp_path: Path) -> Iterator[Harness]:
    mounts_before = _mountinfo_count()
    cgroups_before = _cgroup_tree()
    was_subreaper = is_child_subreaper()
    sc.set_child_subreaper()
    h = Harness(request.param, rootfs, tmp_path)
    try:
        yield h
    finally:
        try:
            h.cleanup()
        finally:
            if not was_subreaper:
                sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 0)
    assert _mountinfo_count() == mounts_before, "mounts left behind"
    left = _cgroup_tree() - cgroups_before
    assert not left, f"cgroups left behind: {sorted(left)}"


# --- the tests (the same assertions as test_spec_runc) ----------------------------


def test_default_caps_pid1_hostname_and_root(box: Harness) -> None:
    out = box.ok(box.options("cat /proc/self/status; echo pid=$$; echo host=$(hostname); id"))
    status = _status(out)
    assert status["CapEff"] == DEFAULT_MASK == "00000000a80425fb"
    assert status["CapPrm"] == DEFAULT_MASK
    assert status["CapBnd"] == DEFAULT_MASK
    assert status["CapInh"] == "0000000000000000"
    assert status["CapAmb"] == "0000000000000000"
    assert status["NoNewPrivs"] == "0"
    assert "pid=1\n" in out
    assert "host=skiffbox\n" in out
    assert "uid=0(root) gid=0(root)" in out


def test_user_from_image_passwd(box: Harness, rootfs: Path) -> None:
    user = resolve_user(rootfs, "app")
    assert user == (1000, 1000, [2000])
    out = box.ok(box.options("id; cat /proc/self/status", uid=user.uid, gid=user.gid,
                             additional_gids=user.additional_gids))
    assert "uid=1000(app) gid=1000(app)" in out
    assert "2000(extra)" in out
    status = _status(out)
    assert status["CapEff"] == "0000000000000000"
    assert status["CapBnd"] == DEFAULT_MASK


def test_cap_drop_all_add_one_and_no_new_privileges(box: Harness) -> None:
    out = box.ok(box.options("cat /proc/self/status", cap_drop=["ALL"], cap_add=["net_raw"],
                             no_new_privileges=True))
    status = _status(out)
    assert status["CapEff"] == f"{1 << 13:016x}"
    assert status["CapBnd"] == f"{1 << 13:016x}"
    assert status["NoNewPrivs"] == "1"


def test_masked_and_readonly_paths(box: Harness) -> None:
    present = [p for p in DEFAULT_MASKED_PATHS if os.path.exists(p)]
    assert present, "none of Docker's masked paths exists on this host"
    script = "; ".join(
        f"echo {p}=$(ls -A {p} | wc -l)" if os.path.isdir(p) else f"echo {p}=$(cat {p} | wc -c)"
        for p in present
    ) + "; cat /proc/self/mountinfo"
    out = box.ok(box.options(script))
    for p in present:
        assert f"{p}=0\n" in out, f"{p} is not masked:\n{out}"
    ro_mounts = {fields[4]: fields[5].split(",") for fields in (line.split() for line in out.splitlines())
                 if len(fields) > 6 and fields[4].startswith("/proc/")}
    for p in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"):
        if os.path.exists(p):
            assert "ro" in ro_mounts.get(p, []), f"{p} is not read-only: {ro_mounts.get(p)}"


def test_readonly_rootfs_but_writable_tmpfs(box: Harness) -> None:
    result = box.run(box.options("touch /dev/shm/ok && echo shm-ok; touch /x"))
    assert "shm-ok" in result.stdout
    assert result.code != 0
    assert "Read-only file system" in result.stderr


def test_network_none_has_only_loopback(box: Harness) -> None:
    assert _ifaces(box.ok(box.options("cat /proc/net/dev"))) == {"lo"}


def test_etc_files_and_rlimits(box: Harness) -> None:
    out = box.ok(box.options("cat /etc/hostname /etc/resolv.conf; echo soft=$(ulimit -Sn) hard=$(ulimit -Hn)",
                             ulimits={"nofile": (512, 1024)}))
    assert "skiffbox\n" in out
    assert "nameserver 127.0.0.1" in out
    assert "soft=512 hard=1024" in out


def test_dev_has_only_standard_nodes(box: Harness) -> None:
    out = box.ok(box.options("ls -A /dev; echo data | cat > /dev/null && echo null-ok"))
    names = set(out.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue", "ptmx"} <= names
    assert not {n for n in names if re.match(r"^(sd|vd|nvme|loop|mem|kmsg)", n)}, names
    assert "null-ok" in names


def test_only_stdio_fds_are_open(box: Harness) -> None:
    out = box.ok(box.options("ls /proc/self/fd"))
    assert set(out.split()) <= {"0", "1", "2", "3"}  # 3: ls's own directory fd


def test_exit_code_propagated(box: Harness) -> None:
    assert box.run(box.options("exit 3")).code == 3
    assert box.run(box.options("sh -c 'kill -KILL $$'; exit 4")).code == 4  # a child's death is not PID 1's


def test_sigkill_from_the_host_is_137(box: Harness) -> None:
    cid, process = box.start(box.options("while :; do sleep 0.05; done"), Stdio())
    box.executor.kill(cid, signal.SIGKILL)
    assert process.wait(timeout=RUN_TIMEOUT) == 128 + signal.SIGKILL
    box.executor.delete(cid)


def test_command_not_found_is_127(box: Harness) -> None:
    with pytest.raises(ContainerStartError) as info:
        box.run(box.options("", args=["no-such-command"]))
    assert info.value.exit_code == 127
    assert info.value.errno == errno.ENOENT


def test_not_executable_is_126(box: Harness) -> None:
    with pytest.raises(ContainerStartError) as info:
        box.run(box.options("", args=["/etc/passwd"]))
    assert info.value.exit_code == 126


def test_memory_limit_in_cgroup_inside_and_outside(box: Harness) -> None:
    opts = box.options(
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
        "/sys/fs/cgroup/pids/pids.max; echo ready; read line || true",
        resources=Resources(memory=64 << 20, cpus=1.5))
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        try:
            cid, process = box.start(opts, Stdio(in_r, out_w, None))
        finally:
            os.close(in_r)
            os.close(out_w)
        with os.fdopen(out_r, "r", closefd=False) as out:
            inside = [out.readline().strip() for _ in range(4)]
        assert inside == [str(64 << 20), "150000", str(DEFAULT_PIDS_LIMIT), "ready"], inside
        memory = [m for m in _cgroup_mounts() if m.name == "memory"]
        if memory:
            limit = memory[0] / CGROUP_PARENT / cid / "memory.limit_in_bytes"
        else:
            limit = Path("/sys/fs/cgroup") / CGROUP_PARENT / cid / "memory.max"
        assert int(limit.read_text()) == 64 << 20
        assert process.pid in {int(p) for p in (limit.parent / "cgroup.procs").read_text().split()}
        os.close(in_w)
        in_w = -1
        assert process.wait(timeout=RUN_TIMEOUT) == 0
        box.executor.delete(cid)
    finally:
        for fd in (in_w, out_r):
            if fd >= 0:
                os.close(fd)


def test_kill_and_delete(box: Harness) -> None:
    out_r, out_w = os.pipe()
    try:
        try:
            cid, process = box.start(box.options("trap 'exit 7' TERM; echo up; while :; do sleep 0.05; done"),
                                     Stdio(None, out_w, None))
        finally:
            os.close(out_w)
        assert os.read(out_r, 3) == b"up\n"  # the trap is set: PID 1 ignores an unhandled SIGTERM
    finally:
        os.close(out_r)
    box.executor.kill(cid, signal.SIGTERM)
    assert process.wait(timeout=RUN_TIMEOUT) == 7
    box.executor.delete(cid)
    assert not _cgroup_dirs(f"{CGROUP_PARENT}/{cid}")


def test_bad_mount_source_fails_cleanly(box: Harness, tmp_path: Path) -> None:
    from agent.runtime.spec import Mount

    opts = box.options("true", mounts=[Mount("/data", "bind", str(tmp_path / "missing"), ["rbind"])])
    with pytest.raises(ContainerStartError):
        box.run(opts)


def test_device_cgroup_denies_other_nodes(box: Harness) -> None:
    # CAP_MKNOD may create nodes, but the device cgroup must refuse opening a host disk (8:0, sda)
    out = box.ok(box.options("mknod /dev/sdx b 8 0 && echo made; cat /dev/sdx >/dev/null 2>&1 || echo denied"))
    assert "made" in out and "denied" in out, out


def test_create_then_start(box: Harness) -> None:
    cid, bundle = box.bundles.bundle(box.options("echo started"))
    box.created.append(cid)
    out_r, out_w = os.pipe()
    try:
        try:
            process = box.executor.create(bundle, cid, Stdio(None, out_w, None))
        finally:
            os.close(out_w)
        assert process.poll() is None  # set up, not yet exec'd: waiting for start
        assert Path(f"/proc/{process.pid}").exists()
        box.executor.start(cid)
        with os.fdopen(out_r, "r", closefd=False) as out:
            assert out.read() == "started\n"
        assert process.wait(timeout=RUN_TIMEOUT) == 0
        box.executor.delete(cid)
    finally:
        os.close(out_r)


def test_delete_of_a_created_container_leaves_nothing(box: Harness) -> None:
    cid, bundle = box.bundles.bundle(box.options("echo never"))
    box.created.append(cid)
    box.executor.create(bundle, cid, Stdio())
    box.executor.delete(cid)
    assert not _cgroup_dirs(f"{CGROUP_PARENT}/{cid}")
