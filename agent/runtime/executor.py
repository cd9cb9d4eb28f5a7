"""OCI executors: run a bundle (``config.json`` + rootfs) as a container.

Two implementations of one :class:`Executor` protocol take the same bundle
(DESIGN: "the built-in executor and runc/crun take the same bundle"):

* :class:`BuiltinExecutor` starts ``python -m agent.runtime.init`` (a freshly
  exec'd, single-threaded helper; this module itself makes no namespace
  syscall) and talks to it over a sync pipe (see :mod:`agent.runtime.init`);
* :class:`RuncExecutor` drives ``runc --root STATE create/start/kill/delete``.

Process model, common to both: the container's PID 1 is left *detached*
(its starter exits), so the caller must be a child subreaper
(``PR_SET_CHILD_SUBREAPER``; the shim is) to become its parent and collect
its exit status with :meth:`ContainerProcess.wait`.  Executors check this and
refuse to start otherwise (``require_subreaper=False`` lifts the check).

State (pid, cgroup path, bundle) is written to ``state_dir/<id>/state.json``
so ``kill``/``delete`` work from another executor instance (a restarted
agent).  All roots are injected (STYLE habit 8).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from agent.errors import Internal, InvalidArgument, NotFound
from agent.runtime import syscalls as sc
from agent.runtime.init import exit_code_for

_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
DEFAULT_TIMEOUT = 30.0

StdioTarget = int | IO[Any] | None


class ContainerStartError(Internal):
    """The container could not be started: a setup stage failed before exec.

    ``stage`` names the step (``cgroup``, ``mount /proc``, ``pivot_root``,
    ``exec``, …), ``errno`` the kernel's error (0 when none), ``exit_code``
    Docker's code for it (127 not found, 126 not executable, 125 otherwise).
    Proposed for agent.errors as ``ContainerStartError(Internal)``, mapped to
    gRPC FAILED_PRECONDITION/INTERNAL by the API table.
    """

    def __init__(self, container_id: str, stage: str, message: str, errno_: int = 0,
                 exit_code: int | None = None) -> None:
        super().__init__(f"container {container_id}: {stage}: {message}")
        self.container_id = container_id
        self.stage = stage
        self.errno = errno_
        self.exit_code = exit_code if exit_code is not None else exit_code_for(stage, errno_)


class ContainerNotFound(NotFound):
    """No container of that id is known to this executor's state dir."""


@dataclass(frozen=True)
class Stdio:
    """What the container's fds 0, 1, 2 are: an fd, a file object, or None (/dev/null)."""

    stdin: StdioTarget = None
    stdout: StdioTarget = None
    stderr: StdioTarget = None


@dataclass
class ContainerProcess:
    """The container's PID 1, as a host pid; the caller (a subreaper) is its parent."""

    id: str
    pid: int
    _status: int | None = field(default=None, repr=False)

    def poll(self) -> int | None:
        """The exit code if PID 1 has exited (128+n for signal n), else None."""
        if self._status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                raise Internal(f"container {self.id}: pid {self.pid} is not our child "
                               "(is the caller a child subreaper?)") from None
            if pid == 0:
                return None
            self._status = status
        code = os.waitstatus_to_exitcode(self._status)
        return 128 - code if code < 0 else code

    def wait(self, timeout: float | None = None) -> int:
        """Block until PID 1 exits; its exit code.  Raises TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"container {self.id} (pid {self.pid}) still running after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)


@runtime_checkable
class Executor(Protocol):
    """Runs OCI bundles.  ``create`` sets up and stops before exec, ``start`` execs,
    ``run`` does both.  ``delete`` kills what is left and removes every trace."""

    def create(self, bundle: Path, container_id: str, stdio: Stdio) -> ContainerProcess: ...

    def start(self, container_id: str) -> None: ...

    def run(self, bundle: Path, container_id: str, stdio: Stdio) -> ContainerProcess: ...

    def kill(self, container_id: str, sig: int = signal.SIGTERM) -> None: ...

    def delete(self, container_id: str) -> None: ...


def is_child_subreaper() -> bool:
    """Whether this process is a child subreaper.

    PR_GET_CHILD_SUBREAPER writes through a pointer, which ``Syscalls.prctl``
    cannot take; this belongs in agent.runtime.syscalls as
    ``get_child_subreaper()`` (owned by another engineer: proposed there).
    """
    import ctypes

    value = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(sc.PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) != 0:
        return False
    return value.value != 0


def _cgroup_path(bundle: Path, container_id: str) -> str:
    spec = json.loads((bundle / "config.json").read_text())
    path = spec.get("linux", {}).get("cgroupsPath")
    return str(path) if path else f"/skiff/{container_id}"


class _State:
    """``state_dir/<id>/state.json``: what kill/delete need later."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def path(self, container_id: str) -> Path:
        if not container_id or "/" in container_id or container_id in (".", ".."):
            raise InvalidArgument(f"invalid container id {container_id!r}")
        return self.dir / container_id / "state.json"

    def save(self, container_id: str, **data: Any) -> None:
        path = self.path(container_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def load(self, container_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path(container_id).read_text()))
        except FileNotFoundError:
            raise ContainerNotFound(f"container {container_id}: no state in {self.dir}") from None

    def remove(self, container_id: str) -> None:
        d = self.path(container_id).parent
        for name in ("state.json", "state.tmp"):
            try:
                (d / name).unlink()
            except FileNotFoundError:
                pass
        try:
            d.rmdir()
        except FileNotFoundError:
            pass


