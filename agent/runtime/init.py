"""The built-in executor's init helper: turns an OCI bundle into a running container.

Run as a *freshly exec'd, single-threaded* process (never imported into the
agent to do work; it imports no grpc and starts no thread)::

    python -m agent.runtime.init --bundle DIR --id ID [--cgroup-path P]
                                 --sync-fd N [--start-fd M]

Process model (the choice, and why)
-----------------------------------
The helper ("init parent") reads ``DIR/config.json``, creates and joins the
container's cgroup (limits from ``linux.resources``), joins or unshares the
spec's namespaces (pid via ``unshare(CLONE_NEWPID)``), then ``fork()``s: the
child is PID 1 of the new pid namespace.  The parent reports the child's host
pid on the sync fd and **exits at once**; it does not stay as a reaper.  The
container's PID 1 is then re-parented to the nearest *child subreaper*: the
caller (the shim) marks itself ``PR_SET_CHILD_SUBREAPER`` before starting the
helper, so it is the container's parent and gets its exit status from
``waitpid`` directly, exactly as containerd's shim does with ``runc create``.
This costs no resident Python process per container and gives runc and the
built-in executor the same shape (both leave a detached PID 1 behind).

The child sets up the mount namespace in the new root (bind of root.path,
the spec's mounts in order, a private /dev with the standard nodes bound from
the host's, the cgroup hierarchies through the cgroup namespace),
``pivot_root``s, masks and read-only-remounts paths, sets the hostname,
rlimits, oom_score_adj, working directory, no_new_privs, the bounding set,
uid/gids and capabilities, marks every fd >= 3 close-on-exec and execs
``process.args``.

Sync protocol (one pipe, ``--sync-fd``; JSON lines, each below PIPE_BUF so
writes from the two writers never interleave)
  * ``{"pid": N}``      from the parent: the container PID 1's host pid;
  * ``{"ready": true}`` from the child: set up, about to exec (or, with
    ``--start-fd``, waiting for the caller to write a byte or close it: OCI
    ``create``/``start``);
  * ``{"error": "...", "errno": N, "stage": "..."}`` from either, on failure
    before exec; the process then exits with :func:`exit_code_for`.
The write end is close-on-exec in the child: **EOF after ``ready`` without an
error means execve succeeded.**

Seccomp (``linux.seccomp``) is loaded through libseccomp's binding in
runc's order (see :meth:`Container.seccomp_apply`); ``process.terminal``
makes fd 0 (a pty slave from the shim) the controlling terminal.
Not done yet: device rules on cgroup v2 (an eBPF program; v1 rules are written
here as a stopgap until the cgroup manager owns them), user
namespaces, a console socket for ``process.terminal``, apparmor/selinux labels.
"""

from __future__ import annotations

import argparse
import encodings.ascii  # noqa: F401 - codecs and extension modules are imported before
import errno as _errno   # pivot_root / setns(mnt): the host's stdlib is not reachable after
import fcntl
import json
import os
import resource
import signal
import socket
import stat
import sys
import termios
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from agent.runtime import syscalls as sc
from agent.runtime.syscalls import Syscalls

#: OCI namespace type -> clone flag
NAMESPACE_FLAGS: dict[str, int] = {
    "pid": sc.CLONE_NEWPID, "network": sc.CLONE_NEWNET, "mount": sc.CLONE_NEWNS,
    "ipc": sc.CLONE_NEWIPC, "uts": sc.CLONE_NEWUTS, "cgroup": sc.CLONE_NEWCGROUP,
    "user": sc.CLONE_NEWUSER,
}

#: the nodes every container's private /dev gets, bound from the host's /dev
STANDARD_DEVICES: tuple[str, ...] = ("null", "zero", "full", "random", "urandom", "tty")

#: /dev symlinks (runc's setupDevSymlinks and setupPtmx)
DEV_SYMLINKS: tuple[tuple[str, str], ...] = (
    ("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"), ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"), ("pts/ptmx", "ptmx"),
)

