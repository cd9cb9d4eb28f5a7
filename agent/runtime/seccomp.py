"""Seccomp for containers: Docker's default profile, Docker profile files, and loading a filter.

Binding: libseccomp's own Python binding, from Debian's ``python3-seccomp``
(one Cython extension with libseccomp linked in statically; it needs only libc).
It is built for Debian's CPython 3.11, and CPython keeps its ABI within a
minor release, so our 3.11 venv loads it by path when the file's ABI tag
(``.cpython-311-x86_64-linux-gnu.so``) is this interpreter's; PyPI's
``pyseccomp`` is an unmaintained ctypes copy of the same API (last release 2021).

Profiles travel in OCI runtime-spec form (``linux.seccomp``).
:func:`default_profile` renders Docker's default for a capability set, an
architecture and a kernel; :func:`load_profile_file` / :func:`profile_from_docker`
turn a Docker profile (``archMap``, ``names``, ``includes``/``excludes``)
into OCI form the way dockerd does; :func:`validate` checks an OCI profile
without touching the kernel; :func:`apply` loads one for the calling process.

What :func:`apply` requires of its caller (the container init; runc's order):

* One thread (no TSYNC), and :func:`load_binding` already called *before*
  ``pivot_root``: the extension lives on the host's filesystem.
* The kernel takes a filter only from a task with ``no_new_privs`` set or
  CAP_SYS_ADMIN in its effective set; :func:`apply` never sets
  ``no_new_privs`` (libseccomp's NNP attribute is off), else ``OSError(EACCES)``.
* ``process.noNewPrivileges`` true: set it, drop the bounding set, setgroups/
  setresgid/setresuid, capset, then the ready/start handshake, and call
  :func:`apply` last, immediately before ``execve`` (fewest syscalls under the
  filter).
* ``process.noNewPrivileges`` false: call :func:`apply` as late as the init
  still holds CAP_SYS_ADMIN, i.e. after ``close_fds`` and before the bounding
  set is dropped and the uid/gids and capabilities change.  Those calls, the
  handshake and ``execve`` then run under the filter: Docker's default allows
  them, and a custom profile must too (as with runc).
"""

from __future__ import annotations

import errno as _errno
import importlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from agent.errors import Internal, InvalidArgument


def _n(words: str) -> tuple[str, ...]:
    return tuple(words.split())


ALLOW = "SCMP_ACT_ALLOW"
ERRNO = "SCMP_ACT_ERRNO"
#: every action the loader takes (SCMP_ACT_NOTIFY needs a listener: refused)
ACTIONS = frozenset("SCMP_ACT_" + a for a in _n("ALLOW ERRNO KILL KILL_THREAD KILL_PROCESS TRAP TRACE LOG"))
OPERATORS = frozenset("SCMP_CMP_" + o for o in _n("NE LT LE EQ GE GT MASKED_EQ"))
ARCHES = frozenset("SCMP_ARCH_" + a for a in _n("""
    X86 X86_64 X32 ARM AARCH64 MIPS MIPS64 MIPS64N32 MIPSEL MIPSEL64 MIPSEL64N32 PPC PPC64 PPC64LE S390 S390X PARISC
    PARISC64 RISCV64 LOONGARCH64 M68K SH SHEB"""))
#: OCI filter flag -> libseccomp attribute set to 1
FLAGS = {"SECCOMP_FILTER_FLAG_LOG": "CTL_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW": "CTL_SSB",
         "SECCOMP_FILTER_FLAG_TSYNC": "CTL_TSYNC"}

#: where Debian's python3-seccomp puts the extension
BINDING_DIRS: tuple[str, ...] = ("/usr/lib/python3/dist-packages",)

# --- Docker's default profile, as data ---------------------------------------


