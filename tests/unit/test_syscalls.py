"""agent.runtime.syscalls without root: option translation, error messages,
the recording fake, capability tables, and the calls any user may make.

Nothing here changes the pytest process: calls on the real kernel are ones
that fail before doing anything, or only read; anything that would change
state (closing fds, prctl settings) runs in a child interpreter.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.runtime import syscalls as sc
from agent.runtime.syscalls import (
    CAPABILITIES,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SHARED,
    MS_SLAVE,
    MS_STRICTATIME,
    CapSets,
    LinuxSyscalls,
    MountOptions,
    RecordingSyscalls,
    Syscalls,
    capability_mask,
    capability_names,
    format_flags,
    mount_flags_from_options,
)

ROOT = Path(__file__).resolve().parents[2]

DOCKER_DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)


def run_child(code: str) -> str:
    """Run ``code`` in a fresh interpreter that can import ``agent``; return its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True,
                          timeout=20, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


# --------------------------------------------------------------------------- #
# mount options
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("options", "expected"), [
    ([], MountOptions(0, 0, "")),
    (["defaults"], MountOptions(0, 0, "")),
    (["ro"], MountOptions(MS_RDONLY, 0, "")),
    (["rw"], MountOptions(0, 0, "")),
    (["ro", "rw"], MountOptions(0, 0, "")),
    (["rw", "ro"], MountOptions(MS_RDONLY, 0, "")),
    (["nosuid", "nodev", "noexec"], MountOptions(MS_NOSUID | MS_NODEV | MS_NOEXEC, 0, "")),
    (["nosuid", "suid"], MountOptions(0, 0, "")),
    (["bind"], MountOptions(MS_BIND, 0, "")),
    (["rbind"], MountOptions(MS_BIND | MS_REC, 0, "")),
    (["rbind", "ro"], MountOptions(MS_BIND | MS_REC | MS_RDONLY, 0, "")),
    (["private"], MountOptions(0, MS_PRIVATE, "")),
    (["rprivate"], MountOptions(0, MS_PRIVATE | MS_REC, "")),
    (["rslave"], MountOptions(0, MS_SLAVE | MS_REC, "")),
    (["shared"], MountOptions(0, MS_SHARED, "")),
    (["rprivate", "rslave"], MountOptions(0, MS_SLAVE | MS_REC, "")),
    (["relatime"], MountOptions(MS_RELATIME, 0, "")),
    (["strictatime"], MountOptions(MS_STRICTATIME, 0, "")),
    (["remount", "ro", "bind"], MountOptions(MS_REMOUNT | MS_RDONLY | MS_BIND, 0, "")),
    # Docker's /dev
    (["nosuid", "strictatime", "mode=755", "size=65536k"],
     MountOptions(MS_NOSUID | MS_STRICTATIME, 0, "mode=755,size=65536k")),
    # Docker's /dev/pts
    (["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
     MountOptions(MS_NOSUID | MS_NOEXEC, 0, "newinstance,ptmxmode=0666,mode=0620,gid=5")),
    # Docker's /dev/shm
    (["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
     MountOptions(MS_NOSUID | MS_NOEXEC | MS_NODEV, 0, "mode=1777,size=65536k")),
    # a volume
    (["rbind", "rprivate", "nosuid"], MountOptions(MS_BIND | MS_REC | MS_NOSUID, MS_PRIVATE | MS_REC, "")),
    (["", "ro"], MountOptions(MS_RDONLY, 0, "")),
])
def test_mount_options(options: list[str], expected: MountOptions) -> None:
    assert mount_flags_from_options(options) == expected


def test_mount_options_accepts_any_iterable() -> None:
    assert mount_flags_from_options(iter(("ro", "mode=1777"))) == MountOptions(MS_RDONLY, 0, "mode=1777")


def test_format_flags() -> None:
    assert format_flags(0, sc.MOUNT_FLAGS) == "0"
    assert format_flags(MS_BIND | MS_REC, sc.MOUNT_FLAGS) == "MS_BIND|MS_REC"
    assert format_flags(CLONE_NEWNS | CLONE_NEWUTS, sc.CLONE_FLAGS) == "CLONE_NEWNS|CLONE_NEWUTS"
    assert format_flags(MS_RDONLY | 1 << 40, sc.MOUNT_FLAGS) == f"MS_RDONLY|{hex(1 << 40)}"


# --------------------------------------------------------------------------- #
# capabilities
# --------------------------------------------------------------------------- #


def test_capability_table_numbers_are_the_kernels() -> None:
    assert len(CAPABILITIES) == 41
    assert sorted(CAPABILITIES.values()) == list(range(41))
    assert CAPABILITIES["CAP_CHOWN"] == 0
    assert CAPABILITIES["CAP_SYS_ADMIN"] == 21
    assert CAPABILITIES["CAP_SETFCAP"] == 31
    assert CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == sc.CAP_LAST_CAP == 40


def test_docker_default_capabilities_mask() -> None:
    assert all(name in CAPABILITIES for name in DOCKER_DEFAULT_CAPS)
    mask = capability_mask(DOCKER_DEFAULT_CAPS)
    assert mask == 0x00000000A80425FB
    assert sorted(capability_names(mask)) == sorted(DOCKER_DEFAULT_CAPS)
    assert capability_mask(CAPABILITIES[n] for n in DOCKER_DEFAULT_CAPS) == mask


def test_capability_mask_rejects_unknown_names_and_numbers() -> None:
    with pytest.raises(ValueError, match="CAP_NOPE"):
        capability_mask(["CAP_NOPE"])
    with pytest.raises(ValueError, match="64"):
        capability_mask([64])
    assert capability_names(1 << 50) == ["CAP_50"]


def test_capsets_must_be_64_bit_masks() -> None:
    with pytest.raises(ValueError, match="effective"):
        CapSets(-1, 0, 0)
    with pytest.raises(ValueError, match="inheritable"):
        CapSets(0, 0, 1 << 64)


def _status_field(name: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise AssertionError(f"{name} not in /proc/self/status")


def test_capget_of_this_process_matches_proc() -> None:
    caps = sc.capget()
    assert caps == sc.capget(os.getpid())
    assert caps.effective == int(_status_field("CapEff"), 16)
    assert caps.permitted == int(_status_field("CapPrm"), 16)
    assert caps.inheritable == int(_status_field("CapInh"), 16)
    assert caps.effective & ~caps.permitted == 0
    assert caps.permitted < 1 << (sc.CAP_LAST_CAP + 1)


def test_capget_unknown_pid_names_it() -> None:
    with pytest.raises(ProcessLookupError) as info:
        sc.capget(0x7FFFFFF0)
    assert info.value.errno == errno.ESRCH
    assert "capget(pid=2147483632)" in str(info.value)


def test_capset_effective_outside_permitted_fails_with_eperm() -> None:
    # the kernel refuses this before changing anything, as any user
    with pytest.raises(PermissionError) as info:
        sc.capset(CapSets(effective=1 << sc.CAP_CHOWN, permitted=0, inheritable=0))
    assert info.value.errno == errno.EPERM
    assert "capset(effective=0x0000000000000001, permitted=0x0000000000000000" in str(info.value)


# --------------------------------------------------------------------------- #
# errors from the real kernel carry errno and operands (calls that fail first)
# --------------------------------------------------------------------------- #


def test_mount_error_names_paths_and_flags() -> None:
    with pytest.raises(OSError) as info:
        sc.mount("/nonexistent-src", "/nonexistent", "bind", MS_BIND | MS_REC)
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, FileNotFoundError)
    text = str(info.value)
    assert "mount(" in text and "'/nonexistent-src'" in text and "'/nonexistent'" in text
    assert "MS_BIND|MS_REC" in text and os.strerror(errno.ENOENT) in text


def test_umount2_error_names_target_and_flags() -> None:
    with pytest.raises(OSError) as info:
        sc.umount2("/nonexistent-skiff-target", MNT_DETACH)
    assert info.value.errno in (errno.ENOENT, errno.EPERM)
    assert "umount2(target='/nonexistent-skiff-target', flags=MNT_DETACH)" in str(info.value)


def test_relative_paths_are_shown_with_the_working_directory() -> None:
    with pytest.raises(OSError) as info:
        sc.umount2("nonexistent-relative")
    assert f"'nonexistent-relative' (in {os.getcwd()!r})" in str(info.value)


def test_pivot_root_error_names_both_paths() -> None:
    with pytest.raises(OSError) as info:
        sc.pivot_root("/nonexistent-new-root", "/nonexistent-new-root/old")
    assert info.value.errno in (errno.ENOENT, errno.EPERM)
    assert "pivot_root(new_root='/nonexistent-new-root', put_old='/nonexistent-new-root/old')" in str(info.value)


def test_pivot_root_on_unknown_machine_is_enosys() -> None:
    with pytest.raises(OSError) as info:
        LinuxSyscalls(machine="pdp11").pivot_root("/a", "/a/old")
    assert info.value.errno == errno.ENOSYS
    assert "'pdp11'" in str(info.value) and "'/a/old'" in str(info.value)


def test_unshare_unknown_flag_is_einval_with_flags_spelt_out() -> None:
    with pytest.raises(OSError) as info:
        sc.unshare(CLONE_NEWNS | 0x1)
    assert info.value.errno == errno.EINVAL
    assert "unshare(CLONE_NEWNS|0x1)" in str(info.value)


def test_setns_wrong_type_names_fd_and_namespace() -> None:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            sc.setns(fd, CLONE_NEWUTS)  # a net namespace is not a UTS namespace: refused before anything
        assert info.value.errno == errno.EINVAL
        assert f"setns(fd={fd} (net:[" in str(info.value) and "nstype=CLONE_NEWUTS" in str(info.value)
    finally:
        os.close(fd)


def test_setns_bad_fd_is_ebadf() -> None:
    with pytest.raises(OSError) as info:
        sc.setns(987654, CLONE_NEWNET)
    assert info.value.errno == errno.EBADF
    assert "setns(fd=987654, nstype=CLONE_NEWNET)" in str(info.value)


def test_sethostname_too_long_names_the_name() -> None:
    name = "h" * 100
    with pytest.raises(OSError) as info:
        sc.sethostname(name)   # EPERM for a user, EINVAL for root: never succeeds
    assert info.value.errno in (errno.EINVAL, errno.EPERM)
    assert f"sethostname({name!r})" in str(info.value)


def test_prctl_reads_and_errors() -> None:
    assert sc.prctl(sc.PR_GET_NO_NEW_PRIVS) == int(_status_field("NoNewPrivs"))
    in_bounding = int(_status_field("CapBnd"), 16) >> sc.CAP_CHOWN & 1
    assert sc.prctl(sc.PR_CAPBSET_READ, sc.CAP_CHOWN) == in_bounding
    with pytest.raises(OSError) as info:
        sc.prctl(sc.PR_CAPBSET_READ, 63)
    assert info.value.errno == errno.EINVAL
    assert "prctl(PR_CAPBSET_READ, 63)" in str(info.value)
    with pytest.raises(OSError) as info:
        sc.prctl(99999, 7)
    assert info.value.errno == errno.EINVAL and "prctl(99999, 7)" in str(info.value)


# --------------------------------------------------------------------------- #
# calls that change the process: in a child
# --------------------------------------------------------------------------- #


def test_importable_single_threaded_without_grpc() -> None:
    out = run_child("""
        import sys, threading
        import agent.runtime.syscalls
        print(threading.active_count(), "grpc" in sys.modules)
    """)
    assert out.split() == ["1", "False"]


def test_unprivileged_prctl_helpers_in_a_child() -> None:
    out = run_child("""
        import ctypes, signal
        from agent.runtime import syscalls as sc
        sc.set_pdeathsig(signal.SIGTERM)
        sc.set_child_subreaper()
        sc.clear_ambient()
        sc.set_no_new_privs()
        got = ctypes.c_int(-1)
        sc.prctl(sc.PR_GET_PDEATHSIG, ctypes.addressof(got))
        sub = ctypes.c_int(-1)
        sc.prctl(sc.PR_GET_CHILD_SUBREAPER, ctypes.addressof(sub))
        sc.prctl(sc.PR_SET_NAME, b"skiff-test")
        name = open("/proc/self/comm").read().strip()
        print(got.value, sub.value, sc.prctl(sc.PR_GET_NO_NEW_PRIVS), name)
    """)
    assert out.split() == [str(int(signal.SIGTERM)), "1", "1", "skiff-test"]


CLOSE_RANGE_CHILD = """
    import os, sys
    from agent.runtime.syscalls import CLOSE_RANGE_CLOEXEC, LinuxSyscalls
    s = LinuxSyscalls(machine=sys.argv[1])
    r1, w1 = os.pipe(); r2, w2 = os.pipe(); r3, w3 = os.pipe()
    keep, cloexec, gone = sorted((r1, w1)), sorted((r2, w2)), sorted((r3, w3))
    for fd in cloexec:
        os.set_inheritable(fd, True)
    s.close_range(cloexec[0], cloexec[1], CLOSE_RANGE_CLOEXEC)
    s.close_range(gone[0])          # up to ~0
    def is_open(fd):
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False
    print([is_open(fd) for fd in keep], [is_open(fd) and not os.get_inheritable(fd) for fd in cloexec],
          [is_open(fd) for fd in gone], not any(is_open(fd) for fd in range(gone[0], gone[0] + 64)))
"""


@pytest.mark.parametrize("machine", [os.uname().machine, "pdp11"], ids=["syscall", "fallback-loop"])
def test_close_range(machine: str) -> None:
    code = textwrap.dedent(CLOSE_RANGE_CHILD)
    proc = subprocess.run([sys.executable, "-c", code, machine], check=False, capture_output=True, text=True, timeout=20,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True, True] [True, True] [False, False] True"


def test_close_range_argument_checks() -> None:
    with pytest.raises(ValueError, match="first=-1"):
        sc.close_range(-1)
    with pytest.raises(ValueError, match="last"):
        sc.close_range(3, 1 << 33)


# --------------------------------------------------------------------------- #
# RecordingSyscalls
# --------------------------------------------------------------------------- #


def test_implementations_satisfy_the_protocol() -> None:
    assert isinstance(LinuxSyscalls(), Syscalls)
    assert isinstance(RecordingSyscalls(), Syscalls)
    protocol_methods = {n for n in vars(Syscalls) if not n.startswith("_")}
    assert protocol_methods == set(sc._OPERANDS)  # every operation can be recorded and failed


def test_recording_records_every_call_in_order() -> None:
    rec = RecordingSyscalls()
    rec.unshare(CLONE_NEWNS | CLONE_NEWUTS)
    rec.mount(None, "/", None, MS_REC | MS_PRIVATE)
    rec.mount("tmpfs", Path("/r/dev"), "tmpfs", MS_NOSUID, "mode=755")
    rec.pivot_root(Path("/r"), b"/r/.old")
    rec.umount2("/.old", MNT_DETACH)
    rec.sethostname("box")
    rec.drop_bounding_set([8, 0, 0])
    rec.capset(CapSets(1, 1, 0))
    rec.set_no_new_privs()
    rec.close_range(3)
    assert rec.calls == [
        ("unshare", CLONE_NEWNS | CLONE_NEWUTS),
        ("mount", None, "/", None, MS_REC | MS_PRIVATE, None),
        ("mount", "tmpfs", "/r/dev", "tmpfs", MS_NOSUID, "mode=755"),
        ("pivot_root", "/r", "/r/.old"),
        ("umount2", "/.old", MNT_DETACH),
        ("sethostname", "box"),
        ("drop_bounding_set", (0, 8)),
        ("capset", CapSets(1, 1, 0)),
        ("set_no_new_privs",),
        ("close_range", 3, 0xFFFFFFFF, 0),
    ]
    assert rec.names()[:2] == ["unshare", "mount"]
    assert len(rec.calls_of("mount")) == 2


def test_recording_canned_values() -> None:
    rec = RecordingSyscalls(capsets=CapSets(7, 7, 0), returns={"prctl": lambda option, *rest: option + 1})
    assert rec.capget() == CapSets(7, 7, 0)
    rec.capset(CapSets(1, 3, 0))
    assert rec.capget(0) == CapSets(1, 3, 0)
    assert rec.prctl(sc.PR_GET_NO_NEW_PRIVS) == sc.PR_GET_NO_NEW_PRIVS + 1
    rec.returns["prctl"] = 1
    assert rec.prctl(sc.PR_CAPBSET_READ, 0) == 1
    assert RecordingSyscalls().prctl(sc.PR_GET_NO_NEW_PRIVS) == 0


def test_recording_fails_a_chosen_call_with_errno_and_operands() -> None:
    rec = RecordingSyscalls()
    rec.fail("mount", errno.EACCES, match=lambda call: call[2] == "/r/proc")
    rec.mount("tmpfs", "/r/dev", "tmpfs")
    with pytest.raises(PermissionError) as info:
        rec.mount("proc", "/r/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV)
    assert info.value.errno == errno.EACCES
    assert str(info.value).endswith(
        "mount(source='proc', target='/r/proc', fstype='proc', flags=MS_NOSUID|MS_NODEV|MS_NOEXEC, data=None): "
        + os.strerror(errno.EACCES))
    rec.mount("proc", "/r/proc", "proc")  # only once by default
    assert [c[2] for c in rec.calls_of("mount")] == ["/r/dev", "/r/proc", "/r/proc"]  # failures are recorded


def test_recording_fail_times() -> None:
    rec = RecordingSyscalls()
    rec.fail("unshare", errno.EPERM, times=2)
    for _ in range(2):
        with pytest.raises(PermissionError, match=r"unshare\(CLONE_NEWNET\)"):
            rec.unshare(CLONE_NEWNET)
    rec.unshare(CLONE_NEWNET)
    rec.fail("set_no_new_privs", errno.EINVAL, times=None)
    for _ in range(3):
        with pytest.raises(OSError, match=r"set_no_new_privs\(\)"):
            rec.set_no_new_privs()


def test_recording_fail_rejects_unknown_operation() -> None:
    with pytest.raises(ValueError, match="mountt"):
        RecordingSyscalls().fail("mountt", errno.EPERM)


def test_logic_above_can_be_driven_by_the_fake() -> None:
    """What the runtime will do: the same code against either implementation."""

    def enter_root(s: Syscalls, root: str) -> None:
        s.mount(None, "/", None, MS_REC | MS_PRIVATE)
        s.mount(root, root, None, MS_BIND | MS_REC)
        s.pivot_root(root, root + "/.old")
        s.umount2("/.old", MNT_DETACH)

    rec = RecordingSyscalls()
    rec.fail("pivot_root", errno.EINVAL)
    with pytest.raises(OSError, match="new_root='/r'"):
        enter_root(rec, "/r")
    assert rec.names() == ["mount", "mount", "pivot_root"]
