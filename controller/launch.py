"""``skiff``'s entry point: hand the command to this user's warm client process, or run it here.

Every ``skiff`` is a fresh interpreter, and a short command's wall time is mostly start-up:
click, protobuf, grpc and the command modules cost ~100 ms to import on a small host before the
first byte goes to the agent.  So, as ssh's ControlPersist keeps a master connection, the first
``skiff`` also starts a *zygote* (:mod:`controller.zygote`): an interpreter that imports all of
that once and waits on an owner-only unix socket in this user's runtime directory.  Later
``skiff`` processes send it their arguments, environment, working directory, umask, signal mask
and ignored signals, and standard streams; it forks a child that runs the command as this
process would have, this process relays its signals (Ctrl-C, SIGWINCH, SIGTERM, Ctrl-Z ...) to
the child, and leaves with the child's status.

What the child cannot take on from its caller is part of the zygote's key instead, so a caller
that differs gets a zygote of its own: the interpreter and skiff's code, the user and its groups,
the namespaces and root, the cgroup, resource limits and nice value, and the environment read at
import time (locale, ``PYTHON*``, ``GRPC_*``).  Commands that need the caller's terminal as their
controlling terminal (a job in the background of a shell, ``login``'s prompt) or its other open
files (``-i /dev/fd/63``) run here, as does everything when no zygote answers.

The zygote exits after ``$SKIFF_CLIENT_PERSIST`` seconds unused (600 by default; ``0`` turns the
whole mechanism off).  This module is on the path of every command, so it imports only what the
interpreter has already loaded (os, sys) and small C modules.
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys

DEFAULT_PERSIST = 600
MAGIC = b"SKZ2"
#: signals this process passes on to the child's process group, as a terminal would have
RELAYED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGWINCH", "SIGUSR1", "SIGUSR2", "SIGCONT", "SIGALRM")
#: job control: the child is stopped with this process
STOPS = ("SIGTSTP", "SIGTTIN", "SIGTTOU")
#: a child runs in its zygote's namespaces: ``ip netns exec NS skiff …`` needs a zygote of its own
NAMESPACES = ("net", "mnt", "pid", "user", "uts", "ipc", "cgroup")
#: environment read when modules are imported (the zygote's, not the caller's, would count)
IMPORT_TIME_ENV = ("LANG", "LC_", "PYTHON", "GRPC_", "PROTOCOL_BUFFERS", "SSL_CERT", "TZ")
#: commands run here: they ask the terminal itself for input (getpass opens /dev/tty)
INLINE_COMMANDS = frozenset({"login"})
CONNECT_REPLY_TIMEOUT = 10.0


def persist_seconds(environ: dict[str, str] | os._Environ[str]) -> float:
    """``$SKIFF_CLIENT_PERSIST`` (seconds; 0, ``no`` or ``off`` disable), default 600."""
    raw = environ.get("SKIFF_CLIENT_PERSIST", "").strip().lower()
    if not raw:
        return DEFAULT_PERSIST
    if raw in ("no", "off", "false"):
        return 0
    try:
        return max(0.0, float(raw))
    except ValueError:
        return DEFAULT_PERSIST


def client_dir(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The directory of this user's zygote sockets, made 0700 if missing; None when it is not
    safely ours (another owner, or open to others), and then no zygote is used."""
    base = environ.get("SKIFF_CLIENT_DIR")
    if not base:
        runtime = environ.get("XDG_RUNTIME_DIR") or ""
        try:
            ours = bool(runtime) and os.stat(runtime).st_uid == os.getuid()  # not sudo's caller's
        except OSError:
            ours = False
        base = os.path.join(runtime, "skiff") if ours else f"/tmp/skiff-{os.getuid()}"
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(base)
    except OSError:
        return None
    if (st.st_mode & 0o170000) != 0o040000 or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return base


def _read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _newest(directory: str, suffix: str) -> int:
    """The newest modification or change time of ``directory``'s files ending in ``suffix`` (the
    change time catches copies that keep modification times)."""
    newest = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(suffix):
                    st = entry.stat()
                    newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        pass
    return newest


