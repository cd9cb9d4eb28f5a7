"""A config.json from agent.runtime.spec runs under ``runc run`` with Docker's isolation.

Requires root, /usr/sbin/runc (Debian's ``runc``) and /bin/busybox (Debian's
``busybox-static``); skips with the reason otherwise.  Each test writes a
bundle in tmp_path over a shared busybox rootfs, runs it with its own
``runc --root`` state dir and a cgroup under ``/skiff-test/<id>``, and the
fixture deletes every container and cgroup it made, even on failure, then
checks that none is left.  The isolation checks shared with the built-in executor
live in test_executor.py, which runs them under both executors.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.runtime.imageconfig import merge_env
from agent.runtime.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PIDS_LIMIT,
    ContainerSpecOptions,
    Resources,
    build_spec,
    capability_mask,
)

RUNC = Path("/usr/sbin/runc")
BUSYBOX = Path("/bin/busybox")
CGROUP_PARENT = "skiff-test"
APPLETS = ("sh", "cat", "grep", "id", "hostname", "ls", "touch", "wc", "echo", "sleep", "env", "test")
RUN_TIMEOUT = 20.0


def _requirements() -> list[str]:
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("not running as root")
    if not os.access(RUNC, os.X_OK):
        missing.append(f"{RUNC} missing (apt-get install runc)")
    if not BUSYBOX.is_file():
        missing.append(f"{BUSYBOX} missing (apt-get install busybox-static)")
    return missing


pytestmark = pytest.mark.skipif(bool(_requirements()), reason="; ".join(_requirements()))


def _cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy on the host."""
    mounts: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] in ("cgroup", "cgroup2"):
            mounts.append(Path(fields[4].replace("\\040", " ")))
    return mounts


def _cgroup_dirs(relative: str) -> list[Path]:
    return [m / relative for m in _cgroup_mounts() if (m / relative).exists()]


def _rmdir(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY and path.name == CGROUP_PARENT:
                return  # another run's cgroup is still inside the shared parent
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.02)  # the last task is still leaving the cgroup


def _host_ifaces() -> set[str]:
    return _ifaces(Path("/proc/net/dev").read_text())


def _ifaces(proc_net_dev: str) -> set[str]:
    return {line.split(":", 1)[0].strip() for line in proc_net_dev.splitlines() if ":" in line}


def _status(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
            out[key] = value.strip()
    return out


DEFAULT_MASK = f"{capability_mask(DEFAULT_CAPABILITIES):016x}"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "home/app"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    for name in ("hostname", "hosts", "resolv.conf"):
        (root / "etc" / name).touch()
    return root


class Runc:
    """Runs bundles under runc; remembers every container id to clean up after."""

    def __init__(self, rootfs: Path, workdir: Path) -> None:
        self.rootfs = rootfs
        self.workdir = workdir
        self.state = workdir / "runc-state"
        self.ids: list[str] = []

    def options(self, script: str, **overrides: object) -> ContainerSpecOptions:
        opts = ContainerSpecOptions(
            args=["sh", "-c", script],
            rootfs=self.rootfs,
            env=merge_env([], [], [], hostname="skiffbox"),
            hostname="skiffbox",
            network_mode="none",
            readonly_rootfs=True,
            terminal=False,
        )
        return replace(opts, **overrides)  # type: ignore[arg-type]

    def bundle(self, opts: ContainerSpecOptions) -> tuple[str, Path]:
        cid = f"skiff-spec-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self.ids.append(cid)
        bundle = self.workdir / cid
        bundle.mkdir()
        (bundle / "hostname").write_text(f"{opts.hostname}\n")
        (bundle / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{opts.hostname}\n")
        (bundle / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        opts = replace(opts, hostname_path=bundle / "hostname", hosts_path=bundle / "hosts",
                       resolv_conf_path=bundle / "resolv.conf",
                       cgroups_path=f"/{CGROUP_PARENT}/{cid}")
        (bundle / "config.json").write_text(json.dumps(build_spec(opts), indent=1))
        return cid, bundle

    def command(self, cid: str, bundle: Path) -> list[str]:
        return [str(RUNC), "--root", str(self.state), "run", "--bundle", str(bundle), cid]

    def run(self, opts: ContainerSpecOptions) -> subprocess.CompletedProcess[str]:
        cid, bundle = self.bundle(opts)
        return subprocess.run(self.command(cid, bundle), check=False, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)

    def ok(self, opts: ContainerSpecOptions) -> str:
        proc = self.run(opts)
        assert proc.returncode == 0, f"runc run exited {proc.returncode}: {proc.stderr}{proc.stdout}"
        return proc.stdout

    def cleanup(self) -> None:
        for cid in self.ids:
            subprocess.run([str(RUNC), "--root", str(self.state), "delete", "--force", cid],
                           check=False, capture_output=True, timeout=RUN_TIMEOUT)
            for path in _cgroup_dirs(f"{CGROUP_PARENT}/{cid}"):
                _rmdir(path)
        for path in _cgroup_dirs(CGROUP_PARENT):
            _rmdir(path)


@pytest.fixture
def runc(rootfs: Path, tmp_path: Path) -> Iterator[Runc]:
    r = Runc(rootfs, tmp_path)
    try:
        yield r
    finally:
        r.cleanup()
    leftovers = [p for cid in r.ids for p in _cgroup_dirs(f"{CGROUP_PARENT}/{cid}")]
    assert not leftovers, f"cgroups left behind: {leftovers}"
    listed = subprocess.run([str(RUNC), "--root", str(r.state), "list", "-q"],
                            check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT).stdout.split()
    assert not set(listed) & set(r.ids), f"containers left behind: {listed}"


# --- the tests ------------------------------------------------------------------














def test_network_host_sees_host_interfaces(runc: Runc) -> None:
    out = runc.ok(runc.options("cat /proc/net/dev", network_mode="host"))
    assert _ifaces(out) == _host_ifaces()


def test_etc_files_env_and_rlimits(runc: Runc) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = runc.ok(runc.options("cat /etc/hostname /etc/resolv.conf; env; echo nofile=$(ulimit -n)"))
    assert "skiffbox\n" in out
    assert "nameserver 127.0.0.1" in out
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n" in out
    assert "HOSTNAME=skiffbox\n" in out
    assert f"nofile={soft}\n" in out

    out = runc.ok(runc.options("echo soft=$(ulimit -Sn) hard=$(ulimit -Hn)", ulimits={"nofile": (512, 1024)}))
    assert "soft=512 hard=1024" in out




def test_limits_in_cgroup_inside_and_outside(runc: Runc) -> None:
    opts = runc.options(
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us /sys/fs/cgroup/pids/pids.max; echo ready; read line || true",
        resources=Resources(memory=64 << 20, cpus=1.5),
    )
    cid, bundle = runc.bundle(opts)
    proc = subprocess.Popen(runc.command(cid, bundle), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        inside = [proc.stdout.readline().strip() for _ in range(5)]
        assert inside == [str(64 << 20), "150000", "100000", str(DEFAULT_PIDS_LIMIT), "ready"], inside
        memory = [m for m in _cgroup_mounts() if m.name == "memory" or "memory" in m.name.split(",")]
        if memory:  # cgroup v1 / hybrid: the memory controller has its own hierarchy
            limit = memory[0] / CGROUP_PARENT / cid / "memory.limit_in_bytes"
        else:
            limit = Path("/sys/fs/cgroup") / CGROUP_PARENT / cid / "memory.max"
        assert int(limit.read_text()) == 64 << 20
        proc.stdin.close()
        assert proc.wait(timeout=RUN_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