# Allowed to everyone, roughly by theme.  Names a libseccomp does not know are skipped at load.
_FILES = _n("""
    access chdir chmod chown chown32 close close_range copy_file_range creat dup dup2 dup3 faccessat faccessat2
    fadvise64 fadvise64_64 fallocate fchdir fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64
    fdatasync flock fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futimesat getcwd getdents
    getdents64 lchown lchown32 link linkat _llseek lseek lstat lstat64 mkdir mkdirat mknod mknodat name_to_handle_at
    newfstatat open openat openat2 pread64 preadv preadv2 pwrite64 pwritev pwritev2 read readahead readlink
    readlinkat readv rename renameat renameat2 rmdir sendfile sendfile64 splice stat stat64 statfs statfs64 statx
    symlink symlinkat sync sync_file_range syncfs tee truncate truncate64 umask unlink unlinkat utime utimensat
    utimensat_time64 utimes vmsplice write writev cachestat fanotify_mark listmount statmount fgetxattr flistxattr
    fremovexattr fsetxattr getxattr getxattrat lgetxattr listxattr listxattrat llistxattr lremovexattr lsetxattr
    removexattr removexattrat setxattr setxattrat
""")
_IO_IPC_NET = _n("""
    epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd
    eventfd2 inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel io_destroy io_getevents
    io_pgetevents io_pgetevents_time64 io_setup io_submit ioctl _newselect pause pipe pipe2 poll ppoll ppoll_time64
    pselect6 pselect6_time64 select signalfd signalfd4 timerfd_create timerfd_gettime timerfd_gettime64
    timerfd_settime timerfd_settime64 futex futex_requeue futex_time64 futex_wait futex_waitv futex_wake ipc
    mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64
    mq_unlink msgctl msgget msgrcv msgsnd semctl semget semop semtimedop semtimedop_time64 shmat shmctl shmdt shmget
    accept accept4 bind connect getpeername getsockname getsockopt listen recv recvfrom recvmmsg recvmmsg_time64
    recvmsg send sendmmsg sendmsg sendto setsockopt shutdown socketcall socketpair getrandom
""")
_PROCESS = _n("""
    capget capset execve execveat exit exit_group fork getcpu getegid getegid32 geteuid geteuid32 getgid getgid32
    getgroups getgroups32 getpgid getpgrp getpid getppid getpriority getresgid getresgid32 getresuid getresuid32
    getrlimit get_robust_list getrusage getsid get_thread_area gettid getuid getuid32 ioprio_get ioprio_set kill
    landlock_add_rule landlock_create_ruleset landlock_restrict_self membarrier pidfd_open pidfd_send_signal prctl
    prlimit64 process_mrelease restart_syscall rseq sched_getaffinity sched_getattr sched_getparam
    sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
    sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield
    seccomp setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setpgid setpriority
    setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit set_robust_list
    setsid set_thread_area set_tid_address setuid setuid32 sysinfo tgkill times tkill ugetrlimit uname uretprobe
    vfork wait4 waitid waitpid rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
    rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sigaltstack sigprocmask sigreturn adjtimex alarm
    clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep
    clock_nanosleep_time64 getitimer gettimeofday nanosleep setitimer time timer_create timer_delete
    timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
""")
_MEMORY = _n("""
    brk madvise map_shadow_stack memfd_create memfd_secret mincore mlock mlock2 mlockall mmap mmap2 mprotect mremap
    mseal msync munlock munlockall munmap pkey_alloc pkey_free pkey_mprotect remap_file_pages riscv_hwprobe
""")

#: clone flags that create namespaces: clone with any of them needs CAP_SYS_ADMIN
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x02000000
AF_ALG, AF_VSOCK = 38, 40


class _Rule(NamedTuple):
    """One Docker profile entry: names, action, and when it applies (Docker's includes/excludes)."""

    names: tuple[str, ...]
    action: str = ALLOW
    errno: int | None = None
    args: tuple[tuple[int, int, int, str], ...] = ()   # (index, value, valueTwo, op)
    caps: tuple[str, ...] = ()          # applies only if every one is in the set
    not_caps: tuple[str, ...] = ()      # skipped if any one is in the set
    arches: tuple[str, ...] = ()        # Go architecture names
    not_arches: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None
    not_min_kernel: tuple[int, int] | None = None


def _cap(names: str, cap: str) -> _Rule:
    return _Rule(_n(names), caps=(cap,))