def code_key(environ: dict[str, str] | os._Environ[str]) -> str:
    """What a zygote must share with this process to run its commands (see the module's doc)."""
    import zlib

    here = os.path.dirname(os.path.abspath(__file__))
    newest = max(_newest(here, ".py"), _newest(os.path.join(here, "commands"), ".py"))
    for entry in filter(None, sys.path):
        if entry.endswith("-packages"):
            try:
                st = os.stat(entry)
                newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
            except OSError:
                pass
        newest = max(newest, _newest(os.path.join(entry, "skiff", "v1"), "_pb2.py"))
    try:
        exe = os.stat(os.path.realpath(sys.executable))
        interpreter = f"{sys.executable}:{sys.version}:{exe.st_ino}:{exe.st_mtime_ns}"
    except OSError:
        interpreter = sys.executable
    parts = [interpreter, here, str(newest), str(os.getuid()), str(os.getgid()),
             ",".join(str(g) for g in sorted(os.getgroups())), ":".join(sys.path)]
    for name in NAMESPACES:
        try:
            parts.append(os.readlink(f"/proc/self/ns/{name}"))
        except OSError:
            parts.append(name)
    root = os.stat("/")
    parts.append(f"{root.st_dev}:{root.st_ino}")
    stat = _read("/proc/self/stat").rsplit(b")", 1)[-1].split()
    parts.append(stat[16].decode() if len(stat) > 16 else "")  # nice
    parts.append(_read("/proc/self/limits").decode(errors="replace"))
    parts.append(_read("/proc/self/cgroup").decode(errors="replace"))
    parts += sorted(f"{k}={v}" for k, v in environ.items() if k.startswith(IMPORT_TIME_ENV))
    return f"{zlib.crc32(chr(0).join(parts).encode(errors='surrogateescape')):08x}"


def signal_masks() -> tuple[int, int]:
    """This process's blocked and ignored signals (bit n-1 for signal n), from /proc."""
    blocked = ignored = 0
    for line in _read("/proc/self/status").splitlines():
        if line.startswith(b"SigBlk:"):
            blocked = int(line.split()[1], 16)
        elif line.startswith(b"SigIgn:"):
            ignored = int(line.split()[1], 16)
    return blocked, ignored


def pack(items: list[bytes]) -> bytes:
    """A count, then each item with its length (4 bytes each, big-endian)."""
    return len(items).to_bytes(4, "big") + b"".join(len(i).to_bytes(4, "big") + i for i in items)


def request(argv: list[str], environ: dict[bytes, bytes], umask: int, blocked: int = 0, ignored: int = 0) -> bytes:
    body = (pack([os.fsencode(a) for a in argv]) + pack([k + b"=" + v for k, v in environ.items()])
            + umask.to_bytes(4, "big") + blocked.to_bytes(8, "big") + ignored.to_bytes(8, "big"))
    return MAGIC + len(body).to_bytes(4, "big") + body


def _inline() -> None:
    from controller.main import main as run

    run()


def zygote_environ(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The zygote's own environment: what imports read, and where to find skiff; not the first
    caller's secrets (each child gets its own caller's environment)."""
    keep = {k: v for k, v in environ.items() if k.startswith(IMPORT_TIME_ENV) or k in ("PATH", "HOME")}
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keep["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, environ.get("PYTHONPATH", "")) if p)
    return keep


def _spawn(path: str, persist: float) -> None:
    """Start the zygote for ``path`` in its own session, with default signal dispositions and no
    blocked signal, unless one is already starting (it holds the lock while it imports)."""
    import fcntl

    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    os.close(fd)  # released: the zygote takes it
    devnull = os.devnull
    catchable = [n for n in range(1, _signal.NSIG) if n not in (_signal.SIGKILL, _signal.SIGSTOP)]
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-P", "-m", "controller.zygote", path, str(persist)],
                       zygote_environ(os.environ), setsid=True, setsigmask=(), setsigdef=catchable,
                       file_actions=[(os.POSIX_SPAWN_OPEN, 0, devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_OPEN, 1, devnull, os.O_WRONLY, 0),
                                     (os.POSIX_SPAWN_DUP2, 1, 2)])
    except (OSError, ValueError):
        pass


def _connect(path: str) -> _socket.socket | None:
    """A connection to the zygote at ``path``, only if the other end is this user's process."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    except OSError:
        sock.close()
        return None
    if int.from_bytes(creds[4:8], sys.byteorder) != os.getuid():
        sock.close()
        return None
    return sock


