"""agent.runtime.seccomp against the real kernel, as root.

Each filter is loaded in a child interpreter (``python -c``), never in the
pytest process: a seccomp filter cannot be removed, and it would outlive the
test.  The child reports what it saw as one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.errors import Internal
from agent.runtime import seccomp
from agent.runtime.seccomp import default_profile

ROOT = Path(__file__).resolve().parents[2]


def _missing_feature() -> str:
    """Why these tests cannot run here (empty when they can)."""
    status = Path("/proc/self/status").read_text()
    if "Seccomp:" not in status:
        return "kernel without CONFIG_SECCOMP (no Seccomp: line in /proc/self/status)"
    try:
        seccomp.load_binding()
    except Internal as exc:
        return f"needs libseccomp's Python binding: {exc}"
    return ""


pytestmark = pytest.mark.skipif(bool(_missing_feature()), reason=_missing_feature() or "-")

PRELUDE = """\
import ctypes, errno, json, os, socket, subprocess, sys
from agent.runtime import seccomp
libc = ctypes.CDLL(None, use_errno=True)

def err(rc):
    return 0 if rc == 0 else errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())

def seccomp_mode():
    for line in open("/proc/self/status"):
        if line.startswith("Seccomp:"):
            return int(line.split()[1])

profile = json.loads(sys.argv[1])
"""


def run_child(body: str, profile: dict[str, Any], *, check: bool = True) -> Any:
    """Run PRELUDE + ``body`` in a fresh interpreter with ``profile`` as argv[1]; its last stdout line, parsed."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), json.dumps(profile)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    if not check:
        return proc
    assert proc.returncode == 0, f"child failed ({proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_profile_denies_namespaces_mounts_and_keyrings(tmp_path: Path) -> None:
    seen = run_child(f"""
        before = seccomp_mode()
        seccomp.apply(profile)
        out = {{"before": before, "after": seccomp_mode()}}
        out["unshare"] = err(libc.unshare(0x04000000))                       # CLONE_NEWUTS
        out["mount"] = err(libc.mount(b"none", b"{tmp_path}", b"tmpfs", 0, None))
        out["keyctl"] = err(libc.syscall(250, 0, 0, 0, 0, 0))                # keyctl(KEYCTL_GET_KEYRING_ID)
        out["add_key"] = err(libc.syscall(248, b"user", b"k", b"v", 1, -2))
        out["af_alg"] = None
        try:
            socket.socket(38, socket.SOCK_SEQPACKET)
        except OSError as e:
            out["af_alg"] = errno.errorcode[e.errno]
        libc.syscall.restype = ctypes.c_long
        out["clone3"] = err(libc.syscall(435, None, 0))                    # ENOSYS: libc falls back to clone
        print(json.dumps(out))
    """, default_profile())
    assert seen["before"] in (0, 2)  # 2 when the test itself already runs under a filter
    assert seen["after"] == 2
    assert seen["unshare"] == "EPERM"
    assert seen["mount"] == "EPERM"
    assert seen["keyctl"] == "EPERM"
    assert seen["add_key"] == "EPERM"
    assert seen["af_alg"] == "EPERM"
    assert seen["clone3"] == "ENOSYS"


def test_default_profile_lets_ordinary_work_through(tmp_path: Path) -> None:
    seen = run_child(f"""
        seccomp.apply(profile)
        path = os.path.join("{tmp_path}", "f")
        with open(path, "w") as f:
            f.write("hello")
        with open(path) as f:
            data = f.read()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        true = subprocess.run(["/bin/true"]).returncode           # posix_spawn: clone3, then clone
        sh = subprocess.run(["/bin/sh", "-c", "echo $((6*7))"], capture_output=True, text=True).stdout.strip()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.close()
        print(json.dumps({{"data": data, "fork": os.waitstatus_to_exitcode(status), "true": true, "sh": sh,
                          "mode": seccomp_mode()}}))
    """, default_profile())
    assert seen == {"data": "hello", "fork": 7, "true": 0, "sh": "42", "mode": 2}


def test_cap_sys_admin_profile_allows_unshare() -> None:
    seen = run_child("""
        seccomp.apply(profile)
        print(json.dumps({"unshare": err(libc.unshare(0x04000000)), "mode": seccomp_mode()}))
    """, default_profile(capabilities=["CAP_SYS_ADMIN", "CAP_SYS_CHROOT"]))
    assert seen == {"unshare": 0, "mode": 2}


def test_errno_action_returns_the_configured_errno(tmp_path: Path) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 18},    # EXDEV
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97,              # EAFNOSUPPORT
             "args": [{"index": 0, "value": 10, "op": "SCMP_CMP_EQ"}]},                     # AF_INET6 only
            {"names": ["no_such_syscall_anywhere"], "action": "SCMP_ACT_KILL"},             # skipped, as runc
        ],
    }
    seen = run_child(f"""
        seccomp.apply(profile)
        out = {{}}
        try:
            os.mkdir(os.path.join("{tmp_path}", "d"))
            out["mkdir"] = 0
        except OSError as e:
            out["mkdir"] = errno.errorcode[e.errno]
        try:
            socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            out["inet6"] = 0
        except OSError as e:
            out["inet6"] = errno.errorcode[e.errno]
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        out["inet"] = 0
        print(json.dumps(out))
    """, profile)
    assert seen == {"mkdir": "EXDEV", "inet6": "EAFNOSUPPORT", "inet": 0}
    assert not (tmp_path / "d").exists()


def test_kill_process_action_kills_with_sigsys() -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["uname"], "action": "SCMP_ACT_KILL_PROCESS"}]}
    proc = run_child("""
        seccomp.apply(profile)
        print("loaded", flush=True)
        os.uname()
        print("survived", flush=True)
    """, profile, check=False)
    assert proc.returncode == -signal.SIGSYS, proc.stderr
    assert proc.stdout.split() == ["loaded"]


def test_load_needs_no_new_privs_or_cap_sys_admin() -> None:
    seen = run_child("""
        seccomp.load_binding()                                  # as the init does, while it still can
        os.setresuid(65534, 65534, 65534)                       # drops every effective capability
        try:
            seccomp.apply(profile)
            refused = None
        except OSError as e:
            refused = errno.errorcode[e.errno]
        libc.prctl(38, 1, 0, 0, 0)                              # PR_SET_NO_NEW_PRIVS
        seccomp.apply(profile)
        print(json.dumps({"refused": refused, "mode": seccomp_mode()}))
    """, default_profile())
    assert seen == {"refused": "EACCES", "mode": 2}


def test_binding_loads_in_this_interpreter() -> None:
    binding = seccomp.load_binding()
    assert hasattr(binding, "SyscallFilter")
    assert os.path.basename(binding.__file__).startswith("seccomp.")
