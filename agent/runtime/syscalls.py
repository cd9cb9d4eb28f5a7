"""The raw Linux syscalls the runtime needs, and the only place that calls them.

Python 3.11 has no ``os.unshare``/``os.setns``/``os.mount``: this module wraps
them (and umount2, pivot_root, sethostname, prctl, capget/capset,
close_range) over libc with :mod:`ctypes`.  Every wrapper raises
``OSError(errno, "name(operands): strerror")`` whose message names its
operands (paths, flags spelt out, pid, fd), so a log line is enough to debug.
``OSError`` picks its subclass from the errno (``FileNotFoundError``, …).

The operations form the :class:`Syscalls` protocol.  :class:`LinuxSyscalls`
is the real implementation; :class:`RecordingSyscalls` records every call as
a tuple, returns canned values and fails chosen calls with a chosen errno, so
lifecycle logic above it is unit-tested without root.  Inject a ``Syscalls``
into that logic; the module-level functions (``unshare``, ``mount``, …) are a
convenience bound to one default :class:`LinuxSyscalls`.

Mechanism only: no policy (which capabilities a container keeps, which mounts
it gets) lives here.  Nothing here forks, starts threads or imports grpc: it
is meant for a freshly exec'd, single-threaded helper (the shim), never for
the multi-threaded agent process.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast, runtime_checkable

StrPath: TypeAlias = str | bytes | os.PathLike[str] | os.PathLike[bytes]

# --------------------------------------------------------------------------- #
# constants (values from the kernel's uapi headers)
# --------------------------------------------------------------------------- #

# namespaces: unshare(2), setns(2)
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 1 << 0
MS_NOSUID = 1 << 1
MS_NODEV = 1 << 2
MS_NOEXEC = 1 << 3
MS_SYNCHRONOUS = 1 << 4
MS_REMOUNT = 1 << 5
MS_MANDLOCK = 1 << 6
MS_DIRSYNC = 1 << 7
MS_NOSYMFOLLOW = 1 << 8
MS_NOATIME = 1 << 10
MS_NODIRATIME = 1 << 11
MS_BIND = 1 << 12
MS_MOVE = 1 << 13
MS_REC = 1 << 14
MS_SILENT = 1 << 15
MS_POSIXACL = 1 << 16
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_I_VERSION = 1 << 23
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# umount2(2) flags
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8

# prctl(2) options
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_GET_KEEPCAPS = 7
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
# PR_CAP_AMBIENT sub-operations (arg2)
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4

# close_range(2) flags
CLOSE_RANGE_UNSHARE = 1 << 1
CLOSE_RANGE_CLOEXEC = 1 << 2

# capabilities (linux/capability.h)
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_LINUX_IMMUTABLE = 9
CAP_NET_BIND_SERVICE = 10
CAP_NET_BROADCAST = 11
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_IPC_LOCK = 14
CAP_IPC_OWNER = 15
CAP_SYS_MODULE = 16
CAP_SYS_RAWIO = 17
CAP_SYS_CHROOT = 18
CAP_SYS_PTRACE = 19
CAP_SYS_PACCT = 20
CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22
CAP_SYS_NICE = 23
CAP_SYS_RESOURCE = 24
CAP_SYS_TIME = 25
CAP_SYS_TTY_CONFIG = 26
CAP_MKNOD = 27
CAP_LEASE = 28
CAP_AUDIT_WRITE = 29
CAP_AUDIT_CONTROL = 30
CAP_SETFCAP = 31
CAP_MAC_OVERRIDE = 32
CAP_MAC_ADMIN = 33
CAP_SYSLOG = 34
CAP_WAKE_ALARM = 35
CAP_BLOCK_SUSPEND = 36
CAP_AUDIT_READ = 37
CAP_PERFMON = 38
CAP_BPF = 39
CAP_CHECKPOINT_RESTORE = 40
#: the highest capability this table knows (the running kernel may know fewer)
CAP_LAST_CAP = CAP_CHECKPOINT_RESTORE

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _named(prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    return {k: v for k, v in globals().items()
            if k.startswith(prefix) and isinstance(v, int) and k not in exclude}


#: capability name (OCI/Docker spelling, ``CAP_CHOWN``) -> number
CAPABILITIES: dict[str, int] = _named("CAP_", exclude=("CAP_LAST_CAP",))
CLONE_FLAGS: dict[str, int] = _named("CLONE_NEW")
MOUNT_FLAGS: dict[str, int] = _named("MS_")
UMOUNT_FLAGS: dict[str, int] = {**_named("MNT_"), "UMOUNT_NOFOLLOW": UMOUNT_NOFOLLOW}
CLOSE_RANGE_FLAGS: dict[str, int] = _named("CLOSE_RANGE_")
_PRCTL_OPTIONS: dict[int, str] = {v: k for k, v in _named("PR_", exclude=tuple(
    k for k in globals() if k.startswith("PR_CAP_AMBIENT_"))).items()}
_AMBIENT_OPS: dict[int, str] = {v: k for k, v in _named("PR_CAP_AMBIENT_").items()}
_CAP_NAMES: dict[int, str] = {v: k for k, v in CAPABILITIES.items()}

#: syscall numbers glibc has no wrapper for, per ``os.uname().machine``
SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"pivot_root": 155, "close_range": 436},
    "aarch64": {"pivot_root": 41, "close_range": 436},
    "riscv64": {"pivot_root": 41, "close_range": 436},  # asm-generic table, as aarch64
}

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------- #
# capability helpers and the capability sets
# --------------------------------------------------------------------------- #


def capability_mask(caps: Iterable[str | int]) -> int:
    """The bit mask of ``caps``: OCI names (``CAP_CHOWN``) or numbers."""
    mask = 0
    for cap in caps:
        if isinstance(cap, str):
            if cap not in CAPABILITIES:
                raise ValueError(f"unknown capability {cap!r}")
            cap = CAPABILITIES[cap]
        if not 0 <= cap < 64:
            raise ValueError(f"capability number {cap} out of range 0..63")
        mask |= 1 << cap
    return mask


def capability_names(mask: int) -> list[str]:
    """Names of the capabilities in ``mask``, lowest first (``CAP_<n>`` when unknown)."""
    return [_CAP_NAMES.get(n, f"CAP_{n}") for n in range(64) if mask >> n & 1]


@dataclass(frozen=True)
class CapSets:
    """A thread's effective, permitted and inheritable capability sets (64-bit masks)."""

    effective: int
    permitted: int
    inheritable: int

    def __post_init__(self) -> None:
        for name in ("effective", "permitted", "inheritable"):
            value = getattr(self, name)
            if not 0 <= value <= _U64:
                raise ValueError(f"capability set {name}={value:#x} is not a 64-bit mask")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CapDataPair = _CapData * 2