def _read_exact(sock: _socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def hand_over(sock: _socket.socket, argv: list[str], blocked: int, ignored: int) -> int:
    """Send the command to the zygote; the pid of the child running it (its process group's id).
    The child starts only once this process has its pid (it waits for the zygote's word), so
    any failure here leaves nothing running and the command can run here instead."""
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        data = request(argv, dict(os.environb), umask, blocked, ignored)
        fds = (0, 1, 2, cwd)
        sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                      b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
        if sent < len(data):
            sock.sendall(data[sent:])
    finally:
        os.close(cwd)
    sock.settimeout(CONNECT_REPLY_TIMEOUT)
    reply = _read_exact(sock, 5)
    sock.settimeout(None)
    if len(reply) != 5 or reply[:1] != b"P":
        raise ConnectionError("the zygote did not start the command")
    return int.from_bytes(reply[1:], "big")


def wait_status(sock: _socket.socket, pid: int, ignored: int) -> int:
    """Relay signals to the child's process group until the zygote sends its wait status."""
    def relay(signum: int, frame: object) -> None:
        try:
            os.killpg(pid, signum)
        except OSError:
            pass

    def stop(signum: int, frame: object) -> None:
        relay(_signal.SIGSTOP, frame)
        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # stopped here until SIGCONT, which is relayed
        _signal.signal(signum, stop)

    for name in RELAYED + STOPS:
        signum = getattr(_signal, name)
        if not ignored & (1 << (signum - 1)):
            _signal.signal(signum, stop if name in STOPS else relay)
    reply = _read_exact(sock, 5)
    if len(reply) != 5 or reply[:1] != b"S":
        relay(_signal.SIGKILL, None)  # the zygote is gone: so is the command
        sys.stderr.write("skiff: the client zygote ended before the command\n")
        return 125 << 8
    return int.from_bytes(reply[1:], "big")


def _runs_here(argv: list[str]) -> bool:
    """Whether this command must run in this process: it names one of this process's other open
    files, needs the terminal for a prompt, or the terminal's job control applies to it (this
    process is in the background of a shell)."""
    if any("/dev/fd/" in a or "/proc/self/fd/" in a for a in argv):
        return True
    if INLINE_COMMANDS.intersection(argv[1:]):
        return True
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            return True  # a closed standard stream cannot be passed on
        if os.isatty(fd):
            try:
                if os.tcgetpgrp(fd) != os.getpgrp():
                    return True
            except OSError:
                pass
    return False


def _exit_as(status: int) -> None:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum in (_signal.SIGQUIT, _signal.SIGILL, _signal.SIGABRT, _signal.SIGFPE, _signal.SIGSEGV,
                      _signal.SIGBUS, _signal.SIGTRAP, _signal.SIGSYS, _signal.SIGXCPU, _signal.SIGXFSZ):
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the child's core, not a second one
        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


def main() -> None:
    persist = persist_seconds(os.environ)
    directory = client_dir(os.environ) if persist and not _runs_here(sys.argv) else None
    if directory is None:
        return _inline()
    path = os.path.join(directory, f"client-{code_key(os.environ)}.sock")
    if len(os.fsencode(path)) >= 108:  # sun_path's size
        return _inline()
    sock = _connect(path)
    if sock is None:
        _spawn(path, persist)
        return _inline()
    blocked, ignored = signal_masks()
    try:
        pid = hand_over(sock, sys.argv, blocked, ignored)
    except OSError:
        sock.close()
        return _inline()
    _exit_as(wait_status(sock, pid, ignored))


if __name__ == "__main__":
    main()