_S390 = ("s390", "s390x")
# Docker 29's moby/profiles allows unshare to everyone; skiff keeps it behind
# CAP_SYS_ADMIN as Docker 28 and earlier, containerd and CRI-O do.
DEFAULT_RULES: tuple[_Rule, ...] = (
    _Rule(_FILES + _IO_IPC_NET + _PROCESS + _MEMORY),
    _Rule(_n("process_vm_readv process_vm_writev ptrace"), min_kernel=(4, 8)),
    # every address family but AF_ALG (kernel crypto, CVE-2026-31431) and AF_VSOCK
    _Rule(("socket",), args=((0, AF_ALG, 0, "SCMP_CMP_LT"),)),
    _Rule(("socket",), args=((0, AF_ALG + 1, 0, "SCMP_CMP_EQ"),)),
    _Rule(("socket",), args=((0, AF_VSOCK, 0, "SCMP_CMP_GT"),)),
    # PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and the query
    *(_Rule(("personality",), args=((0, p, 0, "SCMP_CMP_EQ"),)) for p in (0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)),
    _Rule(_n("sync_file_range2 swapcontext"), arches=("ppc64le",)),
    _Rule(_n("arm_fadvise64_64 arm_sync_file_range sync_file_range2 breakpoint cacheflush set_tls"),
          arches=("arm", "arm64")),
    _Rule(("arch_prctl",), arches=("amd64", "x32")),
    _Rule(("modify_ldt",), arches=("amd64", "x32", "x86")),
    _Rule(_n("s390_pci_mmio_read s390_pci_mmio_write s390_runtime_instr"), arches=_S390),
    _Rule(("riscv_flush_icache",), arches=("riscv64",)),
    _cap("open_by_handle_at", "CAP_DAC_READ_SEARCH"),
    _cap("""bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie lsm_get_self_attr
         lsm_list_modules lsm_set_self_attr mount mount_setattr move_mount open_tree perf_event_open
         quotactl quotactl_fd setdomainname sethostname setns syslog umount umount2 unshare""", "CAP_SYS_ADMIN"),
    # without CAP_SYS_ADMIN: clone without namespace flags (s390 swaps the first two arguments) ...
    _Rule(("clone",), args=((0, CLONE_NAMESPACE_FLAGS, 0, "SCMP_CMP_MASKED_EQ"),),
          not_caps=("CAP_SYS_ADMIN",), not_arches=_S390),
    _Rule(("clone",), args=((1, CLONE_NAMESPACE_FLAGS, 0, "SCMP_CMP_MASKED_EQ"),),
          not_caps=("CAP_SYS_ADMIN",), arches=_S390),
    # ... and clone3, whose flags sit behind a pointer, fails with ENOSYS so libc falls back to clone
    _Rule(("clone3",), action=ERRNO, errno=_errno.ENOSYS, not_caps=("CAP_SYS_ADMIN",)),
    _cap("reboot", "CAP_SYS_BOOT"),
    _cap("chroot", "CAP_SYS_CHROOT"),
    _cap("delete_module init_module finit_module", "CAP_SYS_MODULE"),
    _cap("acct", "CAP_SYS_PACCT"),
    _cap("kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace", "CAP_SYS_PTRACE"),
    _cap("iopl ioperm", "CAP_SYS_RAWIO"),
    _cap("settimeofday stime clock_settime clock_settime64", "CAP_SYS_TIME"),
    _cap("vhangup", "CAP_SYS_TTY_CONFIG"),
    _cap("get_mempolicy mbind set_mempolicy set_mempolicy_home_node", "CAP_SYS_NICE"),
    _cap("syslog", "CAP_SYSLOG"),
    _cap("bpf", "CAP_BPF"),
    _cap("perf_event_open", "CAP_PERFMON"),
)

#: Docker's archMap: the native architecture and the ones its kernel also runs
ARCH_MAP: dict[str, tuple[str, ...]] = {"SCMP_ARCH_" + k: tuple("SCMP_ARCH_" + a for a in _n(v)) for k, v in {
    "X86_64": "X86 X32", "AARCH64": "ARM", "MIPS64": "MIPS MIPS64N32", "MIPS64N32": "MIPS MIPS64",
    "MIPSEL64": "MIPSEL MIPSEL64N32", "MIPSEL64N32": "MIPSEL MIPSEL64", "S390X": "S390", "RISCV64": ""}.items()}