#: pty ioctls Python's termios does not name
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_SYMLINKS = 255


class StageError(Exception):
    """A setup step failed: carries the stage name and the errno (0 when none applies)."""

    def __init__(self, stage: str, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.stage = stage
        self.errno = errno


def exit_code_for(stage: str, err: int) -> int:
    """Docker's exit code for a failure before exec: 127 not found, 126 not invokable, 125 else."""
    if stage == "exec":
        if err == _errno.ENOENT:
            return 127
        if err in (_errno.EACCES, _errno.ENOEXEC, _errno.EISDIR, _errno.EPERM, _errno.ENOTDIR):
            return 126
    return 125


# --------------------------------------------------------------------------- #
# pure helpers (unit-tested without root)
# --------------------------------------------------------------------------- #


def secure_join(root: str, unsafe: str) -> str:
    """``unsafe`` resolved inside ``root`` as if ``root`` were ``/``.

    Symlinks met on the way are followed *within* the root (an absolute target
    restarts at the root, ``..`` stops at it), so the result never leaves
    ``root`` (filepath-securejoin's algorithm).  Missing components are kept
    literally.  Races with a concurrently changing root are not handled: the
    rootfs is not in use by anything before the container starts.
    """
    root = os.path.abspath(root)
    parts = [p for p in unsafe.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    followed = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        except NotADirectoryError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            followed += 1
            if followed > _MAX_SYMLINKS:
                raise OSError(_errno.ELOOP, f"too many symlinks resolving {unsafe!r} in {root!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def lookup_executable(name: str, env: Iterable[str],
                      exists: Any = os.path.exists, executable: Any = None) -> str:
    """``name`` resolved against ``PATH`` from ``env`` (in the current root).

    Raises ``OSError(ENOENT)`` when it is nowhere, ``OSError(EACCES)`` when
    found but not executable (Docker: 127 and 126).
    """
    is_exec = executable or (lambda p: os.access(p, os.X_OK) and not os.path.isdir(p))
    if "/" in name:
        if not exists(name):
            raise OSError(_errno.ENOENT, f"exec: {name!r}: no such file or directory")
        if not is_exec(name):
            raise OSError(_errno.EACCES, f"exec: {name!r}: permission denied")
        return name
    path = DEFAULT_PATH
    for item in env:
        if item.startswith("PATH="):
            path = item[5:]
    denied: str | None = None
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if exists(candidate):
            if is_exec(candidate):
                return candidate
            denied = denied or candidate
    if denied is not None:
        raise OSError(_errno.EACCES, f"exec: {name!r} ({denied}): permission denied")
    raise OSError(_errno.ENOENT, f"exec: {name!r}: executable file not found in $PATH ({path})")


def env_mapping(env: Iterable[str]) -> dict[str, str]:
    """``["K=V", …]`` as execve's mapping (later entries win; entries without ``=`` are dropped)."""
    out: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep and key:
            out[key] = value
    return out


def resources_from_spec(linux_resources: Mapping[str, Any] | None) -> Any:
    """``linux.resources`` (OCI) translated to the cgroup manager's :class:`Resources`."""
    from agent.runtime.cgroups import CPU_PERIOD_US, Resources

    r = linux_resources or {}
    memory = r.get("memory") or {}
    cpu = r.get("cpu") or {}
    pids = r.get("pids") or {}
    cpus: float | None = None
    quota, period = cpu.get("quota"), cpu.get("period") or CPU_PERIOD_US
    if quota is not None and quota > 0:
        cpus = quota / period
    return Resources(
        memory=memory.get("limit"),
        memory_reservation=memory.get("reservation"),
        memory_swap=memory.get("swap"),
        cpus=cpus,
        cpu_shares=cpu.get("shares"),
        cpuset_cpus=cpu.get("cpus"),
        cpuset_mems=cpu.get("mems"),
        pids_limit=pids.get("limit"),
    )


def namespace_plan(namespaces: Iterable[Mapping[str, Any]]) -> tuple[int, list[tuple[str, int]]]:
    """(flags to unshare, [(path, flag) to setns]) for ``linux.namespaces``."""
    flags = 0
    joins: list[tuple[str, int]] = []
    for ns in namespaces:
        kind = ns.get("type", "")
        if kind not in NAMESPACE_FLAGS:
            raise StageError("namespaces", f"unknown namespace type {kind!r}", _errno.EINVAL)
        if kind == "user":
            raise StageError("namespaces", "user namespaces are not supported yet", _errno.ENOTSUP)
        if ns.get("path"):
            joins.append((str(ns["path"]), NAMESPACE_FLAGS[kind]))
        else:
            flags |= NAMESPACE_FLAGS[kind]
    return flags, joins


@dataclass(frozen=True)
class CgroupHierarchy:
    """One host cgroup mount under /sys/fs/cgroup: its name there, type and super options."""

    name: str          # "memory", "systemd", "unified", or "" for a v2 mount at the root itself
    fstype: str        # "cgroup" or "cgroup2"
    data: str          # what mount(2) needs to mount the same hierarchy ("memory", "name=systemd")


def cgroup_hierarchies(mountinfo: str, root: str = "/sys/fs/cgroup") -> list[CgroupHierarchy]:
    """The cgroup hierarchies mounted at or directly under ``root``, from /proc/self/mountinfo."""
    out: list[CgroupHierarchy] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, mountpoint = fields[sep + 1], fields[4].replace("\\040", " ")
        if fstype not in ("cgroup", "cgroup2"):
            continue
        if mountpoint == root:
            name = ""
        elif os.path.dirname(mountpoint) == root:
            name = os.path.basename(mountpoint)
        else:
            continue
        supers = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        data = ",".join(o for o in supers if o not in ("rw", "ro")) if fstype == "cgroup" else ""
        out.append(CgroupHierarchy(name, fstype, data))
    return out


# --------------------------------------------------------------------------- #
# the sync pipe
# --------------------------------------------------------------------------- #


def send(fd: int, message: Mapping[str, Any]) -> None:
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    if len(data) > 4000:  # stay below PIPE_BUF: one atomic write
        data = (json.dumps({**message, "error": str(message.get("error", ""))[:3000]}) + "\n").encode()
    os.write(fd, data)


def fail(fd: int, stage: str, exc: BaseException) -> NoReturn:
    err = exc.errno if isinstance(exc, (OSError, StageError)) and exc.errno else 0
    message = str(exc) or type(exc).__name__
    try:
        send(fd, {"error": message, "errno": err, "stage": stage, "exit_code": exit_code_for(stage, err)})
    finally:
        os._exit(exit_code_for(stage, err))


# --------------------------------------------------------------------------- #
# the container side
# --------------------------------------------------------------------------- #


class Container:
    """The setup steps, over an injected :class:`Syscalls` (STYLE habit 8)."""

    def __init__(self, spec: Mapping[str, Any], bundle: str, sys_: Syscalls,
                 host_mountinfo: str = "") -> None:
        self.spec = spec
        self.bundle = bundle
        self.sys = sys_
        self.host_mountinfo = host_mountinfo
        root = spec.get("root", {}).get("path", "rootfs")
        self.root = os.path.realpath(os.path.join(bundle, root))
        self.stage = "init"

    # --- mounts, before pivot_root ------------------------------------------

    def prepare_root(self) -> None:
        self.stage = "rootfs"
        self.sys.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        self.sys.mount(self.root, self.root, None, sc.MS_BIND | sc.MS_REC)

    def _make_target(self, target: str, is_file: bool) -> None:
        if is_file:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        else:
            os.makedirs(target, exist_ok=True)

    def do_mounts(self) -> None:
        for m in self.spec.get("mounts", []):
            dest = m["destination"]
            self.stage = f"mount {dest}"
            self.mount_one(m)
        if self._dev_is_private():
            self.stage = "devices"
            self.create_devices()

    def _dev_is_private(self) -> bool:
        return any(m["destination"] == "/dev" and m.get("type") == "tmpfs" for m in self.spec.get("mounts", []))

    def mount_one(self, m: Mapping[str, Any]) -> None:
        opts = sc.mount_flags_from_options(m.get("options", []))
        kind = m.get("type", "")
        source = m.get("source", "")
        target = secure_join(self.root, m["destination"])
        is_bind = kind == "bind" or bool(opts.flags & sc.MS_BIND)
        if is_bind:
            if not source.startswith("/"):
                source = os.path.join(self.bundle, source)
            self._make_target(target, is_file=not os.path.isdir(source))
            self.sys.mount(source, target, None, sc.MS_BIND | (opts.flags & sc.MS_REC))
            extra = opts.flags & ~(sc.MS_BIND | sc.MS_REC | sc.MS_REMOUNT)
            if extra:
                self.sys.mount(None, target, None, sc.MS_REMOUNT | sc.MS_BIND | extra)
        elif kind == "cgroup":
            self._make_target(target, is_file=False)
            self.mount_cgroups(target, opts.flags)
        else:
            self._make_target(target, is_file=False)
            self.sys.mount(source or kind, target, kind, opts.flags, opts.data or None)
        if opts.propagation:
            self.sys.mount(None, target, None, opts.propagation)

    def mount_cgroups(self, target: str, flags: int) -> None:
        """The host's cgroup hierarchies, rooted at the container's cgroup by the cgroup namespace."""
        hierarchies = cgroup_hierarchies(self.host_mountinfo)
        flags &= ~sc.MS_REMOUNT
        unified_root = [h for h in hierarchies if h.name == "" and h.fstype == "cgroup2"]
        if unified_root or not hierarchies:  # pure v2
            self.sys.mount("cgroup2", target, "cgroup2", flags, None)
            return
        self.sys.mount("tmpfs", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "mode=755")
        for h in hierarchies:
            if not h.name:
                continue
            sub = os.path.join(target, h.name)
            os.makedirs(sub, exist_ok=True)
            self.sys.mount("cgroup", sub, h.fstype, flags, h.data or None)
            for controller in h.data.split(","):
                # co-mounted controllers (cpu,cpuacct) get a symlink per name, as on the host
                if controller and "=" not in controller and controller != h.name and "," in h.name:
                    link = os.path.join(target, controller)
                    if not os.path.lexists(link):
                        os.symlink(h.name, link)
        if flags & sc.MS_RDONLY:
            self.sys.mount(None, target, None,
                           sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_RDONLY, "mode=755")

    def create_devices(self) -> None:
        dev = secure_join(self.root, "/dev")
        for name in STANDARD_DEVICES:
            host = f"/dev/{name}"
            if not os.path.exists(host):
                continue
            target = os.path.join(dev, name)
            self._make_target(target, is_file=True)
            self.sys.mount(host, target, None, sc.MS_BIND)
        for source, name in DEV_SYMLINKS:
            link = os.path.join(dev, name)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(source, link)
        if os.path.exists("/proc/kcore"):
            link = os.path.join(dev, "core")
            if not os.path.lexists(link):
                os.symlink("/proc/kcore", link)

    # --- pivot_root and what is done from inside ------------------------------

    def pivot(self) -> None:
        self.stage = "pivot_root"
        os.chdir(self.root)
        self.sys.pivot_root(".", ".")
        self.sys.mount(None, ".", None, sc.MS_SLAVE | sc.MS_REC)  # the umount must not reach the host
        self.sys.umount2(".", sc.MNT_DETACH)
        os.chdir("/")

    def mask_paths(self) -> None:
        for path in self.spec.get("linux", {}).get("maskedPaths", []):
            self.stage = f"mask {path}"
            try:
                is_dir = os.path.isdir(path) and not os.path.islink(path)
                if is_dir:
                    self.sys.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY, None)
                else:
                    self.sys.mount("/dev/null", path, None, sc.MS_BIND)
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                continue

    def readonly_paths(self) -> None:
        for path in self.spec.get("linux", {}).get("readonlyPaths", []):
            self.stage = f"readonly {path}"
            try:
                self.sys.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            except FileNotFoundError:
                continue
            self.sys.mount(None, path, None,
                           sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC | self._mount_flags(path))

    def _mount_flags(self, path: str) -> int:
        """The locked per-mount flags of ``path`` (a bind remount must keep them)."""
        try:
            st = os.statvfs(path)
        except OSError:
            return 0
        flags = 0
        for bit, flag in ((os.ST_NOSUID, sc.MS_NOSUID), (os.ST_NODEV, sc.MS_NODEV),
                          (os.ST_NOEXEC, sc.MS_NOEXEC)):
            if st.f_flag & bit:
                flags |= flag
        return flags

    def readonly_root(self) -> None:
        if self.spec.get("root", {}).get("readonly"):
            self.stage = "readonly root"
            self.sys.mount(None, "/", None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | self._mount_flags("/"))

    def hostname(self) -> None:
        name = self.spec.get("hostname")
        if name:
            self.stage = "hostname"
            self.sys.sethostname(name)
        domain = self.spec.get("domainname")
        if domain:
            self.stage = "domainname"
            self.sys.setdomainname(domain)

    def console(self, console_fd: int) -> None:
        """runc's console socket: make the pty in the container's own devpts (so ``tty`` names
        /dev/pts/N inside), send its master to the caller over ``console_fd`` (a unix
        socket), and make the slave our stdio."""
        self.stage = "console"
        master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        fcntl.ioctl(master, TIOCSPTLCK, b"\0\0\0\0")
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
        with socket.socket(fileno=console_fd) as sock:
            socket.send_fds(sock, [b"m"], [master])
        os.close(master)
        for n in range(3):
            os.dup2(slave, n, inheritable=True)
        os.close(slave)

    def reset_signals(self) -> None:
        """Default dispositions and an empty mask for the process we exec: what Python or the
        shim ignore (SIGPIPE, SIGINT, SIGHUP) must not be inherited by the container."""
        self.stage = "signals"
        for sig in signal.valid_signals():
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    def controlling_terminal(self) -> None:
        """``process.terminal``: fd 0 is a pty slave (the shim's); make it our controlling
        terminal in a new session, so shells get job control and ^C reaches the foreground."""
        self.stage = "terminal"
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def seccomp_load(self) -> None:
        """Import the libseccomp binding while the host's files are still reachable."""
        if self.spec.get("linux", {}).get("seccomp"):
            self.stage = "seccomp"
            from agent.runtime import seccomp

            seccomp.load_binding()

    def seccomp_apply(self) -> None:
        """Load ``linux.seccomp``: with no_new_privs right before execve; otherwise before the
        credentials change, while CAP_SYS_ADMIN still allows it (runc's order)."""
        profile = self.spec.get("linux", {}).get("seccomp")
        if profile:
            self.stage = "seccomp"
            from agent.runtime import seccomp

            seccomp.apply(profile)

    @property
    def no_new_privileges(self) -> bool:
        return bool(self.spec.get("process", {}).get("noNewPrivileges"))

    def rlimits(self) -> None:
        process = self.spec.get("process", {})
        for rl in process.get("rlimits", []):
            self.stage = f"rlimit {rl['type']}"
            kind = getattr(resource, rl["type"], None)
            if kind is None:
                raise StageError(self.stage, f"unknown rlimit {rl['type']!r}", _errno.EINVAL)
            soft, hard = (resource.RLIM_INFINITY if v >= 2**63 else v for v in (rl["soft"], rl["hard"]))
            resource.setrlimit(kind, (soft, hard))
        if "oomScoreAdj" in process:
            self.stage = "oom_score_adj"
            with open("/proc/self/oom_score_adj", "w", encoding="ascii") as f:
                f.write(str(process["oomScoreAdj"]))

    def chdir(self) -> None:
        cwd = self.spec.get("process", {}).get("cwd", "/")
        self.stage = "cwd"
        if not cwd.startswith("/"):
            raise StageError("cwd", f"working directory {cwd!r} is not absolute", _errno.EINVAL)
        os.chdir(cwd)  # after pivot_root: "/" is the container's root, ".." stops there

    def close_fds(self) -> None:
        self.stage = "close fds"
        self.sys.close_range(3, ~0, sc.CLOSE_RANGE_CLOEXEC)

    def credentials(self) -> None:
        """no_new_privs, bounding set, user and groups, then the capability sets."""
        process = self.spec.get("process", {})
        caps = process.get("capabilities", {})
        if process.get("noNewPrivileges"):
            self.stage = "no_new_privs"
            self.sys.set_no_new_privs()
        self.stage = "bounding set"
        self.sys.drop_bounding_set(_cap_numbers(caps.get("bounding", [])))
        user = process.get("user", {})
        uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
        self.stage = "user"
        self.sys.prctl(sc.PR_SET_KEEPCAPS, 1)
        os.setgroups([int(g) for g in user.get("additionalGids", [])])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        self.sys.prctl(sc.PR_SET_KEEPCAPS, 0)
        self.stage = "capabilities"
        self.sys.capset(sc.CapSets(
            effective=sc.capability_mask(_known(caps.get("effective", []))),
            permitted=sc.capability_mask(_known(caps.get("permitted", []))),
            inheritable=sc.capability_mask(_known(caps.get("inheritable", [])))))
        self.sys.clear_ambient()
        for cap in _cap_numbers(caps.get("ambient", [])):
            self.sys.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap)

    def enter_process(self) -> tuple[str, list[str], list[str]]:
        """The steps from here to exec, shared by a container's init and exec: rlimits, the
        working directory, fds, seccomp (before the credentials unless no_new_privs), the
        credentials; the command to exec."""
        self.rlimits()
        self.chdir()
        self.close_fds()
        if not self.no_new_privileges:
            self.seccomp_apply()
        self.credentials()
        return self.resolve_command()

    def exec_process(self, path: str, args: list[str], env: list[str]) -> NoReturn:
        """Default signals, seccomp under no_new_privs (as late as possible), then execve."""
        self.reset_signals()
        if self.no_new_privileges:
            self.seccomp_apply()
        self.stage = "exec"
        os.execve(path, args, env_mapping(env))

    def resolve_command(self) -> tuple[str, list[str], list[str]]:
        process = self.spec.get("process", {})
        args = list(process.get("args", []))
        env = list(process.get("env", []))
        self.stage = "exec"
        if not args:
            raise StageError("exec", "process.args is empty", _errno.EINVAL)
        return lookup_executable(args[0], env), args, env


