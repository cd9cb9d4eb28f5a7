"""The client zygote (controller.launch, controller.zygote): real processes, no agent needed.

A command that hangs is made by pointing skiff at a unix socket that listens but never answers.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller import launch, zygote
from tests.support.zygotes import stop_zygotes, zygote_pids

SKIFF = Path(sys.executable).parent / "skiff"


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "clients"
    yield directory
    stop_zygotes(directory)


def env_for(directory: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SKIFF_CLIENT_DIR": str(directory), **extra}
    env.pop("SKIFF_CLIENT_PERSIST", None)
    env.update(extra)
    return env


def skiff(directory: Path, *args: str, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SKIFF), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=env_for(directory, **extra), stdin=subprocess.DEVNULL)


def warm(directory: Path) -> int:
    """Start the zygote (the first skiff does) and wait until it serves; its pid."""
    skiff(directory, "--version")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = zygote_pids(directory)
        if pids and list(directory.glob("client-*.sock")):
            return pids[0]
        time.sleep(0.05)
    raise AssertionError(f"no zygote came up in {directory}")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def wait_for(predicate, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def silent_agent(tmp_path: Path) -> Iterator[str]:
    """A unix socket that accepts connections and never answers: skiff waits on it."""
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    yield f"unix://{path}"
    server.close()


# --- the request format -----------------------------------------------------------------------


def test_a_request_comes_back_whole() -> None:
    argv = ["skiff", "", "run", "-e", "A=b=c", "\udcff-not-utf8"]
    environ = {b"EMPTY": b"", b"WITH_EQUALS": b"x=y=z", b"BYTES": b"\xff\xfe"}
    data = launch.request(argv, environ, 0o027, blocked=1 << 14, ignored=(1 << 1) | (1 << 12))
    assert data[:4] == launch.MAGIC and int.from_bytes(data[4:8], "big") == len(data) - 8
    command = zygote.parse(data[8:], [10, 11, 12, 13])
    assert command.argv == argv
    assert command.environ == environ
    assert command.umask == 0o027
    assert zygote._signals(command.blocked) == {signal.SIGTERM}
    assert zygote._signals(command.ignored) == {signal.SIGINT, signal.SIGPIPE}


@pytest.mark.parametrize(("argv", "here"), [
    (["skiff", "ps"], False),
    (["skiff", "-i", "/dev/fd/63", "--on", "web", "ps"], True),
    (["skiff", "--tlscacert=/proc/self/fd/5", "ps"], True),
    (["skiff", "login", "-u", "me", "registry:5000"], True),
])
def test_commands_that_need_this_process_run_in_it(argv: list[str], here: bool) -> None:
    assert launch._runs_here(argv) is here


def test_the_key_follows_what_the_child_cannot_take_on(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin"}
    assert launch.code_key(base) == launch.code_key({**base, "SKIFF_HOST": "unix:///x", "TOKEN": "s"})
    for name, value in (("LANG", "C"), ("PYTHONIOENCODING", "latin-1"), ("GRPC_VERBOSITY", "debug")):
        assert launch.code_key(base) != launch.code_key({**base, name: value})
    probe = "from controller.launch import code_key; print(code_key({'PATH': '/usr/bin'}))"
    niced = subprocess.run(["nice", "-n", "5", sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True, cwd=Path(launch.__file__).parents[1])
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           cwd=Path(launch.__file__).parents[1])
    assert niced.stdout != plain.stdout


def test_the_zygote_keeps_nothing_of_its_first_callers_environment() -> None:
    kept = launch.zygote_environ({"PATH": "/bin", "HOME": "/root", "LANG": "C.UTF-8", "AWS_SECRET": "x",
                                  "SKIFF_HOST": "tcp://h:1", "GRPC_TRACE": "api"})
    assert "AWS_SECRET" not in kept and "SKIFF_HOST" not in kept
    assert kept["LANG"] == "C.UTF-8" and kept["GRPC_TRACE"] == "api"
    assert Path(kept["PYTHONPATH"].split(os.pathsep)[0], "controller", "zygote.py").exists()


@pytest.mark.parametrize("body", [b"", b"\x00\x00\x00\x05", b"\x00\x00\x00\x01\x00\x00\x00\x09ab"])
def test_a_truncated_request_is_refused(body: bytes) -> None:
    with pytest.raises(zygote.BadRequest):
        zygote.parse(body, [3, 4, 5, 6])


def test_a_connection_without_the_magic_is_refused_and_its_fds_closed() -> None:
    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    try:
        ours.sendmsg([b"HTTP/1.1 GET /"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(zygote.BadRequest):
            zygote.receive(theirs)
        assert set(os.listdir("/proc/self/fd")) <= before  # the fd it was sent is closed again
    finally:
        for s in (ours, theirs):
            s.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(("raw", "seconds"), [("", 600), ("0", 0), ("off", 0), ("no", 0), ("30", 30),
                                               ("2.5", 2.5), ("junk", 600), ("-4", 0)])
def test_persist_seconds(raw: str, seconds: float) -> None:
    assert launch.persist_seconds({"SKIFF_CLIENT_PERSIST": raw} if raw else {}) == seconds


def test_the_client_directory_is_made_private_and_a_shared_one_is_not_used(tmp_path: Path) -> None:
    made = launch.client_dir({"SKIFF_CLIENT_DIR": str(tmp_path / "new")})
    assert made == str(tmp_path / "new")
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert launch.client_dir({"SKIFF_CLIENT_DIR": str(shared)}) is None
    link = tmp_path / "link"
    link.symlink_to(made)
    assert launch.client_dir({"SKIFF_CLIENT_DIR": str(link)}) is None


# --- real zygotes -------------------------------------------------------------------------------


def test_the_first_skiff_starts_a_zygote_and_the_next_ones_run_in_its_children(clients: Path) -> None:
    first = skiff(clients, "--version")
    assert first.returncode == 0 and "skiff" in first.stdout
    pid = warm(clients)
    socket_path = next(clients.glob("client-*.sock"))
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    for marker in ("one", "two"):  # each child has its caller's environment, not the zygote's
        result = skiff(clients, "version", SKIFF_HOST=f"unix:///nonexistent/{marker}.sock")
        assert result.returncode == 1
        assert f"/nonexistent/{marker}.sock" in result.stderr
        assert "Version:" in result.stdout
    assert zygote_pids(clients) == [pid]
    usage = skiff(clients, "no-such-command")
    assert usage.returncode == 2 and "No such command" in usage.stderr


def test_a_child_has_its_callers_streams_directory_umask_and_process_group(clients: Path, tmp_path: Path,
                                                                         silent_agent: str) -> None:
    pid = warm(clients)
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    out = tmp_path / "out"
    with open(out, "w") as stdout:
        proc = subprocess.Popen(["sh", "-c", f"umask 0027; exec {SKIFF} -H {silent_agent} version"], cwd=workdir,
                                env=env_for(clients), stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=subprocess.PIPE)
        try:
            child = wait_for(lambda: children_of(pid))[0]
            assert os.readlink(f"/proc/{child}/cwd") == str(workdir)
            assert os.stat(f"/proc/{child}/fd/1").st_ino == os.stat(out).st_ino
            status = Path(f"/proc/{child}/status").read_text()
            assert "Umask:\t0027" in status
            assert os.getpgid(child) == child
            assert Path(f"/proc/{child}/comm").read_text().strip() == "skiff"
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()  # type: ignore[union-attr]


def test_signals_reach_the_child_and_its_status_comes_back(clients: Path, silent_agent: str) -> None:
    pid = warm(clients)
    proc = subprocess.Popen([str(SKIFF), "-H", silent_agent, "version"], env=env_for(clients),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = wait_for(lambda: children_of(pid))[0]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGTERM  # as a skiff ended by SIGTERM in its own process
    wait_for(lambda: not Path(f"/proc/{child}").exists() or child not in children_of(pid))


def test_a_killed_caller_takes_its_command_with_it(clients: Path, silent_agent: str) -> None:
    pid = warm(clients)
    proc = subprocess.Popen([str(SKIFF), "-H", silent_agent, "version"], env=env_for(clients),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = wait_for(lambda: children_of(pid))[0]
    proc.kill()
    proc.wait()
    wait_for(lambda: child not in children_of(pid))
    assert zygote_pids(clients) == [pid]  # the zygote itself serves on
    assert skiff(clients, "--version").returncode == 0


def test_a_dead_zygote_costs_nothing_but_a_cold_start(clients: Path) -> None:
    pid = warm(clients)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not zygote_pids(clients))
    result = skiff(clients, "--version")  # a stale socket: run here, and start a new zygote
    assert result.returncode == 0 and "skiff" in result.stdout
    assert wait_for(lambda: [p for p in zygote_pids(clients) if p != pid])


def test_closed_standard_streams_and_persist_zero_run_without_a_zygote(clients: Path) -> None:
    closed = subprocess.run(["sh", "-c", f"exec {SKIFF} --version 0<&-"], capture_output=True, text=True,
                            env=env_for(clients), timeout=60)
    assert closed.returncode == 0 and "skiff" in closed.stdout
    off = skiff(clients, "--version", SKIFF_CLIENT_PERSIST="0")
    assert off.returncode == 0 and "skiff" in off.stdout
    time.sleep(0.5)
    assert not zygote_pids(clients)


def test_an_idle_zygote_leaves_and_removes_its_socket(clients: Path) -> None:
    skiff(clients, "--version", SKIFF_CLIENT_PERSIST="1")
    pid = wait_for(lambda: zygote_pids(clients))[0]
    wait_for(lambda: not alive(pid), timeout=30)
    assert not list(clients.glob("client-*.sock")) and not list(clients.glob("client-*.pid"))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_zygote_started_with_odd_signal_state_serves_normally(clients: Path, silent_agent: str) -> None:
    """The first caller ignores SIGCHLD and blocks SIGTERM: neither reaches the zygote or later
    commands (a SIGTERM still ends a command)."""
    odd = ("import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
           "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); os.execv(sys.argv[1], sys.argv[1:])")
    subprocess.run([sys.executable, "-c", odd, str(SKIFF), "--version"], env=env_for(clients), check=True,
                   capture_output=True, timeout=60)
    pid = wait_for(lambda: zygote_pids(clients))[0]
    wait_for(lambda: list(clients.glob("client-*.sock")))
    status = Path(f"/proc/{pid}/status").read_text()
    assert "SigBlk:\t0000000000000000" in status
    assert int(status.split("SigIgn:")[1].split()[0], 16) & (1 << (signal.SIGCHLD - 1)) == 0
    usage = skiff(clients, "no-such-command")
    assert usage.returncode == 2  # the zygote reaped its child and sent the status
    proc = subprocess.Popen([str(SKIFF), "-H", silent_agent, "version"], env=env_for(clients),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: children_of(pid))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM


def test_a_caller_that_leaves_at_once_leaves_nothing_running(clients: Path, tmp_path: Path) -> None:
    """Callers that close right after the zygote's answer: no command runs without its caller."""
    pid = warm(clients)
    path = str(next(clients.glob("client-*.sock")))
    marker = tmp_path / "ran"
    devnull = os.open(os.devnull, os.O_RDWR)
    cwd = os.open("/", os.O_PATH)
    try:
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (devnull, devnull, devnull, cwd))
        # a command that takes a while before it would leave a trace
        data = launch.request(["skiff", "--retry-file", str(marker), "-H", "unix:///nonexistent.sock", "ps"],
                              dict(os.environb), 0o022)
        for _ in range(50):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            assert conn.recv(5)[:1] == b"P"
            conn.close()
    finally:
        os.close(devnull)
        os.close(cwd)
    wait_for(lambda: not children_of(pid))
    assert zygote_pids(clients) == [pid]


