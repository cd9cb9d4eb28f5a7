"""agent.runtime.seccomp without the kernel: Docker's default profile, Docker profile files, validation."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.errors import Internal, InvalidArgument
from agent.runtime import seccomp
from agent.runtime.seccomp import default_profile, kernel_version, load_profile_file, profile_from_docker, validate

AMD64: dict[str, Any] = {"arch": "amd64", "kernel": (6, 1)}
CLONE_NEWUTS, CLONE_NEWUSER, CLONE_VM, SIGCHLD = 0x04000000, 0x10000000, 0x100, 17
DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")


def verdict(profile: dict[str, Any], name: str, *args: int) -> tuple[str, int | None]:
    """What the filter does to ``name(*args)``: the first entry that matches, else the default.

    Good enough for these profiles, whose entries for one syscall never disagree.
    """
    def holds(cond: dict[str, Any]) -> bool:
        arg = args[cond["index"]] if cond["index"] < len(args) else 0
        value, two = cond["value"], cond.get("valueTwo", 0)
        return {"SCMP_CMP_EQ": arg == value, "SCMP_CMP_NE": arg != value, "SCMP_CMP_LT": arg < value,
                "SCMP_CMP_LE": arg <= value, "SCMP_CMP_GT": arg > value, "SCMP_CMP_GE": arg >= value,
                "SCMP_CMP_MASKED_EQ": arg & value == two}[cond["op"]]

    for entry in profile["syscalls"]:
        if name in entry["names"] and all(holds(c) for c in entry.get("args", [])):
            return entry["action"], entry.get("errnoRet")
    return profile["defaultAction"], profile.get("defaultErrnoRet")


def allowed(profile: dict[str, Any], name: str, *args: int) -> bool:
    return verdict(profile, name, *args)[0] == "SCMP_ACT_ALLOW"


# --- default profile ----------------------------------------------------------


def test_default_profile_is_oci_shaped_and_valid() -> None:
    p = default_profile(**AMD64)
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    assert p["defaultErrnoRet"] == errno.EPERM
    assert p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    for entry in p["syscalls"]:
        assert set(entry) <= {"names", "action", "errnoRet", "args"}
        assert entry["names"] and all(isinstance(n, str) for n in entry["names"])
    validate(p)
    json.dumps(p)  # goes into config.json as is


@pytest.mark.parametrize("name", ["read", "write", "openat", "execve", "fork", "vfork", "exit_group", "mmap",
                                  "futex", "epoll_wait", "setuid", "capset", "prctl", "chroot", "arch_prctl",
                                  "socketpair", "getrandom", "rt_sigreturn", "ptrace", "process_vm_readv"])
def test_default_profile_allows_ordinary_syscalls(name: str) -> None:
    assert allowed(default_profile(**AMD64), name)


@pytest.mark.parametrize("name", ["mount", "umount2", "unshare", "setns", "pivot_root", "keyctl", "add_key",
                                  "request_key", "reboot", "kexec_load", "init_module", "finit_module", "bpf",
                                  "perf_event_open", "settimeofday", "clock_settime", "acct", "iopl", "swapon",
                                  "open_by_handle_at", "syslog", "io_uring_setup", "userfaultfd", "kcmp",
                                  "sethostname", "vhangup", "mbind", "fsopen", "move_mount"])
def test_default_profile_denies_privileged_syscalls(name: str) -> None:
    assert verdict(default_profile(**AMD64), name) == ("SCMP_ACT_ERRNO", errno.EPERM)


def test_clone_without_namespace_flags_only_and_clone3_enosys() -> None:
    p = default_profile(**AMD64)
    assert allowed(p, "clone", SIGCHLD)
    assert allowed(p, "clone", CLONE_VM | SIGCHLD)
    assert not allowed(p, "clone", CLONE_NEWUTS | SIGCHLD)
    assert not allowed(p, "clone", CLONE_NEWUSER)
    assert verdict(p, "clone3") == ("SCMP_ACT_ERRNO", errno.ENOSYS)


def test_clone_flags_are_the_second_argument_on_s390x() -> None:
    p = default_profile(arch="s390x", kernel=(6, 1))
    assert p["architectures"] == ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]
    assert allowed(p, "clone", CLONE_NEWUTS, SIGCHLD)
    assert not allowed(p, "clone", 0, CLONE_NEWUTS)


def test_socket_denies_af_alg_and_af_vsock_only() -> None:
    p = default_profile(**AMD64)
    for family in (1, 2, 10, 16, 17, 37, 39, 41, 45):  # unix, inet, inet6, netlink, packet, ..., beyond vsock
        assert allowed(p, "socket", family), family
    assert not allowed(p, "socket", 38)  # AF_ALG
    assert not allowed(p, "socket", 40)  # AF_VSOCK


def test_personality_only_for_docker_personas() -> None:
    p = default_profile(**AMD64)
    for persona in (0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert allowed(p, "personality", persona)
    assert not allowed(p, "personality", 0x0040000)  # ADDR_NO_RANDOMIZE


def test_ptrace_needs_kernel_4_8_or_cap_sys_ptrace() -> None:
    assert not allowed(default_profile(arch="amd64", kernel=(4, 4)), "ptrace")
    assert allowed(default_profile(arch="amd64", kernel=(4, 8)), "ptrace")
    old_with_cap = default_profile(arch="amd64", kernel=(4, 4), capabilities=["CAP_SYS_PTRACE"])
    assert allowed(old_with_cap, "ptrace") and allowed(old_with_cap, "kcmp")


def test_arch_specific_syscalls() -> None:
    arm64 = default_profile(arch="arm64", kernel=(6, 1))
    assert arm64["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert allowed(arm64, "set_tls") and not allowed(arm64, "arch_prctl")
    assert default_profile(arch="x86_64", kernel=(6, 1)) == default_profile(**AMD64)  # uname names too
    assert default_profile(arch="ppc64le", kernel=(6, 1))["architectures"] == []  # native only, as Docker


def test_cap_sys_admin_unlocks_namespaces_and_mounts() -> None:
    p = default_profile(capabilities=["CAP_SYS_ADMIN", "CAP_SYS_CHROOT"], **AMD64)
    for name in ("mount", "umount2", "unshare", "setns", "sethostname", "bpf", "perf_event_open", "fsopen"):
        assert allowed(p, name), name
    assert allowed(p, "clone", CLONE_NEWUTS | SIGCHLD)
    assert allowed(p, "clone3")
    assert not allowed(p, "keyctl")


@pytest.mark.parametrize(("cap", "names"), [
    ("CAP_SYS_PTRACE", ("kcmp", "pidfd_getfd", "process_madvise")),
    ("CAP_SYS_TIME", ("settimeofday", "clock_settime", "stime")),
    ("CAP_SYS_MODULE", ("init_module", "finit_module", "delete_module")),
    ("CAP_SYS_BOOT", ("reboot",)),
    ("CAP_SYS_RAWIO", ("iopl", "ioperm")),
    ("CAP_SYS_NICE", ("mbind", "set_mempolicy", "get_mempolicy")),
    ("CAP_SYS_PACCT", ("acct",)),
    ("CAP_SYSLOG", ("syslog",)),
    ("CAP_BPF", ("bpf",)),
    ("CAP_PERFMON", ("perf_event_open",)),
    ("CAP_DAC_READ_SEARCH", ("open_by_handle_at",)),
    ("CAP_SYS_TTY_CONFIG", ("vhangup",)),
])
def test_cap_add_unlocks_its_syscalls(cap: str, names: tuple[str, ...]) -> None:
    without = default_profile(**AMD64)
    with_cap = default_profile(capabilities=[*DEFAULT_CAPS, cap], **AMD64)
    for name in names:
        assert not allowed(without, name) and allowed(with_cap, name), name
    assert not allowed(with_cap, "mount")


def test_capability_names_are_normalised_and_chroot_follows_its_cap() -> None:
    assert default_profile(capabilities=["sys_time"], **AMD64) == default_profile(
        capabilities=["CAP_SYS_TIME"], **AMD64)
    assert not allowed(default_profile(capabilities=["CAP_CHOWN"], **AMD64), "chroot")


def test_default_capabilities_are_dockers() -> None:
    assert default_profile(**AMD64) == default_profile(capabilities=DEFAULT_CAPS, **AMD64)


def test_kernel_version() -> None:
    assert kernel_version("6.1.0-18-amd64") == (6, 1)
    assert kernel_version("4.19.282") == (4, 19)
    assert len(kernel_version()) == 2


def test_importing_the_module_does_not_import_the_binding() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, agent.runtime.seccomp; print('seccomp' in sys.modules)"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_missing_binding_is_internal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(seccomp, "_binding", None)
    monkeypatch.setitem(sys.modules, "seccomp", None)  # "import seccomp" raises ImportError
    with pytest.raises(Internal, match="python3-seccomp"):
        seccomp.load_binding([str(tmp_path)])


# --- Docker profile files ---------------------------------------------------------------


DOCKER_PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,
    "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
    ],
    "syscalls": [
        {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW", "comment": "basics"},
        {"name": "getpid", "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]},
         "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
        {"names": ["set_tls"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm", "arm64"]}},
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 18},
        {"names": ["uname"], "action": "SCMP_ACT_KILL_PROCESS"},
    ],
}


def write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_load_profile_file_converts_docker_form(tmp_path: Path) -> None:
    p = load_profile_file(write(tmp_path, DOCKER_PROFILE), **AMD64)
    assert p["defaultAction"] == "SCMP_ACT_ERRNO" and p["defaultErrnoRet"] == 1
    assert p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert "archMap" not in p
    assert allowed(p, "read") and allowed(p, "getpid") and allowed(p, "ptrace")
    assert not allowed(p, "mount") and not allowed(p, "set_tls")
    assert allowed(p, "clone", SIGCHLD) and not allowed(p, "clone", CLONE_NEWUTS)
    assert verdict(p, "mkdir") == ("SCMP_ACT_ERRNO", 18)
    assert verdict(p, "uname") == ("SCMP_ACT_KILL_PROCESS", None)
    validate(p)


def test_load_profile_file_resolves_caps_arches_and_kernel(tmp_path: Path) -> None:
    path = write(tmp_path, DOCKER_PROFILE)
    admin = load_profile_file(path, arch="arm64", capabilities=["CAP_SYS_ADMIN"], kernel=(4, 4))
    assert admin["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert allowed(admin, "mount") and allowed(admin, "set_tls")
    assert not allowed(admin, "ptrace")
    assert not any("clone" in e["names"] for e in admin["syscalls"])  # excluded by CAP_SYS_ADMIN


def test_oci_form_file_passes_through(tmp_path: Path) -> None:
    oci = default_profile(**AMD64)
    assert load_profile_file(write(tmp_path, oci), **AMD64) == oci


@pytest.mark.parametrize(("change", "field"), [
    ({"defaultAction": "SCMP_ACT_SOMETIMES"}, "defaultAction"),
    ({"defaultAction": None}, "defaultAction"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_MAYBE"}]}, "syscalls[0].action"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]}, "syscalls[0].action"),
    ({"syscalls": [{"name": "read", "names": ["write"], "action": "SCMP_ACT_ALLOW"}]}, "syscalls[0]"),
    ({"syscalls": [{"names": [], "action": "SCMP_ACT_ALLOW"}]}, "syscalls[0].names"),
    ({"syscalls": [{"names": "read", "action": "SCMP_ACT_ALLOW"}]}, "syscalls[0].names"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": -1}]}, "syscalls[0].errnoRet"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]}, "syscalls[0].args[0].index"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_LIKE"}]}]}, "syscalls[0].args[0].op"),
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "four"}}]},
     "syscalls[0].includes.minKernel"),
    ({"architectures": ["SCMP_ARCH_X86_64"]}, "architectures"),  # and archMap: one or the other
    ({"flags": ["SECCOMP_FILTER_FLAG_BOGUS"]}, "flags"),
    ({"syscalls": {"names": ["read"]}}, "syscalls"),
])
def test_load_profile_file_rejects_malformed_fields(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    path = write(tmp_path, {**DOCKER_PROFILE, **change})
    with pytest.raises(InvalidArgument) as info:
        load_profile_file(path, **AMD64)
    message = str(info.value)
    assert str(path) in message and f"{field}:" in message and "\n" not in message


def test_load_profile_file_unreadable_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_profile_file(tmp_path / "missing.json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        load_profile_file(write(tmp_path, "{nope"))
    with pytest.raises(InvalidArgument, match="want a JSON object"):
        load_profile_file(write(tmp_path, "[]"))


def test_from_docker_legacy_architectures_list() -> None:
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
           "syscalls": [{"names": ["keyctl"], "action": "SCMP_ACT_ERRNO"}]}
    p = profile_from_docker(doc, **AMD64)
    assert p["architectures"] == ["SCMP_ARCH_X86_64"]
    assert verdict(p, "keyctl") == ("SCMP_ACT_ERRNO", None) and allowed(p, "read")


@pytest.mark.parametrize(("profile", "field"), [
    ([], "profile"),
    ({"syscalls": []}, "defaultAction"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}, "architectures"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": "EPERM"}, "defaultErrnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_KILL"}]}, "syscalls[0].names"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL",
                                                       "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]},
     "syscalls[0].args[0].value"),
])
def test_validate_names_the_bad_field(profile: Any, field: str) -> None:
    with pytest.raises(InvalidArgument, match="^seccomp profile: " + re.escape(field) + ":"):
        validate(profile)