# --------------------------------------------------------------------------- #
# mount options
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class MountOptions:
    """OCI/fstab mount options split the way mount(2) wants them.

    ``flags`` go to the mount (or remount) call, ``propagation`` to a
    separate ``mount(None, target, None, propagation)`` call after it, and
    ``data`` (options the kernel does not know as flags) is the filesystem's
    comma-separated data string (empty when there is none).
    """

    flags: int = 0
    propagation: int = 0
    data: str = ""


# option -> (clears the flag?, flag); the table runc and crun use
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "defaults": (False, 0),
    "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "nosuid": (False, MS_NOSUID), "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV), "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC), "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS), "async": (True, MS_SYNCHRONOUS),
    "dirsync": (False, MS_DIRSYNC),
    "remount": (False, MS_REMOUNT),
    "mand": (False, MS_MANDLOCK), "nomand": (True, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME), "atime": (True, MS_NOATIME),
    "nodiratime": (False, MS_NODIRATIME), "diratime": (True, MS_NODIRATIME),
    "relatime": (False, MS_RELATIME), "norelatime": (True, MS_RELATIME),
    "strictatime": (False, MS_STRICTATIME), "nostrictatime": (True, MS_STRICTATIME),
    "lazytime": (False, MS_LAZYTIME), "nolazytime": (True, MS_LAZYTIME),
    "iversion": (False, MS_I_VERSION), "noiversion": (True, MS_I_VERSION),
    "acl": (False, MS_POSIXACL), "noacl": (True, MS_POSIXACL),
    "silent": (False, MS_SILENT), "loud": (True, MS_SILENT),
    "nosymfollow": (False, MS_NOSYMFOLLOW),
    "bind": (False, MS_BIND), "rbind": (False, MS_BIND | MS_REC),
}
_PROPAGATION_OPTIONS: dict[str, int] = {
    "private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE, "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | MS_REC,
}