@dataclass
class _Pending:
    """A created, not yet started container: the pipes to its init."""

    sync_r: int
    start_w: int
    process: ContainerProcess


def read_messages(fd: int, until_ready: bool, timeout: float) -> list[dict[str, Any]]:
    """JSON lines from the sync pipe until EOF (or, with ``until_ready``, until
    both ``pid`` and ``ready`` or an ``error`` arrived)."""
    import select

    buf = b""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        if until_ready:
            keys = {k for m in messages for k in m}
            if "error" in keys or {"pid", "ready"} <= keys:
                return messages
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer on the sync pipe within {timeout}s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if buf.strip():
                messages.append({"error": f"truncated message {buf!r}", "errno": 0, "stage": "sync"})
            return messages
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                try:
                    messages.append(dict(json.loads(line)))
                except ValueError:
                    messages.append({"error": f"garbled message {line!r}", "errno": 0, "stage": "sync"})


class BuiltinExecutor:
    """The built-in OCI executor over :mod:`agent.runtime.init`."""

    def __init__(self, state_dir: Path, *, python: str = sys.executable, timeout: float = DEFAULT_TIMEOUT,
                 require_subreaper: bool = True, cgroup_manager: Any = None, fork: bool = False) -> None:
        self.state = _State(Path(state_dir))
        self.python = python
        #: fork this (single-threaded!) process and run the init in the child instead of
        #: exec'ing a fresh interpreter: the shim's fast path.  Never in a threaded process.
        self.fork = fork
        self.timeout = timeout
        self.require_subreaper = require_subreaper
        self._cgroups = cgroup_manager
        self._pending: dict[str, _Pending] = {}

    def _manager(self) -> Any:
        if self._cgroups is None:
            from agent.runtime.cgroups import detect

            self._cgroups = detect()
        return self._cgroups

    def command(self, bundle: Path, container_id: str, cgroup_path: str, sync_fd: int,
                start_fd: int | None, console_fd: int | None = None) -> list[str]:
        cmd = [self.python, "-S", "-m", "agent.runtime.init", "--bundle", str(bundle), "--id", container_id,
               "--cgroup-path", cgroup_path, "--sync-fd", str(sync_fd)]
        if start_fd is not None:
            cmd += ["--start-fd", str(start_fd)]
        if console_fd is not None:
            cmd += ["--console-fd", str(console_fd)]
        return cmd

    def create(self, bundle: Path, container_id: str, stdio: Stdio,
               console_fd: int | None = None) -> ContainerProcess:
        """``console_fd``: a unix socket on which the init sends the master of a pty it makes
        in the container's devpts (``process.terminal``), like runc's --console-socket."""
        return self._spawn(bundle, container_id, stdio, wait_for_start=True, console_fd=console_fd)

    def run(self, bundle: Path, container_id: str, stdio: Stdio,
            console_fd: int | None = None) -> ContainerProcess:
        return self._spawn(bundle, container_id, stdio, wait_for_start=False, console_fd=console_fd)

    def _spawn(self, bundle: Path, container_id: str, stdio: Stdio, *, wait_for_start: bool,
               console_fd: int | None = None) -> ContainerProcess:
        if self.require_subreaper and not is_child_subreaper():
            raise Internal("the built-in executor needs its caller to be a child subreaper "
                           "(PR_SET_CHILD_SUBREAPER) to wait for the container")
        bundle = Path(bundle).resolve()
        state_path = self.state.path(container_id)
        if state_path.exists() or container_id in self._pending:
            raise InvalidArgument(f"container {container_id} already exists in {self.state.dir}")
        cgroup_path = _cgroup_path(bundle, container_id)
        self.state.save(container_id, bundle=str(bundle), cgroup=cgroup_path, pid=0)
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        start_r = start_w = -1
        if wait_for_start:
            start_r, start_w = os.pipe2(os.O_CLOEXEC)
        fds = [sync_w] + ([start_r] if wait_for_start else []) + ([console_fd] if console_fd is not None else [])
        env = {**os.environ, "PYTHONPATH": _PROJECT_ROOT}
        proc: subprocess.Popen[bytes] | _Forked | None = None
        pid = 0
        try:
            argv = self.command(bundle, container_id, cgroup_path, sync_w, start_r if wait_for_start else None,
                                console_fd)
            if self.fork:
                proc = _Forked.start(argv[argv.index("agent.runtime.init") + 1:], stdio, fds)
            else:
                proc = subprocess.Popen(
                    argv,
                    stdin=stdio.stdin if stdio.stdin is not None else subprocess.DEVNULL,
                    stdout=stdio.stdout if stdio.stdout is not None else subprocess.DEVNULL,
                    stderr=stdio.stderr if stdio.stderr is not None else subprocess.DEVNULL,
                    pass_fds=fds, env=env, cwd="/", close_fds=True)
            os.close(sync_w)
            sync_w = -1
            if wait_for_start:
                os.close(start_r)
                start_r = -1
            messages = read_messages(sync_r, until_ready=wait_for_start, timeout=self.timeout)
            proc.wait(timeout=self.timeout)  # the init parent exits right after {"pid": …}
            pid = next((int(m["pid"]) for m in messages if "pid" in m), 0)
            if pid:
                self.state.save(container_id, bundle=str(bundle), cgroup=cgroup_path, pid=pid)
            error = next((m for m in messages if "error" in m), None)
            if error is not None:
                raise ContainerStartError(container_id, str(error.get("stage", "?")), str(error["error"]),
                                          int(error.get("errno") or 0))
            if not pid or not any(m.get("ready") for m in messages):
                raise ContainerStartError(container_id, "sync", f"init exited {proc.returncode} without "
                                          f"reporting (messages: {messages})")
            process = ContainerProcess(container_id, pid)
            if wait_for_start:
                self._pending[container_id] = _Pending(sync_r, start_w, process)
                sync_r = start_w = -1
            return process
        except BaseException:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            self._cleanup(container_id, pid, cgroup_path)
            raise
        finally:
            for fd in (sync_r, sync_w, start_r, start_w):
                if fd >= 0:
                    os.close(fd)

    def start(self, container_id: str) -> None:
        pending = self._pending.pop(container_id, None)
        if pending is None:
            raise InvalidArgument(f"container {container_id} is not created by this executor (or already started)")
        try:
            os.write(pending.start_w, b"1")
            os.close(pending.start_w)
            messages = read_messages(pending.sync_r, until_ready=False, timeout=self.timeout)
        finally:
            os.close(pending.sync_r)
        error = next((m for m in messages if "error" in m), None)
        if error is not None:
            raise ContainerStartError(container_id, str(error.get("stage", "?")), str(error["error"]),
                                      int(error.get("errno") or 0))

    def kill(self, container_id: str, sig: int = signal.SIGTERM) -> None:
        pid = int(self.state.load(container_id).get("pid") or 0)
        if not pid:
            raise ContainerNotFound(f"container {container_id}: not running")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise ContainerNotFound(f"container {container_id}: pid {pid} is gone") from None

    def delete(self, container_id: str) -> None:
        """Kill every process left in the container's cgroup, reap PID 1, remove cgroup and state."""
        state = self.state.load(container_id)
        pending = self._pending.pop(container_id, None)
        if pending is not None:
            os.close(pending.start_w)
            os.close(pending.sync_r)
        self._cleanup(container_id, int(state.get("pid") or 0), str(state["cgroup"]))

    def _cleanup(self, container_id: str, pid: int, cgroup_path: str) -> None:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _reap(pid)
        manager = self._manager()
        try:
            manager.destroy(cgroup_path, kill=True)
        except FileNotFoundError:
            pass
        self.state.remove(container_id)


