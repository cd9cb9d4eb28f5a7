"""agent.runtime.syscalls against the real kernel, as root.

Every privileged step runs in a child interpreter (``python -c``), never in
the pytest process: the child enters its own namespaces first, so whatever it
mounts or changes dies with it, even when an assertion fails half-way.  The
one long-lived child (the net-namespace holder) is killed by PID in
``finally`` and also asked the kernel for SIGKILL when pytest dies.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.syscalls import CAPABILITIES, capability_mask, capability_names, capget

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
DOCKER_DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)



def _missing_privilege() -> str:
    """Why these tests cannot run here (empty when they can)."""
    if os.geteuid() != 0:
        return "needs root (unshare, mount, pivot_root, capset)"
    effective = capget().effective
    lacking = [name for name in ("CAP_SYS_ADMIN", "CAP_SETPCAP") if not effective >> CAPABILITIES[name] & 1]
    return f"needs {', '.join(lacking)} in the effective set" if lacking else ""


pytestmark = pytest.mark.skipif(bool(_missing_privilege()), reason=_missing_privilege() or "-")

PRELUDE = """\
import errno, os, signal, subprocess, sys
from agent.runtime import syscalls as sc

def status(path="/proc/self/status"):
    fields = {}
    for line in open(path):
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields

def mounted(path):
    return any(line.split()[4] == path for line in open("/proc/self/mountinfo"))