def mount_flags_from_options(options: Iterable[str]) -> MountOptions:
    """Translate OCI/fstab options (``ro``, ``rbind``, ``rprivate``, ``mode=755``…).

    Later options win over earlier ones (``ro,rw`` is read-write), as in
    runc; the last propagation option is the one returned.  Options that are
    not mount flags (``mode=755``, ``size=65536k``, ``newinstance``,
    ``ptmxmode=0666``, ``gid=5``…) are kept, in order, in ``data``.
    """
    flags = propagation = 0
    data: list[str] = []
    for option in options:
        if not option:
            continue
        if option in _FLAG_OPTIONS:
            clear, flag = _FLAG_OPTIONS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION_OPTIONS:
            propagation = _PROPAGATION_OPTIONS[option]
        else:
            data.append(option)
    return MountOptions(flags, propagation, ",".join(data))


# --------------------------------------------------------------------------- #
# how a call is spelt in an error message
# --------------------------------------------------------------------------- #


def format_flags(flags: int, names: Mapping[str, int]) -> str:
    """``MS_BIND|MS_REC`` for ``flags``; bits without a name are shown in hex."""
    if flags == 0:
        return "0"
    parts: list[str] = []
    rest = flags
    for name, bit in sorted(names.items(), key=lambda item: item[1]):
        if bit and rest & bit == bit:
            parts.append(name)
            rest &= ~bit
    if rest:
        parts.append(hex(rest))
    return "|".join(parts)


def _path(path: StrPath | None) -> str:
    if path is None:
        return "None"
    text = os.fsdecode(path)
    if not text.startswith("/"):
        try:
            return f"{text!r} (in {os.getcwd()!r})"
        except OSError:
            pass
    return repr(text)


def _fd(fd: int) -> str:
    try:
        return f"{fd} ({os.readlink(f'/proc/self/fd/{fd}')})"
    except OSError:
        return str(fd)