class _Forked:
    """The init helper run in a forked child of this single-threaded process (no exec)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, args: list[str], stdio: Stdio, keep: list[int]) -> _Forked:
        targets = [_fileno(t) for t in (stdio.stdin, stdio.stdout, stdio.stderr)]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                null = os.open(os.devnull, os.O_RDWR)
                for n, target in enumerate(targets):
                    os.dup2(null if target is None else target, n, inheritable=True)
                low = 3
                for fd in sorted(keep):
                    os.closerange(low, fd)
                    os.set_inheritable(fd, True)
                    low = fd + 1
                os.closerange(low, 1 << 16)
                os.chdir("/")
                from agent.runtime import init

                init.main(args)
            except BaseException:  # noqa: BLE001
                os._exit(125)
            os._exit(125)
        return cls(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(["init"], timeout or 0)
            time.sleep(0.0005)
        return code

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _fileno(target: StdioTarget) -> int | None:
    if target is None or isinstance(target, int):
        return target
    return int(target.fileno())


def _reap(pid: int, timeout: float = 5.0) -> None:
    """Collect ``pid`` if it is our (zombie or dying) child; nothing if it is not ours."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.002)


class RuncExecutor:
    """The same bundles under ``runc`` (or crun: same command line)."""

    def __init__(self, state_dir: Path, *, runc: str = "/usr/sbin/runc", timeout: float = DEFAULT_TIMEOUT,
                 require_subreaper: bool = True) -> None:
        self.root = Path(state_dir)
        self.runc = runc
        self.timeout = timeout
        self.require_subreaper = require_subreaper

    def _run(self, *args: str, stdio: Stdio | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``runc --root STATE ARGS``.  With ``stdio`` (create), runc's own stdio is the
        container's, so its errors are read from a ``--log`` file instead of a pipe."""
        log = self.root / f"{args[-1]}.{args[0]}.log"
        cmd = [self.runc, "--root", str(self.root), "--log", str(log), "--log-format", "json", *args]
        io = stdio or Stdio()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(
                cmd, check=False, timeout=self.timeout,
                stdin=io.stdin if io.stdin is not None else subprocess.DEVNULL,
                stdout=io.stdout if io.stdout is not None else subprocess.DEVNULL,
                # with stdio (create) the container keeps runc's stderr: never a pipe we would wait on
                stderr=subprocess.PIPE if stdio is None else
                (io.stderr if io.stderr is not None else subprocess.DEVNULL))
            text = (proc.stderr or b"").decode(errors="replace").strip()
            errors = [m for m in _json_lines(log) if m.get("level") in ("error", "fatal")]
        except subprocess.TimeoutExpired as exc:
            raise Internal(f"{' '.join(cmd)}: no answer within {self.timeout}s") from exc
        finally:
            log.unlink(missing_ok=True)
        if check and proc.returncode != 0:
            message = str(errors[-1].get("msg")) if errors else text
            err = _runc_errno(message)
            raise ContainerStartError(args[-1], "exec" if err else f"runc {args[0]}",
                                      f"runc exited {proc.returncode}: {message}", err)
        return proc

    def create(self, bundle: Path, container_id: str, stdio: Stdio) -> ContainerProcess:
        if self.require_subreaper and not is_child_subreaper():
            raise Internal("RuncExecutor needs its caller to be a child subreaper to wait for the container")
        bundle = Path(bundle).resolve()
        pid_file = self.root / f"{container_id}.pid"
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._run("create", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id,
                      stdio=stdio)
            pid = int(pid_file.read_text().strip())
        except BaseException:
            self._run("delete", "--force", container_id, check=False)
            raise
        finally:
            pid_file.unlink(missing_ok=True)
        return ContainerProcess(container_id, pid)

    def start(self, container_id: str) -> None:
        self._run("start", container_id)

    def run(self, bundle: Path, container_id: str, stdio: Stdio) -> ContainerProcess:
        process = self.create(bundle, container_id, stdio)
        try:
            self.start(container_id)
        except BaseException:
            self.delete(container_id)
            raise
        return process

    def kill(self, container_id: str, sig: int = signal.SIGTERM) -> None:
        self._run("kill", container_id, str(int(sig)))

    def exec(self, container_id: str, process: dict[str, Any], stdio: Stdio) -> int:
        """``runc exec --detach``: start ``process`` in the container; its host pid (the
        caller, a subreaper, becomes its parent once runc exits)."""
        tag = f"{container_id}.{os.getpid()}.{time.monotonic_ns()}"
        process_file = self.root / f"{tag}.process.json"
        pid_file = self.root / f"{tag}.pid"
        process_file.write_text(json.dumps(process))
        try:
            self._run("exec", "--detach", "--process", str(process_file), "--pid-file", str(pid_file),
                      container_id, stdio=stdio)
            return int(pid_file.read_text().strip())
        finally:
            process_file.unlink(missing_ok=True)
            pid_file.unlink(missing_ok=True)

    def delete(self, container_id: str) -> None:
        state = self._run("state", container_id, check=False, stdio=Stdio(stdout=subprocess.PIPE))
        pid = 0
        if state.returncode == 0 and state.stdout:
            pid = int(json.loads(state.stdout).get("pid") or 0)
        self._run("delete", "--force", container_id, check=False)
        if pid:
            _reap(pid)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            out.append(dict(json.loads(line)))
        except ValueError:
            continue
    return out


def _runc_errno(message: str) -> int:
    """runc reports exec failures as text: map the two Docker cares about to errnos."""
    lowered = message.lower()
    if "executable file not found" in lowered or "no such file or directory" in lowered:
        return errno.ENOENT
    if "permission denied" in lowered:
        return errno.EACCES
    return 0


if sys.platform != "linux":  # pragma: no cover
    raise ImportError("agent.runtime.executor needs Linux")
