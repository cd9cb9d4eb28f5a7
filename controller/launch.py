"""``skiff``'s entry point: hand the command to this user's warm client process, or run it here.

Every ``skiff`` is a fresh interpreter, and a short command's wall time is mostly start-up:
click, protobuf, grpc and the command modules cost ~120 ms to import on a small host before the
first byte goes to the agent.  So, as ssh's ControlPersist keeps a master connection, the first
``skiff`` also starts a *zygote* (:mod:`controller.zygote`): an interpreter that imports all of
that once and waits on an owner-only unix socket in this user's runtime directory.  Later
``skiff`` processes send it their arguments, environment, working directory, umask and standard
streams; it forks a child that runs the command exactly as this process would have, this process
relays its signals (Ctrl-C, SIGWINCH, SIGTERM ...) to the child, and leaves with the child's status.

The zygote exits after ``$SKIFF_CLIENT_PERSIST`` seconds unused (600 by default; ``0`` turns the
whole mechanism off and every command runs in its own process).  A changed skiff (its code, its
installed packages), another Python or another group list gets a zygote of its own.

This module is on the path of every command, so it imports only what the interpreter has already
loaded (os, sys) and small C modules.
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys

DEFAULT_PERSIST = 600
MAGIC = b"SKZ1"
#: signals this process passes on to the child's process group, as a terminal would have
RELAYED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGWINCH", "SIGUSR1", "SIGUSR2", "SIGCONT")


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


#: a child runs in its zygote's namespaces: ``ip netns exec NS skiff …`` needs a zygote of its own
NAMESPACES = ("net", "mnt", "pid", "user", "uts", "ipc", "cgroup")


def code_key() -> str:
    """What a zygote must share with this process to run its commands: the interpreter, skiff's
    code (the newest of its modules' modification times), the installed packages (their
    directories' times), the user and its groups, the namespaces and the root directory."""
    import zlib

    here = os.path.dirname(os.path.abspath(__file__))
    newest = 0
    for directory in (here, os.path.join(here, "commands")):
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.endswith(".py"):
                        newest = max(newest, entry.stat().st_mtime_ns)
        except OSError:
            pass
    for path_entry in sys.path:
        if path_entry.endswith("-packages"):
            try:
                newest = max(newest, os.stat(path_entry).st_mtime_ns)
            except OSError:
                pass
    parts = [sys.executable, here, str(newest), str(os.getuid()), str(os.getgid()),
             ",".join(str(g) for g in sorted(os.getgroups())), ":".join(sys.path)]
    for name in NAMESPACES:
        try:
            parts.append(os.readlink(f"/proc/self/ns/{name}"))
        except OSError:
            parts.append(name)
    root = os.stat("/")
    parts.append(f"{root.st_dev}:{root.st_ino}")
    return f"{zlib.crc32(chr(0).join(parts).encode(errors='surrogateescape')):08x}"


def pack(items: list[bytes]) -> bytes:
    """A count, then each item with its length (4 bytes each, big-endian)."""
    return len(items).to_bytes(4, "big") + b"".join(len(i).to_bytes(4, "big") + i for i in items)


def request(argv: list[str], environ: dict[bytes, bytes], umask: int) -> bytes:
    body = (pack([os.fsencode(a) for a in argv]) + pack([k + b"=" + v for k, v in environ.items()])
            + umask.to_bytes(4, "big"))
    return MAGIC + len(body).to_bytes(4, "big") + body


def _inline() -> None:
    from controller.main import main as run

    run()


def _spawn(path: str, persist: float) -> None:
    """Start the zygote for ``path`` in its own session, unless one is already starting (it holds
    the lock while it imports)."""
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
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-P", "-m", "controller.zygote", path, str(persist)],
                       os.environ, setsid=True,
                       file_actions=[(os.POSIX_SPAWN_OPEN, 0, devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_OPEN, 1, devnull, os.O_WRONLY, 0),
                                     (os.POSIX_SPAWN_DUP2, 1, 2)])
    except OSError:
        pass


def _connect(path: str) -> _socket.socket | None:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:
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


def hand_over(sock: _socket.socket, argv: list[str]) -> int:
    """Send the command to the zygote; the pid of the child running it (its process group's id)."""
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        data = request(argv, dict(os.environb), umask)
        fds = (0, 1, 2, cwd)
        sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                      b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
        if sent < len(data):
            sock.sendall(data[sent:])
    finally:
        os.close(cwd)
    reply = _read_exact(sock, 5)
    if len(reply) != 5 or reply[:1] != b"P":
        raise ConnectionError("the zygote did not start the command")
    return int.from_bytes(reply[1:], "big")


def wait_status(sock: _socket.socket, pid: int) -> int:
    """Relay signals to the child's process group until the zygote sends its wait status."""
    def relay(signum: int, frame: object) -> None:
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass

    for name in RELAYED:
        _signal.signal(getattr(_signal, name), relay)
    reply = _read_exact(sock, 5)
    if len(reply) != 5 or reply[:1] != b"S":
        sys.stderr.write("skiff: the client process ended without a status\n")
        return 125 << 8
    return int.from_bytes(reply[1:], "big")


def _usable_stdio() -> bool:
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return False
    return True


def main() -> None:
    persist = persist_seconds(os.environ)
    directory = client_dir(os.environ) if persist and _usable_stdio() else None
    if directory is None:
        return _inline()
    path = os.path.join(directory, f"client-{code_key()}.sock")
    if len(os.fsencode(path)) >= 108:  # sun_path's size
        return _inline()
    sock = _connect(path)
    if sock is None:
        _spawn(path, persist)
        return _inline()
    try:
        pid = hand_over(sock, sys.argv)
    except OSError:
        sock.close()
        return _inline()
    status = wait_status(sock, pid)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


if __name__ == "__main__":
    main()