def test_the_commands_end_with_their_zygote(clients: Path, silent_agent: str) -> None:
    pid = warm(clients)
    proc = subprocess.Popen([str(SKIFF), "-H", silent_agent, "version"], env=env_for(clients),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    child = wait_for(lambda: children_of(pid))[0]
    os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 125 and b"zygote ended" in err
    wait_for(lambda: not alive(child))


def test_a_slow_caller_does_not_hold_up_the_others(clients: Path) -> None:
    warm(clients)
    path = str(next(clients.glob("client-*.sock")))
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(path)
    try:
        slow.send(launch.MAGIC[:1])  # and nothing more: the zygote gives up on it
        result = subprocess.run([str(SKIFF), "--version"], env=env_for(clients), capture_output=True,
                                text=True, timeout=15, stdin=subprocess.DEVNULL)
        assert result.returncode == 0
        assert slow.recv(1) == b""  # dropped
    finally:
        slow.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_a_caller_in_another_namespace_is_refused(clients: Path) -> None:
    warm(clients)
    path = str(next(clients.glob("client-*.sock")))
    probe = (
        "import os, socket, sys\n"
        "from controller import launch\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "fds = b''.join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, os.open('/', os.O_PATH)))\n"
        "s.sendmsg([launch.request(['skiff', '--version'], {}, 0o022)], "
        "[(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])\n"
        "try:\n"
        "    data = s.recv(5)\n"
        "    print(repr(data) if data else 'refused')\n"
        "except ConnectionResetError:\n"
        "    print('refused')\n"
    )
    result = subprocess.run(["unshare", "--net", sys.executable, "-c", probe, path], capture_output=True, text=True,
                            timeout=30, cwd=Path(launch.__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"