"""


def child_argv(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args]


CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_child(code: str, *args: str, timeout: float = 10) -> str:
    """Run ``code`` (after PRELUDE) in a fresh interpreter; assert it succeeds; return stdout."""
    proc = subprocess.run(child_argv(code, *args), check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=CHILD_ENV)
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{proc.stderr}{proc.stdout}"
    return proc.stdout


def ns_inode(kind: str, pid: str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


@pytest.fixture(autouse=True)
def _host_untouched(tmp_path: Path) -> Iterator[None]:
    """Nothing a child did is visible here afterwards: hostname, namespaces, mounts."""
    hostname = socket.gethostname()
    namespaces = {kind: ns_inode(kind) for kind in ("mnt", "uts", "net", "ipc", "pid", "cgroup")}
    yield
    assert socket.gethostname() == hostname
    assert {kind: ns_inode(kind) for kind in namespaces} == namespaces
    leaked = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in line]
    assert leaked == []


# --------------------------------------------------------------------------- #
# namespaces
# --------------------------------------------------------------------------- #


def test_unshare_uts_hostname_visible_only_in_child() -> None:
    out = run_child("""
        import socket
        sc.unshare(sc.CLONE_NEWUTS)
        sc.sethostname("skiff-uts-test")
        sc.setdomainname("skiff.test")
        print(socket.gethostname(), open("/proc/sys/kernel/domainname").read().strip())
    """)
    assert out.split() == ["skiff-uts-test", "skiff.test"]
    assert socket.gethostname() != "skiff-uts-test"
    assert Path("/proc/sys/kernel/domainname").read_text().strip() != "skiff.test"


def test_unshare_every_namespace_kind() -> None:
    out = run_child("""
        before = {k: os.stat(f"/proc/self/ns/{k}").st_ino for k in ("mnt", "uts", "ipc", "net", "cgroup")}
        before["pid_for_children"] = os.stat("/proc/self/ns/pid_for_children").st_ino
        sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET
                   | sc.CLONE_NEWCGROUP | sc.CLONE_NEWPID)
        # the first child in the new pid namespace is its PID 1 (and only then does the
        # pid_for_children link resolve)
        pid = subprocess.run(["/bin/sh", "-c", "echo $$"], check=False, capture_output=True, text=True).stdout.strip()
        changed = sorted(k for k, ino in before.items() if os.stat(f"/proc/self/ns/{k}").st_ino != ino)
        print(",".join(changed), pid)
    """)
    assert out.split() == ["cgroup,ipc,mnt,net,pid_for_children,uts", "1"]


def test_setns_joins_another_process_net_namespace() -> None:
    holder = subprocess.Popen(child_argv("""
        sc.set_pdeathsig(signal.SIGKILL)   # never outlive the test run
        sc.unshare(sc.CLONE_NEWNET)
        print(os.stat("/proc/self/ns/net").st_ino, flush=True)
        sys.stdin.read()                   # until the test closes our stdin
    """), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=CHILD_ENV)
    try:
        assert holder.stdout is not None
        holder_ns = int(holder.stdout.readline())
        assert holder_ns == ns_inode("net", str(holder.pid)) != ns_inode("net")
        out = run_child("""
            import socket
            before = os.stat("/proc/self/ns/net").st_ino
            fd = os.open(f"/proc/{sys.argv[1]}/ns/net", os.O_RDONLY)
            try:
                sc.setns(fd, sc.CLONE_NEWUTS)
            except OSError as exc:
                assert exc.errno == errno.EINVAL and f"setns(fd={fd} (net:[" in str(exc), exc
            else:
                sys.exit("setns of a net namespace as CLONE_NEWUTS succeeded")
            sc.setns(fd, sc.CLONE_NEWNET)
            os.close(fd)
            print(before, os.stat("/proc/self/ns/net").st_ino, [n for _, n in socket.if_nameindex()])
        """, str(holder.pid))
        before, after, interfaces = out.split(maxsplit=2)
        assert int(before) == ns_inode("net")
        assert int(after) == holder_ns
        assert interfaces.strip() == "['lo']"      # a fresh namespace has only loopback
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(timeout=5)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


# --------------------------------------------------------------------------- #
# mounts and pivot_root
# --------------------------------------------------------------------------- #


def test_tmpfs_bind_remount_ro_and_umount(tmp_path: Path) -> None:
    out = run_child("""
        base = sys.argv[1]
        sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)   # nothing propagates back to the host
        opts = sc.mount_flags_from_options(["nosuid", "nodev", "mode=711", "size=1m"])
        sc.mount("tmpfs", base, "tmpfs", opts.flags, opts.data)
        assert mounted(base) and os.stat(base).st_mode & 0o777 == 0o711
        src, dst = base + "/src", base + "/dst"
        os.mkdir(src)
        os.mkdir(dst)
        sc.mount(src, dst, None, sc.MS_BIND)
        with open(dst + "/through-bind", "w") as f:
            f.write("x")
        assert open(src + "/through-bind").read() == "x"
        sc.mount(None, dst, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY)
        try:
            open(dst + "/refused", "w")
        except OSError as exc:
            assert exc.errno == errno.EROFS, exc
        else:
            sys.exit("write through a read-only bind mount succeeded")
        with open(src + "/still-writable", "w") as f:   # only the bind mount is read-only
            f.write("y")
        sc.umount2(dst)
        assert not mounted(dst)
        try:
            sc.umount2(dst)
        except OSError as exc:
            assert exc.errno == errno.EINVAL and repr(dst) in str(exc), exc
        else:
            sys.exit("second umount2 succeeded")
        sc.umount2(base, sc.MNT_DETACH)
        assert not mounted(base)
        print("ok")
    """, str(tmp_path))
    assert out.strip() == "ok"
    assert list(tmp_path.iterdir()) == []   # everything lived on the child's tmpfs


def _static_elf(path: Path) -> bool:
    """Whether ``path`` is a 64-bit little-endian ELF without an interpreter (statically linked)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:6] != b"\x7fELF\x02\x01":
            return False
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def test_pivot_root_into_a_busybox_root(tmp_path: Path) -> None:
    if not BUSYBOX.exists() or not _static_elf(BUSYBOX):
        pytest.skip(f"needs a static {BUSYBOX} (apt-get install busybox-static)")
    proc = subprocess.run(child_argv("""
        import shutil
        root, busybox = sys.argv[1], sys.argv[2]
        sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        sc.mount("tmpfs", root, "tmpfs", 0, "mode=755")      # new_root must be a mount point
        shutil.copy(busybox, root + "/busybox")
        os.mkdir(root + "/.old")
        os.chdir(root)
        sc.pivot_root(".", ".old")
        os.chdir("/")
        sc.umount2("/.old", sc.MNT_DETACH)
        os.rmdir("/.old")
        print(sorted(os.listdir("/")), flush=True)
        os.execv("/busybox", ["busybox", "true"])
    """, str(tmp_path), str(BUSYBOX)), check=False, capture_output=True, text=True, timeout=10, cwd=ROOT, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['busybox']"


def test_pivot_root_error_names_paths(tmp_path: Path) -> None:
    out = run_child("""
        base = sys.argv[1]
        sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        sc.mount("tmpfs", base, "tmpfs")     # off the root mount, so the kernel's answer is EINVAL
        new_root = base + "/new"
        os.makedirs(new_root + "/old")
        try:
            sc.pivot_root(new_root, new_root + "/old")   # new_root is not a mount point
        except OSError as exc:
            print(exc.errno, exc)
        else:
            sys.exit("pivot_root onto a plain directory succeeded")
    """, str(tmp_path))
    err, message = out.split(maxsplit=1)
    assert int(err) == 22  # EINVAL
    new_root = tmp_path / "new"
    assert f"pivot_root(new_root={str(new_root)!r}, put_old={str(new_root / 'old')!r})" in message


# --------------------------------------------------------------------------- #
# capabilities and prctl
# --------------------------------------------------------------------------- #


def test_capset_to_dockers_default_set() -> None:
    missing = capability_mask(DOCKER_DEFAULT_CAPS) & ~capget().permitted
    if missing:
        pytest.skip(f"this process lacks {', '.join(capability_names(missing))} in its permitted set")
    out = run_child("""
        keep = [sc.CAPABILITIES[name] for name in sys.argv[1].split(",")]
        mask = sc.capability_mask(keep)
        sc.drop_bounding_set(keep)           # needs CAP_SETPCAP, so before capset
        sc.clear_ambient()
        sc.capset(sc.CapSets(effective=mask, permitted=mask, inheritable=0))
        assert sc.capget() == sc.CapSets(mask, mask, 0), sc.capget()
        mine = status()
        # what an exec'd process (the container's) ends up with, as root
        child = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True, check=True).stdout
        theirs = dict(line.split(":", 1) for line in child.splitlines())
        try:
            sc.unshare(sc.CLONE_NEWUTS)      # CAP_SYS_ADMIN is gone
        except PermissionError as exc:
            refused = exc.errno == errno.EPERM
        else:
            refused = False
        for fields in (mine, theirs):
            print(*(fields[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")))
        print(refused)
    """, ",".join(DOCKER_DEFAULT_CAPS))
    mine, theirs, refused = out.splitlines()
    expected = ["0000000000000000", "00000000a80425fb", "00000000a80425fb", "00000000a80425fb", "0000000000000000"]
    assert mine.split() == expected
    assert theirs.split() == expected
    assert refused == "True"


def test_drop_bounding_set() -> None:
    out = run_child("""
        sc.drop_bounding_set([sc.CAP_CHOWN, sc.CAP_KILL])
        sc.drop_bounding_set([sc.CAP_CHOWN, sc.CAP_KILL])   # dropping again is harmless
        print(status()["CapBnd"], sc.prctl(sc.PR_CAPBSET_READ, sc.CAP_KILL),
              sc.prctl(sc.PR_CAPBSET_READ, sc.CAP_SYS_ADMIN), sc.capget().effective >> sc.CAP_SYS_ADMIN & 1)
    """)
    # the bounding set limits what exec grants; this process keeps its effective set
    assert out.split() == [f"{1 << 0 | 1 << 5:016x}", "1", "0", "1"]


def test_set_no_new_privs() -> None:
    out = run_child("""
        before = status()["NoNewPrivs"]
        sc.set_no_new_privs()
        child = subprocess.run(["grep", "NoNewPrivs", "/proc/self/status"], check=False, capture_output=True, text=True)
        print(before, status()["NoNewPrivs"], sc.prctl(sc.PR_GET_NO_NEW_PRIVS), child.stdout.split()[-1])
    """)
    assert out.split() == ["0", "1", "1", "1"]