#: Go architecture name (what Docker's profile filters on) -> libseccomp's
GO_TO_SCMP: dict[str, str] = {
    "386": "X86", "amd64": "X86_64", "arm": "ARM", "arm64": "AARCH64", "mips": "MIPS", "mipsle": "MIPSEL",
    "mips64": "MIPS64", "mips64le": "MIPSEL64", "mips64p32": "MIPS64N32", "mips64p32le": "MIPSEL64N32",
    "ppc": "PPC", "ppc64": "PPC64", "ppc64le": "PPC64LE", "riscv64": "RISCV64", "s390": "S390",
    "s390x": "S390X", "loong64": "LOONGARCH64",
}
_UNAME_TO_GO = {"x86_64": "amd64", "i386": "386", "i686": "386", "aarch64": "arm64", "armv7l": "arm",
                "armv6l": "arm", "mips64el": "mips64le", "loongarch64": "loong64"}


class _Env(NamedTuple):
    arch: str
    caps: frozenset[str]
    kernel: tuple[int, int]


def _env(arch: str | None, capabilities: Iterable[str] | None, kernel: tuple[int, int] | None) -> _Env:
    machine = arch or platform.machine()
    if capabilities is None:
        from agent.runtime.spec import DEFAULT_CAPABILITIES  # here: spec will import this module
        capabilities = DEFAULT_CAPABILITIES
    upper = (c.upper() for c in capabilities)
    caps = frozenset(c if c.startswith("CAP_") else "CAP_" + c for c in upper)
    return _Env(_UNAME_TO_GO.get(machine, machine), caps, kernel or kernel_version())


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``release`` or of the running kernel (``6.1.0-18-amd64`` -> (6, 1))."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _applies(rule: _Rule, env: _Env) -> bool:
    """Docker's includes (all must hold) and excludes (any one skips the rule)."""
    return not (env.arch in rule.not_arches or any(c in env.caps for c in rule.not_caps)
                or (rule.not_min_kernel is not None and env.kernel >= rule.not_min_kernel)
                or (rule.arches and env.arch not in rule.arches) or not all(c in env.caps for c in rule.caps)
                or (rule.min_kernel is not None and env.kernel < rule.min_kernel))


def _render(rules: Iterable[_Rule], env: _Env) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in rules:
        if not _applies(r, env):
            continue
        entry: dict[str, Any] = {"names": list(r.names), "action": r.action}
        if r.errno is not None:
            entry["errnoRet"] = r.errno
        if r.args:
            entry["args"] = [{"index": i, "value": v, "valueTwo": v2, "op": op} for i, v, v2, op in r.args]
        out.append(entry)
    return out


def _architectures(env: _Env, arch_map: Mapping[str, Sequence[str]]) -> list[str]:
    native = "SCMP_ARCH_" + GO_TO_SCMP.get(env.arch, env.arch.upper())
    return [native, *arch_map[native]] if native in arch_map else []


def default_profile(arch: str | None = None, capabilities: Iterable[str] | None = None,
                    kernel: tuple[int, int] | None = None) -> dict[str, Any]:
    """Docker's default seccomp profile in OCI form, for a container with ``capabilities``.

    ``capabilities`` is the container's bounding set (default: Docker's 14);
    ``arch`` a Go (``amd64``) or uname (``x86_64``) name, default this
    machine's; ``kernel`` (major, minor), default the running kernel's.
    """
    env = _env(arch, capabilities, kernel)
    return {"defaultAction": ERRNO, "defaultErrnoRet": _errno.EPERM,
            "architectures": _architectures(env, ARCH_MAP), "syscalls": _render(DEFAULT_RULES, env)}


# --- profile fields ------------------------------------------------------------


def _fail(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"seccomp profile: {field}: {problem}")


def _uint(value: Any, field: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise _fail(field, f"want an integer in 0..{limit}, got {value!r}")
    return value


def _action(value: Any, ret: Any, field: str, ret_field: str) -> tuple[str, int]:
    if value not in ACTIONS:
        raise _fail(field, f"unknown or unsupported action {value!r}")
    if value in (ERRNO, "SCMP_ACT_TRACE"):
        return value, _errno.EPERM if ret is None else _uint(ret, ret_field, 0xFFFF)
    return value, 0


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(field, f"want a list of strings, got {value!r}")
    return tuple(value)


def _version(value: Any, field: str) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)", value) if isinstance(value, str) else None
    if not m:
        raise _fail(field, f"want a kernel version like '4.8', got {value!r}")
    return int(m.group(1)), int(m.group(2))


def _filter(value: Any, field: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, int] | None]:
    if value is None:
        return (), (), None
    if not isinstance(value, dict):
        raise _fail(field, f"want an object, got {value!r}")
    return (_strings(value.get("caps"), f"{field}.caps"), _strings(value.get("arches"), f"{field}.arches"),
            _version(value.get("minKernel"), f"{field}.minKernel"))