def _signal(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _cap(cap: int) -> str:
    return _CAP_NAMES.get(cap, str(cap))


def _prctl_operands(option: int, arg2: int | bytes = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> str:
    args: list[str] = [_PRCTL_OPTIONS.get(option, str(option))]
    if option in (PR_CAPBSET_READ, PR_CAPBSET_DROP) and isinstance(arg2, int):
        args.append(_cap(arg2))
    elif option == PR_SET_PDEATHSIG and isinstance(arg2, int):
        args.append(_signal(arg2))
    elif option == PR_CAP_AMBIENT and isinstance(arg2, int):
        args += [_AMBIENT_OPS.get(arg2, str(arg2)), _cap(arg3)]
    else:
        args.append(repr(arg2))
        args += [str(arg3), str(arg4), str(arg5)]
    while len(args) > 2 and args[-1] == "0":
        args.pop()
    return ", ".join(args)


#: operation -> formatter of its operands (also the list of operations RecordingSyscalls knows)
_OPERANDS: dict[str, Callable[..., str]] = {
    "unshare": lambda flags: format_flags(flags, CLONE_FLAGS),
    "setns": lambda fd, nstype: f"fd={_fd(fd)}, nstype={format_flags(nstype, CLONE_FLAGS)}",
    "mount": lambda source, target, fstype, flags, data: (
        f"source={source!r}, target={_path(target)}, fstype={fstype!r}, "
        f"flags={format_flags(flags, MOUNT_FLAGS)}, data={data!r}"),
    "umount2": lambda target, flags: f"target={_path(target)}, flags={format_flags(flags, UMOUNT_FLAGS)}",
    "pivot_root": lambda new_root, put_old: f"new_root={_path(new_root)}, put_old={_path(put_old)}",
    "sethostname": lambda name: repr(name),
    "setdomainname": lambda name: repr(name),
    "prctl": _prctl_operands,
    "capget": lambda pid: f"pid={pid}",
    "capset": lambda caps: (f"effective={caps.effective:#018x}, permitted={caps.permitted:#018x}, "
                            f"inheritable={caps.inheritable:#018x}"),
    "drop_bounding_set": lambda keep: f"keep={','.join(_cap(c) for c in keep) or 'none'}",
    "clear_ambient": lambda: "",
    "set_no_new_privs": lambda: "",
    "set_pdeathsig": lambda sig: _signal(sig),
    "set_child_subreaper": lambda: "",
    "close_range": lambda first, last, flags: (
        f"first={first}, last={'~0' if last == _U32 else last}, flags={format_flags(flags, CLOSE_RANGE_FLAGS)}"),
}


def syscall_error(err: int, name: str, *args: Any, detail: str = "") -> OSError:
    """``OSError(err, "name(operands): strerror")``, the error every wrapper raises."""
    message = f"{name}({_OPERANDS[name](*args)}): {os.strerror(err)}"
    return OSError(err, message + (f" ({detail})" if detail else ""))


# --------------------------------------------------------------------------- #
# the protocol
# --------------------------------------------------------------------------- #


@runtime_checkable
class Syscalls(Protocol):
    """The kernel operations the runtime performs; inject one, never import the functions."""

    def unshare(self, flags: int) -> None:
        """Move this process into new namespaces (``CLONE_NEW*``)."""

    def setns(self, fd: int, nstype: int = 0) -> None:
        """Join the namespace ``fd`` refers to (``nstype`` 0 accepts any type)."""

    def mount(self, source: StrPath | None, target: StrPath, fstype: str | None,
              flags: int = 0, data: str | None = None) -> None:
        """mount(2)."""

    def umount2(self, target: StrPath, flags: int = 0) -> None:
        """umount2(2) (``MNT_DETACH`` for a lazy unmount)."""

    def pivot_root(self, new_root: StrPath, put_old: StrPath) -> None:
        """pivot_root(2)."""

    def sethostname(self, name: str) -> None:
        """Set the UTS namespace's hostname."""

    def setdomainname(self, name: str) -> None:
        """Set the UTS namespace's NIS domain name."""

    def prctl(self, option: int, arg2: int | bytes = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        """prctl(2); returns its non-negative result."""

    def capget(self, pid: int = 0) -> CapSets:
        """The capability sets of ``pid`` (0: this thread)."""

    def capset(self, caps: CapSets) -> None:
        """Set this thread's capability sets."""

    def drop_bounding_set(self, keep: Iterable[int]) -> None:
        """Drop every capability not in ``keep`` from the bounding set (needs CAP_SETPCAP)."""

    def clear_ambient(self) -> None:
        """Empty the ambient capability set."""

    def set_no_new_privs(self) -> None:
        """Set no_new_privs: execve never grants privileges again."""

    def set_pdeathsig(self, sig: int) -> None:
        """Receive ``sig`` when the parent thread dies."""

    def set_child_subreaper(self) -> None:
        """Become the reaper of orphaned descendants."""

    def close_range(self, first: int, last: int = ~0, flags: int = 0) -> None:
        """Close (or, with ``CLOSE_RANGE_CLOEXEC``, mark close-on-exec) fds ``first``..``last``."""


# --------------------------------------------------------------------------- #
# the real thing
# --------------------------------------------------------------------------- #


def _fn(libc: ctypes.CDLL, name: str, restype: Any, argtypes: list[Any] | None) -> Any:
    fn = libc[name]          # a fresh function object: its argtypes are ours alone
    fn.restype = restype
    if argtypes is not None:
        fn.argtypes = argtypes
    return fn


def _u32(value: int, what: str) -> int:
    if value < 0:
        value &= _U32  # ~0 and -1 mean "up to the largest fd"
    if value > _U32:
        raise ValueError(f"{what}={value} does not fit an unsigned int")
    return value


class LinuxSyscalls:
    """:class:`Syscalls` over libc (``ctypes.CDLL(None, use_errno=True)``).

    ``machine`` (default ``os.uname().machine``) picks the numbers of the
    syscalls glibc does not wrap (pivot_root, close_range).
    """

    def __init__(self, machine: str | None = None) -> None:
        c = ctypes
        libc = c.CDLL(None, use_errno=True)
        self.machine = machine or os.uname().machine
        self._numbers = SYSCALL_NUMBERS.get(self.machine, {})
        self._unshare = _fn(libc, "unshare", c.c_int, [c.c_int])
        self._setns = _fn(libc, "setns", c.c_int, [c.c_int, c.c_int])
        self._mount = _fn(libc, "mount", c.c_int, [c.c_char_p, c.c_char_p, c.c_char_p, c.c_ulong, c.c_char_p])
        self._umount2 = _fn(libc, "umount2", c.c_int, [c.c_char_p, c.c_int])
        self._sethostname = _fn(libc, "sethostname", c.c_int, [c.c_char_p, c.c_size_t])
        self._setdomainname = _fn(libc, "setdomainname", c.c_int, [c.c_char_p, c.c_size_t])
        self._prctl = _fn(libc, "prctl", c.c_int, None)       # variadic: arguments converted per call
        self._syscall = _fn(libc, "syscall", c.c_long, None)  # variadic: every argument a c_long/pointer
        self._capget = _fn(libc, "capget", c.c_int, [c.POINTER(_CapHeader), c.POINTER(_CapData)])
        self._capset = _fn(libc, "capset", c.c_int, [c.POINTER(_CapHeader), c.POINTER(_CapData)])

    @staticmethod
    def _check(result: int, name: str, *args: Any) -> int:
        if result < 0:
            raise syscall_error(ctypes.get_errno(), name, *args)
        return result

    def unshare(self, flags: int) -> None:
        self._check(self._unshare(flags), "unshare", flags)

    def setns(self, fd: int, nstype: int = 0) -> None:
        self._check(self._setns(fd, nstype), "setns", fd, nstype)

    def mount(self, source: StrPath | None, target: StrPath, fstype: str | None,
              flags: int = 0, data: str | None = None) -> None:
        result = self._mount(None if source is None else os.fsencode(source), os.fsencode(target),
                             None if fstype is None else fstype.encode(), flags,
                             None if data is None else data.encode())
        self._check(result, "mount", source, target, fstype, flags, data)

    def umount2(self, target: StrPath, flags: int = 0) -> None:
        self._check(self._umount2(os.fsencode(target), flags), "umount2", target, flags)

    def pivot_root(self, new_root: StrPath, put_old: StrPath) -> None:
        number = self._numbers.get("pivot_root")
        if number is None:
            raise syscall_error(_errno.ENOSYS, "pivot_root", new_root, put_old,
                                detail=f"no syscall number for machine {self.machine!r}")
        result = self._syscall(ctypes.c_long(number), ctypes.c_char_p(os.fsencode(new_root)),
                               ctypes.c_char_p(os.fsencode(put_old)))
        self._check(result, "pivot_root", new_root, put_old)

    def sethostname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._sethostname(raw, len(raw)), "sethostname", name)

    def setdomainname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._setdomainname(raw, len(raw)), "setdomainname", name)

    def prctl(self, option: int, arg2: int | bytes = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        rest = [ctypes.c_char_p(a) if isinstance(a, bytes) else ctypes.c_ulong(a & _U64)
                for a in (arg2, arg3, arg4, arg5)]
        return self._check(self._prctl(ctypes.c_int(option), *rest), "prctl", option, arg2, arg3, arg4, arg5)

    def capget(self, pid: int = 0) -> CapSets:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
        data = _CapDataPair()
        self._check(self._capget(ctypes.byref(header), data), "capget", pid)
        return CapSets(*(getattr(data[0], f) | getattr(data[1], f) << 32
                         for f in ("effective", "permitted", "inheritable")))

    def capset(self, caps: CapSets) -> None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = _CapDataPair(
            _CapData(caps.effective & _U32, caps.permitted & _U32, caps.inheritable & _U32),
            _CapData(caps.effective >> 32, caps.permitted >> 32, caps.inheritable >> 32))
        self._check(self._capset(ctypes.byref(header), data), "capset", caps)

    def drop_bounding_set(self, keep: Iterable[int]) -> None:
        kept = set(keep)
        for cap in range(64):
            if cap in kept:
                continue
            try:
                self.prctl(PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno == _errno.EINVAL:
                    return  # past the kernel's last capability
                raise

    def clear_ambient(self) -> None:
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)

    def set_no_new_privs(self) -> None:
        self.prctl(PR_SET_NO_NEW_PRIVS, 1)

    def set_pdeathsig(self, sig: int) -> None:
        self.prctl(PR_SET_PDEATHSIG, sig)

    def set_child_subreaper(self) -> None:
        self.prctl(PR_SET_CHILD_SUBREAPER, 1)

    def close_range(self, first: int, last: int = ~0, flags: int = 0) -> None:
        if first < 0:
            raise ValueError(f"close_range: first={first} is negative")
        last = _u32(last, "last")
        number = self._numbers.get("close_range")
        if number is not None:
            result = self._syscall(ctypes.c_long(number), ctypes.c_long(first), ctypes.c_long(last),
                                   ctypes.c_long(flags))
            if result == 0:
                return
            err = ctypes.get_errno()
            if err != _errno.ENOSYS:
                raise syscall_error(err, "close_range", first, last, flags)
        _close_range_by_loop(first, last, flags)


def _close_range_by_loop(first: int, last: int, flags: int) -> None:
    """close_range(2) for kernels without it (< 5.9): one close/fcntl per open fd.

    ``CLOSE_RANGE_UNSHARE`` has no equivalent and is ignored: the single-threaded
    helpers this module serves share their fd table with nobody.
    """
    fds: Iterable[int]
    try:
        fds = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:  # no /proc (e.g. after pivot_root, before mounting it): try every possible fd
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
        fds = range(first, min(last, limit - 1) + 1)
    for fd in fds:
        if not first <= fd <= last:
            continue
        try:
            if flags & CLOSE_RANGE_CLOEXEC:
                os.set_inheritable(fd, False)
            else:
                os.close(fd)
        except OSError as exc:
            if exc.errno != _errno.EBADF:  # the listing's own fd, or a hole in the range
                raise


# --------------------------------------------------------------------------- #
# the recording fake
# --------------------------------------------------------------------------- #


@dataclass
class _Failure:
    errno: int
    match: Callable[[tuple[Any, ...]], bool] | None
    remaining: int | None


class RecordingSyscalls:
    """:class:`Syscalls` that touches nothing: it records, answers and fails on request.

    Every call is appended to :attr:`calls` as ``(name, *arguments)`` with
    paths as ``str`` and defaults filled in (``("mount", "tmpfs", "/r/dev",
    "tmpfs", MS_NOSUID, "mode=755")``), including calls that then fail.
    ``returns`` maps a name to a canned result, or to a callable taking the
    call's arguments (``prctl`` answers 0 unless told otherwise).  ``capget``
    answers the sets given to the last ``capset``, first ``capsets``.
    """

    def __init__(self, *, capsets: CapSets | None = None, returns: Mapping[str, Any] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.capsets = capsets if capsets is not None else CapSets(0, 0, 0)
        self.returns: dict[str, Any] = dict(returns or {})
        self._failures: dict[str, list[_Failure]] = {}

    def fail(self, name: str, err: int, *, match: Callable[[tuple[Any, ...]], bool] | None = None,
             times: int | None = 1) -> None:
        """Make the next ``times`` calls of ``name`` (None: all of them) raise ``OSError(err)``.

        ``match`` picks the calls by their recorded tuple, e.g.
        ``match=lambda call: call[2] == "/r/proc"`` for one mount target.
        """
        if name not in _OPERANDS:
            raise ValueError(f"RecordingSyscalls.fail: unknown operation {name!r}")
        self._failures.setdefault(name, []).append(_Failure(err, match, times))

    def names(self) -> list[str]:
        """The names of the calls made, in order."""
        return [call[0] for call in self.calls]

    def calls_of(self, name: str) -> list[tuple[Any, ...]]:
        """The recorded calls of one operation."""
        return [call for call in self.calls if call[0] == name]

    def _call(self, name: str, *args: Any) -> Any:
        call = (name, *args)
        self.calls.append(call)
        for failure in self._failures.get(name, []):
            if failure.remaining == 0 or (failure.match is not None and not failure.match(call)):
                continue
            if failure.remaining is not None:
                failure.remaining -= 1
            raise syscall_error(failure.errno, name, *args)
        result = self.returns.get(name)
        return result(*args) if callable(result) else result

    def unshare(self, flags: int) -> None:
        self._call("unshare", flags)

    def setns(self, fd: int, nstype: int = 0) -> None:
        self._call("setns", fd, nstype)

    def mount(self, source: StrPath | None, target: StrPath, fstype: str | None,
              flags: int = 0, data: str | None = None) -> None:
        self._call("mount", None if source is None else os.fsdecode(source), os.fsdecode(target),
                   fstype, flags, data)

    def umount2(self, target: StrPath, flags: int = 0) -> None:
        self._call("umount2", os.fsdecode(target), flags)

    def pivot_root(self, new_root: StrPath, put_old: StrPath) -> None:
        self._call("pivot_root", os.fsdecode(new_root), os.fsdecode(put_old))

    def sethostname(self, name: str) -> None:
        self._call("sethostname", name)

    def setdomainname(self, name: str) -> None:
        self._call("setdomainname", name)

    def prctl(self, option: int, arg2: int | bytes = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        result = self._call("prctl", option, arg2, arg3, arg4, arg5)
        return 0 if result is None else int(result)

    def capget(self, pid: int = 0) -> CapSets:
        result = self._call("capget", pid)
        return self.capsets if result is None else cast(CapSets, result)

    def capset(self, caps: CapSets) -> None:
        self._call("capset", caps)
        self.capsets = caps

    def drop_bounding_set(self, keep: Iterable[int]) -> None:
        self._call("drop_bounding_set", tuple(sorted(set(keep))))

    def clear_ambient(self) -> None:
        self._call("clear_ambient")

    def set_no_new_privs(self) -> None:
        self._call("set_no_new_privs")

    def set_pdeathsig(self, sig: int) -> None:
        self._call("set_pdeathsig", sig)

    def set_child_subreaper(self) -> None:
        self._call("set_child_subreaper")

    def close_range(self, first: int, last: int = ~0, flags: int = 0) -> None:
        self._call("close_range", first, _u32(last, "last"), flags)


if TYPE_CHECKING:
    _recording_conforms: Syscalls = RecordingSyscalls()


# --------------------------------------------------------------------------- #
# module-level convenience: one default LinuxSyscalls
# --------------------------------------------------------------------------- #

_DEFAULT: Syscalls = LinuxSyscalls()

unshare = _DEFAULT.unshare
setns = _DEFAULT.setns
mount = _DEFAULT.mount
umount2 = _DEFAULT.umount2
pivot_root = _DEFAULT.pivot_root
sethostname = _DEFAULT.sethostname
setdomainname = _DEFAULT.setdomainname
prctl = _DEFAULT.prctl
capget = _DEFAULT.capget
capset = _DEFAULT.capset
drop_bounding_set = _DEFAULT.drop_bounding_set
clear_ambient = _DEFAULT.clear_ambient
set_no_new_privs = _DEFAULT.set_no_new_privs
set_pdeathsig = _DEFAULT.set_pdeathsig
set_child_subreaper = _DEFAULT.set_child_subreaper
close_range = _DEFAULT.close_range