def _known(names: Iterable[str]) -> list[str]:
    return [n for n in names if n in sc.CAPABILITIES]


def _cap_numbers(names: Iterable[str]) -> list[int]:
    return [sc.CAPABILITIES[n] for n in names if n in sc.CAPABILITIES]


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent.runtime.init")
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--cgroup-path")
    parser.add_argument("--sync-fd", type=int, required=True)
    parser.add_argument("--start-fd", type=int)
    parser.add_argument("--console-fd", type=int)
    return parser.parse_args(argv)


def device_rule_lines(rules: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``linux.resources.devices`` as v1 (file, line) writes: ``("devices.deny", "a *:* rwm")``."""
    out: list[tuple[str, str]] = []
    for rule in rules:
        kind = rule.get("type", "a") or "a"
        major = "*" if rule.get("major") is None else str(rule["major"])
        minor = "*" if rule.get("minor") is None else str(rule["minor"])
        access = rule.get("access", "rwm") or "rwm"
        line = "a" if kind == "a" and major == minor == "*" else f"{kind} {major}:{minor} {access}"
        out.append(("devices.allow" if rule.get("allow") else "devices.deny", line))
    return out


def setup_cgroup(spec: Mapping[str, Any], path: str) -> None:
    from agent.runtime.cgroups import detect

    manager = detect()
    manager.create(path)
    resources = spec.get("linux", {}).get("resources") or {}
    manager.apply(path, resources_from_spec(resources))
    # Stopgap until the cgroup manager owns device rules (v2 needs an eBPF program):
    # on v1 write linux.resources.devices, so CAP_MKNOD cannot open host disks.
    devices = getattr(manager, "_dir", lambda *_: None)("devices", _rel(path))
    if devices is not None and resources.get("devices"):
        for name, line in device_rule_lines(resources["devices"]):
            with open(os.path.join(devices, name), "w", encoding="ascii") as f:
                f.write(line)
    manager.add_process(path, os.getpid())


def _rel(path: str) -> Any:
    from agent.runtime.cgroups import cgroup_rel

    return cgroup_rel(path)


def child(spec: Mapping[str, Any], bundle: str, sync_fd: int, start_fd: int | None,
          sys_: Syscalls, host_mountinfo: str, console_fd: int | None = None) -> NoReturn:
    """PID 1 of the container: set up, report ready, wait for start, exec."""
    c = Container(spec, bundle, sys_, host_mountinfo)
    try:
        c.seccomp_load()
        namespaces = {ns.get("type") for ns in spec.get("linux", {}).get("namespaces", [])}
        if "mount" in namespaces:
            c.prepare_root()
            c.do_mounts()
            c.pivot()
            c.mask_paths()
            c.readonly_paths()
            c.readonly_root()
        else:
            raise StageError("namespaces", "a mount namespace is required", _errno.EINVAL)
        if "uts" in namespaces:
            c.hostname()
        if spec.get("process", {}).get("terminal"):
            if console_fd is not None:
                c.console(console_fd)
            c.controlling_terminal()
        path, args, env = c.enter_process()
    except BaseException as exc:  # noqa: BLE001 - everything is reported, then we exit
        fail(sync_fd, c.stage, exc)
    try:
        send(sync_fd, {"ready": True})
        if start_fd is not None:
            c.stage = "start"
            os.read(start_fd, 1)  # a byte, or EOF: start
            os.close(start_fd)
        c.exec_process(path, args, env)
    except BaseException as exc:  # noqa: BLE001
        fail(sync_fd, c.stage, exc)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None, sys_: Syscalls | None = None) -> NoReturn:
    args = _parse(sys.argv[1:] if argv is None else argv)
    sync_fd: int = args.sync_fd
    sys_ = sys_ or sc.LinuxSyscalls()
    stage = "config"
    try:
        bundle = os.path.abspath(args.bundle)
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
            spec = json.load(f)
        linux = spec.get("linux", {})
        unshare_flags, joins = namespace_plan(linux.get("namespaces", []))
        stage = "cgroup"
        cgroup_path = args.cgroup_path or linux.get("cgroupsPath") or f"/skiff/{args.id}"
        setup_cgroup(spec, cgroup_path)
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            host_mountinfo = f.read()
        stage = "namespaces"
        for path, flag in joins:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sys_.setns(fd, flag)
            finally:
                os.close(fd)
        sys_.unshare(unshare_flags)
        stage = "fork"
        pid = os.fork()
    except BaseException as exc:  # noqa: BLE001
        fail(sync_fd, stage, exc)
    if pid == 0:
        child(spec, bundle, sync_fd, args.start_fd, sys_, host_mountinfo, args.console_fd)
    send(sync_fd, {"pid": pid})
    os._exit(0)


if __name__ == "__main__":
    main()