def _args(value: Any, field: str) -> tuple[tuple[int, int, int, str], ...]:
    """``syscalls[i].args`` as (index, value, valueTwo, op) tuples."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(f"{field}.args", f"want a list, got {value!r}")
    out = []
    for j, a in enumerate(value):
        af = f"{field}.args[{j}]"
        if not isinstance(a, dict):
            raise _fail(af, f"want an object, got {a!r}")
        if a.get("op") not in OPERATORS:
            raise _fail(f"{af}.op", f"unknown operator {a.get('op')!r}")
        out.append((_uint(a.get("index"), f"{af}.index", 5), _uint(a.get("value", 0), f"{af}.value", 2**64 - 1),
                    _uint(a.get("valueTwo", 0), f"{af}.valueTwo", 2**64 - 1), a["op"]))
    return tuple(out)


def _rules(syscalls: Any) -> list[_Rule]:
    """A profile's ``syscalls``, checked (Docker's ``name``, ``includes`` and ``excludes`` too)."""
    if not isinstance(syscalls, list | None):
        raise _fail("syscalls", f"want a list, got {syscalls!r}")
    rules: list[_Rule] = []
    for i, s in enumerate(syscalls or []):
        field = f"syscalls[{i}]"
        if not isinstance(s, dict):
            raise _fail(field, f"want an object, got {s!r}")
        names = _strings(s.get("names"), f"{field}.names")
        if s.get("name"):
            if names:
                raise _fail(field, "use either 'name' or 'names', not both")
            names = _strings([s["name"]], f"{field}.name")
        if not names:
            raise _fail(f"{field}.names", "empty")
        action, _ = _action(s.get("action"), s.get("errnoRet"), f"{field}.action", f"{field}.errnoRet")
        caps, arches, min_kernel = _filter(s.get("includes"), f"{field}.includes")
        not_caps, not_arches, not_min = _filter(s.get("excludes"), f"{field}.excludes")
        rules.append(_Rule(names, action, s.get("errnoRet"), _args(s.get("args"), field), caps, not_caps,
                           arches, not_arches, min_kernel, not_min))
    return rules


# --- Docker profile files ----------------------------------------------------------


def profile_from_docker(doc: Any, *, arch: str | None = None, capabilities: Iterable[str] | None = None,
                        kernel: tuple[int, int] | None = None) -> dict[str, Any]:
    """A Docker seccomp profile (``--security-opt seccomp=FILE``'s JSON) in OCI form.

    As dockerd: ``archMap`` picks the native architecture's entry,
    ``includes``/``excludes`` (caps, arches, minKernel) are resolved against
    the container's bounding set, ``name`` is accepted for ``names``.
    """
    if not isinstance(doc, dict):
        raise _fail("profile", f"want a JSON object, got {type(doc).__name__}")
    env = _env(arch, capabilities, kernel)
    if doc.get("architectures") and doc.get("archMap"):
        raise _fail("architectures", "use either 'architectures' or 'archMap', not both")
    arch_map: dict[str, tuple[str, ...]] = {}
    for i, entry in enumerate(doc.get("archMap") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("architecture"), str):
            raise _fail(f"archMap[{i}].architecture", "want a string")
        arch_map[entry["architecture"]] = _strings(entry.get("subArchitectures"), f"archMap[{i}].subArchitectures")
    out: dict[str, Any] = {"defaultAction": doc.get("defaultAction")}
    if doc.get("defaultErrnoRet") is not None:
        out["defaultErrnoRet"] = doc["defaultErrnoRet"]
    out["architectures"] = (list(_strings(doc.get("architectures"), "architectures")) if not arch_map
                            else _architectures(env, arch_map))
    if doc.get("flags"):
        out["flags"] = doc["flags"]
    out["syscalls"] = _render(_rules(doc.get("syscalls")), env)
    validate(out)
    return out


def load_profile_file(path: str | os.PathLike[str], *, arch: str | None = None,
                      capabilities: Iterable[str] | None = None,
                      kernel: tuple[int, int] | None = None) -> dict[str, Any]:
    """Read a Docker (or OCI) seccomp profile file and return it in OCI form (see :func:`profile_from_docker`)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgument(f"seccomp profile {os.fspath(path)}: cannot read: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"seccomp profile {os.fspath(path)}: not valid JSON: {exc}") from exc
    try:
        return profile_from_docker(doc, arch=arch, capabilities=capabilities, kernel=kernel)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{os.fspath(path)}: {exc}") from exc


# --- OCI form: check, then load -------------------------------------------------------


class _Call(NamedTuple):
    name: str
    action: str
    ret: int
    conds: tuple[tuple[int, int, int, str], ...]  # (index, value, valueTwo, op)


class _Plan(NamedTuple):
    action: str
    ret: int
    arches: tuple[str, ...]
    flags: tuple[str, ...]
    calls: tuple[_Call, ...]


def _plan(profile: Any) -> _Plan:
    if not isinstance(profile, Mapping):
        raise _fail("profile", f"want an object, got {type(profile).__name__}")
    action, ret = _action(profile.get("defaultAction"), profile.get("defaultErrnoRet"),
                          "defaultAction", "defaultErrnoRet")
    arches = _strings(profile.get("architectures"), "architectures")
    for a in arches:
        if a not in ARCHES:
            raise _fail("architectures", f"unknown architecture {a!r}")
    flags = _strings(profile.get("flags"), "flags")
    for f in flags:
        if f not in FLAGS:
            raise _fail("flags", f"unknown or unsupported flag {f!r}")
    calls = (_Call(n, *_action(r.action, r.errno, "", ""), r.args) for r in _rules(profile.get("syscalls"))
             for n in r.names)
    return _Plan(action, ret, arches, flags, tuple(calls))


def validate(profile: Any) -> None:
    """Check an OCI ``linux.seccomp`` object; :class:`InvalidArgument` names the bad field."""
    _plan(profile)


_binding: Any = None


def load_binding(dirs: Sequence[str] = BINDING_DIRS) -> Any:
    """Import libseccomp's Python binding (``seccomp``), from the environment or Debian's package.

    Idempotent.  :class:`Internal` when it is missing or built for another ABI.
    """
    global _binding
    if _binding is not None:
        return _binding
    try:
        module = importlib.import_module("seccomp")
        if hasattr(module, "SyscallFilter"):
            _binding = module
            return module
    except ImportError:
        pass
    # only this interpreter's ABI-tagged name (".cpython-311-x86_64-linux-gnu.so"), never a bare ".so"
    tagged = [x for x in importlib.machinery.EXTENSION_SUFFIXES if x.startswith(".cpython-")]
    filename = "seccomp" + (tagged[0] if tagged else ".cpython-unknown.so")
    for d in dirs:
        path = os.path.join(d, filename)
        if not os.path.isfile(path):
            continue
        try:
            loader = importlib.machinery.ExtensionFileLoader("seccomp", path)
            spec = importlib.util.spec_from_file_location("seccomp", path, loader=loader)
            assert spec is not None
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        except ImportError as exc:
            raise Internal(f"libseccomp binding {path} does not load: {exc}") from exc
        sys.modules.setdefault("seccomp", module)
        _binding = module
        return module
    raise Internal(f"libseccomp's Python binding is missing: no {filename} in {', '.join(dirs)} "
                   "(apt-get install python3-seccomp)")


def _library_errno(exc: BaseException) -> int:
    m = re.search(r"errno = -?(\d+)", str(exc))
    return int(m.group(1)) if m else _errno.EINVAL


def _scmp_action(sc: Any, action: str, ret: int) -> Any:
    name = action.removeprefix("SCMP_ACT_").replace("KILL_THREAD", "KILL")  # SCMP_ACT_KILL is KILL_THREAD
    return sc.ERRNO(ret) if name == "ERRNO" else sc.TRACE(ret) if name == "TRACE" else getattr(sc, name)


def _add_rule(sc: Any, filt: Any, call: _Call) -> None:
    nr = sc.resolve_syscall(sc.Arch.NATIVE, call.name)
    if nr == -1:
        return  # unknown to this libseccomp (or this architecture): skipped, as runc does
    args = [sc.Arg(index, getattr(sc, op.removeprefix("SCMP_CMP_")), value, value_two)
            for index, value, value_two, op in call.conds]
    indexes = [c[0] for c in call.conds]
    # libseccomp takes one comparison per argument; like runc, several on one
    # argument become one rule each (any of them matches)
    groups = [[a] for a in args] if len(set(indexes)) < len(indexes) else [args]
    for group in groups:
        try:
            filt.add_rule(_scmp_action(sc, call.action, call.ret), nr, *group)
        except (RuntimeError, ValueError, OverflowError) as exc:
            err = _library_errno(exc)
            raise InvalidArgument(f"seccomp profile: syscall {call.name!r}: libseccomp refused the rule: "
                                  f"{os.strerror(err)}") from exc


#: compiled filters by profile (canonical JSON): a pool shim compiles the default profile ahead
#: of time, and building a filter of ~350 rules through libseccomp costs ~25 ms
_BPF_CACHE: dict[str, bytes] = {}
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


def profile_key(profile: Mapping[str, Any]) -> str:
    return json.dumps(profile, sort_keys=True, separators=(",", ":"))


def _build(profile: Mapping[str, Any]) -> tuple[Any, bool]:
    """The libseccomp filter for ``profile``; and whether it can be loaded as plain BPF
    (no filter flags, which only seccomp(2) takes)."""
    plan = _plan(profile)
    sc = load_binding()
    try:
        filt = sc.SyscallFilter(_scmp_action(sc, plan.action, plan.ret))
        filt.set_attr(sc.Attr.CTL_NNP, 0)  # the caller owns no_new_privs
        filt.set_attr(sc.Attr.API_SYSRAWRC, 1)  # the kernel's errno from load(), not ECANCELED
        for flag in plan.flags:
            filt.set_attr(getattr(sc.Attr, FLAGS[flag]), 1)
        for name in plan.arches:
            arch = getattr(sc.Arch, name.removeprefix("SCMP_ARCH_"), None)
            if arch is not None and not filt.exist_arch(arch):
                filt.add_arch(arch)  # one this libseccomp lacks stays out: its syscalls are killed
    except (RuntimeError, ValueError) as exc:
        err = _library_errno(exc)
        raise OSError(err, f"seccomp: building the filter: {os.strerror(err)}") from exc
    for call in plan.calls:
        if (call.action, call.ret) != (plan.action, plan.ret):
            _add_rule(sc, filt, call)
    return filt, not plan.flags


def compile_bpf(profile: Mapping[str, Any]) -> bytes | None:
    """The profile as a classic BPF program (cached); None when it needs filter flags."""
    key = profile_key(profile)
    cached = _BPF_CACHE.get(key)
    if cached is not None:
        return cached
    filt, plain = _build(profile)
    if not plain:
        return None
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            filt.export_bpf(out)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except (RuntimeError, ValueError) as exc:
        err = _library_errno(exc)
        raise OSError(err, f"seccomp: exporting the filter: {os.strerror(err)}") from exc
    finally:
        os.close(fd)
    bpf = b"".join(chunks)
    _BPF_CACHE[key] = bpf
    return bpf


def load_bpf(bpf: bytes) -> None:
    """prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) with a compiled program."""
    import ctypes

    if not bpf or len(bpf) % 8:
        raise InvalidArgument(f"seccomp: a BPF program is a whole number of 8-byte instructions, got {len(bpf)}")

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        hint = " (set no_new_privs first, or load while CAP_SYS_ADMIN is effective)" if err == _errno.EACCES else ""
        raise OSError(err, f"seccomp: loading the filter: {os.strerror(err)}{hint}")


def apply(profile: Mapping[str, Any]) -> None:
    """Load the OCI ``profile`` into the kernel for the calling process (see the module notes).

    A compiled program from :func:`compile_bpf` (cached) is loaded with one
    prctl; a profile with filter flags goes through libseccomp's own load.
    :class:`InvalidArgument` for a malformed profile, :class:`Internal` when
    the binding is missing, ``OSError`` when the kernel refuses the filter
    (``EACCES``: neither no_new_privs nor CAP_SYS_ADMIN).
    """
    bpf = compile_bpf(profile)
    if bpf is not None:
        load_bpf(bpf)
        return
    filt, _ = _build(profile)
    try:
        filt.load()
    except (RuntimeError, ValueError) as exc:
        err = _library_errno(exc)
        hint = " (set no_new_privs first, or load while CAP_SYS_ADMIN is effective)" if err == _errno.EACCES else ""
        raise OSError(err, f"seccomp: loading the filter: {os.strerror(err)}{hint}") from exc