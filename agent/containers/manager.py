"""Container lifecycle: create, start, stop, kill, remove, wait, and live-restore.

One :class:`ContainerManager` per agent.  Every running container has a shim
(:mod:`agent.shim`) and, inside skiffd, a *monitor* task holding a ``wait``
connection to it; when the shim reports the exit (or its ``exit.json`` is
found after a restart), the record moves to ``exited`` and ``--rm``
containers are removed.  skiffd itself never forks or enters a namespace.

Paths: ``data-root/containers/<id>/`` is the bundle (config.json, the /etc
files, the rootfs mount point, the json-file log); ``exec-root/containers/
<id>/`` is the shim's runtime directory (socket, pid, exit record).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from agent.containers import bundle as bundlemod
from agent.containers.jsonlog import parse_log_opts
from agent.containers.shims import ShimGone, ShimLaunchError, ShimPool, ShimStream, call
from agent.containers.store import (CREATED, EXITED, RUNNING, ContainerRecord, ContainerStore, check_name,
                                    new_state, now_ns)
from agent.errors import Conflict, ContainerStartFailed, ImageNotFound, InvalidArgument, NotFound, SkiffError
from agent.images import manifest as mf
from agent.images.content import ContentStore
from agent.images.snapshots import OverlaySnapshotter
from agent.images.store import ImageStore
from agent.runtime import imageconfig
from agent.runtime.init import resources_from_spec
from agent.runtime.spec import build_spec
from agent.shim import protocol as p

log = structlog.get_logger("skiffd.containers")

DEFAULT_STOP_TIMEOUT = 10
RUNTIMES = {"runc": "/usr/sbin/runc", "crun": "/usr/bin/crun"}


def snapshot_key(container_id: str) -> str:
    return f"container-{container_id}"


class ContainerManager:
    def __init__(self, data_root: Path, exec_root: Path, store: ContainerStore, images: ImageStore,
                 content: ContentStore, snapshots: OverlaySnapshotter, pool: ShimPool,
                 cgroup_parent: str = "/skiff") -> None:
        self.data_root = data_root / "containers"
        self.exec_root = exec_root / "containers"
        self.runtime_root = exec_root / "runtime"
        self.store = store
        self.images = images
        self.content = content
        self.snapshots = snapshots
        self.pool = pool
        self.cgroup_parent = cgroup_parent.rstrip("/")
        self._locks: dict[str, asyncio.Lock] = {}
        self._exited: dict[str, asyncio.Event] = {}
        self._monitors: dict[str, asyncio.Task[None]] = {}
        #: called with the record after a container exits (restart policies, events)
        self.on_exit: list[Callable[[ContainerRecord], Awaitable[None]]] = []

    def bundle_dir(self, container_id: str) -> Path:
        return self.data_root / container_id

    def state_dir(self, container_id: str) -> Path:
        return self.exec_root / container_id

    def log_path(self, container_id: str) -> Path:
        return self.bundle_dir(container_id) / f"{container_id}-json.log"

    def cgroup_path(self, container_id: str) -> str:
        return f"{self.cgroup_parent}/{container_id}"

    def lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    def resolve(self, ref: str) -> ContainerRecord:
        return self.store.resolve(ref)

    # --- create ------------------------------------------------------------------

    def create(self, req: dict[str, Any]) -> tuple[ContainerRecord, list[str]]:
        """A new container from ``req`` (the fields of ``ContainerConfig``); nothing runs yet."""
        warnings: list[str] = []
        name = check_name(req["name"]) if req.get("name") else self.store.generate_name()
        if req.get("name") and self.store.db.query_one("SELECT 1 FROM containers WHERE name = ?", (name,)):
            self.store.add(ContainerRecord("", name, "", "", 0, {}))  # raises the name conflict
        try:
            image = self.images.resolve(req["image"])
        except NotFound:
            raise ImageNotFound(f"No such image: {req['image']}") from None
        image_config = (mf.parse_config(self.content.read_bytes(image.config_digest, 16 << 20)).raw
                        .get("config") or {})
        container_id = secrets.token_hex(32)
        network = req.get("network_mode") or "none"
        if network not in ("none", "host"):
            raise InvalidArgument(f"network mode {network!r} is not supported yet: use none or host "
                                  "(the bridge network arrives later)")
        runtime = req.get("runtime") or "builtin"
        if runtime != "builtin":
            if runtime not in RUNTIMES:
                raise InvalidArgument(f"unknown or invalid runtime name: {runtime}")
            if not os.access(RUNTIMES[runtime], os.X_OK):
                raise InvalidArgument(f"runtime {runtime} is not installed ({RUNTIMES[runtime]})")
        entrypoint = None
        if req.get("entrypoint_set"):
            entrypoint = " ".join(req.get("entrypoint") or []) if req.get("entrypoint") else ""
        args = imageconfig.resolve_command(image_config.get("Entrypoint"), image_config.get("Cmd"),
                                           entrypoint, req.get("cmd") or [])
        if req.get("uts_mode") == "host" and req.get("hostname"):
            raise InvalidArgument("conflicting options: hostname and the UTS mode")
        hostname = bundlemod.default_hostname(container_id, network, req.get("hostname") or "",
                                              req.get("uts_mode") or "")
        tty = bool(req.get("tty"))
        env = imageconfig.merge_env(image_config.get("Env") or [], req.get("env") or [],
                                    req.get("env_files") or [], {}, hostname=hostname, terminal=tty)
        security = _security_options(req.get("security_opt") or [])
        config: dict[str, Any] = {
            "image": req["image"], "args": args, "entrypoint": req.get("entrypoint") or None,
            "entrypoint_set": bool(req.get("entrypoint_set")), "cmd": list(req.get("cmd") or []),
            "image_entrypoint": image_config.get("Entrypoint"), "image_cmd": image_config.get("Cmd"),
            "env": env, "working_dir": imageconfig.working_dir(image_config.get("WorkingDir"),
                                                                req.get("working_dir") or None),
            "user": req.get("user") or image_config.get("User") or "", "hostname": hostname, "tty": tty,
            "open_stdin": bool(req.get("open_stdin")), "stdin_once": bool(req.get("stdin_once")),
            "auto_remove": bool(req.get("auto_remove")), "init": bool(req.get("init")),
            "stop_signal": imageconfig.stop_signal(image_config.get("StopSignal"), req.get("stop_signal") or None),
            "stop_timeout": req.get("stop_timeout"), "log_opts": parse_log_opts(req.get("log_opts") or {}).to_dict(),
            "log_opts_raw": dict(req.get("log_opts") or {}),
            "network_mode": network, "pid_mode": req.get("pid_mode") or "", "ipc_mode": req.get("ipc_mode") or "",
            "uts_mode": req.get("uts_mode") or "", "cap_add": list(req.get("cap_add") or []),
            "cap_drop": list(req.get("cap_drop") or []), "security_opt": list(req.get("security_opt") or []),
            **security, "read_only": bool(req.get("read_only")),
            "ulimits": {u["name"]: [u["soft"], u["hard"]] for u in req.get("ulimits") or []},
            "resources": req.get("resources") or {}, "runtime": runtime,
            "labels": dict(image_config.get("Labels") or {}) | dict(req.get("labels") or {}),
            "privileged": bool(req.get("privileged")), "shm_size": int(req.get("shm_size") or 0),
            "image_config": {k: image_config.get(k) for k in ("ExposedPorts", "Volumes", "OnBuild")},
            "snapshot": snapshot_key(container_id),
        }
        record = ContainerRecord(container_id, name, req["image"], image.id, now_ns(), config, new_state())
        bundle = self.bundle_dir(container_id)
        layers = [Path(d) for d in self.snapshots.lowerdirs(image.top_chain_id)] if image.top_chain_id else []
        self._spec(record, bundle, layers, validate_only=True)  # every flag checked before anything is made
        bundle.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            self.snapshots.prepare(snapshot_key(container_id), image.top_chain_id)
            (bundle / "rootfs").mkdir(exist_ok=True)
            self.store.add(record)
        except BaseException:
            self._remove_files(container_id)
            raise
        return record, warnings

    def _spec(self, record: ContainerRecord, bundle: Path, layers: list[Path],
              validate_only: bool = False) -> dict[str, Any]:
        from agent.runtime.cgroups import detect

        scratch = bundle if not validate_only else self.data_root / ".validate" / record.id
        try:
            opts = bundlemod.spec_options(record.id, record.config, scratch, layers,
                                          cgroup_path=self.cgroup_path(record.id))
            spec = build_spec(opts)
            detect().validate(resources_from_spec(spec["linux"].get("resources")))
        finally:
            if validate_only:
                shutil.rmtree(scratch, ignore_errors=True)
        seccomp = record.config.get("seccomp", "default")
        if seccomp != "unconfined" and not record.config.get("privileged"):
            profile = _seccomp_profile(seccomp, spec)
            if profile is not None:
                spec["linux"]["seccomp"] = profile
        return spec

    # --- start -------------------------------------------------------------------

    async def start(self, ref: str, *, attach: dict[str, Any] | None = None,
                    size: tuple[int, int] | None = None) -> tuple[ContainerRecord, ShimStream | None]:
        """Start a created or exited container.  With ``attach`` (the attach request: docker run,
        start -a), the launch connection itself becomes the attach stream: no output is lost."""
        record = self.resolve(ref)
        async with self.lock(record.id):
            record = self.resolve(record.id)
            if record.running:
                stream = await ShimStream.open(self.state_dir(record.id), attach) if attach else None
                return record, stream
            sock = await self._launch(record, size=size, attach=attach)
            if sock is None:
                return record, None
            return record, await ShimStream.adopt(sock, dict(record.state))

    async def _launch(self, record: ContainerRecord, *, size: tuple[int, int] | None,
                      attach: dict[str, Any] | None = None) -> socket.socket | None:
        bundle = self.bundle_dir(record.id)
        state_dir = self.state_dir(record.id)
        shutil.rmtree(state_dir, ignore_errors=True)
        key = str(record.config["snapshot"])
        spec = self._spec(record, bundle, self.snapshots.layers(key))
        bundlemod.write_spec(bundle, spec)
        config = record.config
        assignment = {
            "id": record.id, "bundle": str(bundle), "state_dir": str(state_dir),
            "runtime": config.get("runtime") or "builtin",
            "runtime_path": RUNTIMES.get(str(config.get("runtime")), ""),
            "runtime_root": str(self.runtime_root / str(config.get("runtime") or "builtin")),
            "rootfs_mounts": [{"type": m.type, "source": m.source, "options": m.options}
                              for m in self.snapshots.mounts(key)],
            "log_path": str(self.log_path(record.id)), "log_opts": config.get("log_opts") or {},
            "tty": bool(config.get("tty")), "open_stdin": bool(config.get("open_stdin")),
            "stdin_once": bool(config.get("stdin_once")),
            "cgroup_path": self.cgroup_path(record.id), "size": list(size) if size else None,
            "attach": attach,
        }
        self._exited[record.id] = asyncio.Event()
        try:
            report, sock = await self.pool.launch(assignment)
        except BaseException as exc:
            await self._start_failed(record, exc)
            raise
        self._mark_running(record, report)
        return sock

    def _mark_running(self, record: ContainerRecord, report: dict[str, Any]) -> None:
        record.state.update(status=RUNNING, pid=int(report["pid"]), exit_code=0, oom_killed=False, error="",
                            started_at=int(report.get("started_at") or now_ns()), finished_at=0)
        self.store.save_state(record)
        if record.id not in self._monitors or self._monitors[record.id].done():
            self._monitors[record.id] = asyncio.create_task(self._monitor(record.id))
        log.info("container started", id=record.id[:12], name=record.name, pid=record.state["pid"])

    async def _start_failed(self, record: ContainerRecord, exc: BaseException) -> None:
        code = exc.exit_code if isinstance(exc, (ShimLaunchError, ContainerStartFailed)) else 125
        status = EXITED if record.state.get("started_at") else CREATED
        record.state.update(status=status, pid=0, exit_code=code, error=str(exc), finished_at=now_ns())
        self.store.save_state(record)
        with contextlib.suppress(ShimGone, OSError, TimeoutError):
            await call(self.state_dir(record.id), {"op": "kill", "signal": int(signal.SIGKILL)}, timeout=5)
        monitor = self._monitors.pop(record.id, None)
        if monitor is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(monitor, 10)
        shutil.rmtree(self.state_dir(record.id), ignore_errors=True)
        self._exited.setdefault(record.id, asyncio.Event()).set()
        if isinstance(exc, ShimLaunchError):
            raise ContainerStartFailed(_start_message(record, exc), exc.exit_code) from exc

    # --- the monitor ---------------------------------------------------------------

    async def _monitor(self, container_id: str) -> None:
        """Hold a ``wait`` connection to the shim; record the exit when it comes."""
        state_dir = self.state_dir(container_id)
        result: dict[str, Any] | None = None
        try:
            stream = await ShimStream.open(state_dir, {"op": "wait"})
            try:
                while (frame := await stream.next_frame()) is not None:
                    if frame[0] == p.EXIT:
                        import json

                        result = dict(json.loads(frame[1]))
                        break
            finally:
                stream.close()
        except (ShimGone, OSError, SkiffError):
            pass
        if result is None:
            result = await self._exit_record(container_id)
        await self._exited_with(container_id, result)

    async def _exit_record(self, container_id: str) -> dict[str, Any]:
        """The shim's ``exit.json``, waiting briefly for a shim that is finishing."""
        import json

        path = self.state_dir(container_id) / p.EXIT_FILE
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return dict(json.loads(path.read_text()))
            except (FileNotFoundError, ValueError):
                pass
            if not _shim_alive(self.state_dir(container_id)):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    return dict(json.loads(path.read_text()))
                return {"exit_code": 255, "error": "the container's shim died", "finished_at": now_ns()}
            await asyncio.sleep(0.05)
        return {"exit_code": 255, "error": "the container's shim did not report its exit", "finished_at": now_ns()}

    async def _exited_with(self, container_id: str, result: dict[str, Any]) -> None:
        record = self.store.get(container_id)
        self._monitors.pop(container_id, None)
        if record is None:
            return
        if record.status == RUNNING or record.state.get("pid"):
            record.state.update(status=EXITED, pid=0, exit_code=int(result.get("exit_code", 255)),
                                oom_killed=bool(result.get("oom_killed")), error=str(result.get("error") or ""),
                                finished_at=int(result.get("finished_at") or now_ns()))
            self.store.save_state(record)
            log.info("container exited", id=container_id[:12], exit_code=record.state["exit_code"],
                     oom_killed=record.state["oom_killed"])
        self._exited.setdefault(container_id, asyncio.Event()).set()
        for hook in self.on_exit:
            await hook(record)
        if record.config.get("auto_remove"):
            with contextlib.suppress(SkiffError):
                await self.remove(container_id, force=True)

    async def restore(self) -> dict[str, int]:
        """Live-restore: re-attach a monitor to every running container's shim; those that
        exited while the agent was away get their exit record."""
        running = exited = 0
        for record in self.store.all():
            if record.status != RUNNING:
                continue
            state_dir = self.state_dir(record.id)
            if _shim_alive(state_dir):
                self._exited[record.id] = asyncio.Event()
                self._monitors[record.id] = asyncio.create_task(self._monitor(record.id))
                running += 1
            else:
                await self._exited_with(record.id, await self._exit_record(record.id))
                exited += 1
        return {"containers_running": running, "containers_exited": exited, "containers_orphans": self.sweep()}

    def sweep(self) -> int:
        """Remove what a crash in the middle of ``create`` or ``rm`` left without a record: container
        snapshots, bundle and runtime directories.  Never touches a live shim's directory."""
        known = {r.id for r in self.store.all()}
        removed = 0
        for row in self.store.db.query("SELECT chain_id FROM snapshots WHERE chain_id LIKE 'container-%'"):
            if row["chain_id"].removeprefix("container-") not in known:
                with contextlib.suppress(SkiffError, OSError):
                    self.snapshots.remove(row["chain_id"])
                    removed += 1
        shutil.rmtree(self.data_root / ".validate", ignore_errors=True)
        for root in (self.data_root, self.exec_root):
            for entry in root.iterdir() if root.is_dir() else []:
                if entry.name in known or entry.name.startswith(".") or _shim_alive(entry):
                    continue
                if os.path.ismount(entry / "rootfs"):
                    continue  # mounted: left for an operator rather than removed under a mount
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    # --- stop, kill, wait ------------------------------------------------------------

    async def kill(self, ref: str, sig: int = signal.SIGKILL) -> ContainerRecord:
        record = self.resolve(ref)
        if not record.running:
            raise Conflict(f"Cannot kill container: {ref}: Container {record.id} is not running")
        reply = await call(self.state_dir(record.id), {"op": "kill", "signal": int(sig)})
        if "error" in reply:
            raise Conflict(f"Cannot kill container: {ref}: {reply['error']}")
        return record

    async def wait_exit(self, container_id: str, timeout: float | None = None) -> bool:
        event = self._exited.get(container_id)
        if event is None:
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, ref: str, timeout: int | None = None, sig: int | None = None) -> ContainerRecord:
        record = self.resolve(ref)
        if not record.running:
            return record
        if timeout is None:
            timeout = record.config.get("stop_timeout")
            timeout = DEFAULT_STOP_TIMEOUT if timeout is None else int(timeout)
        stop_sig = sig or int(record.config.get("stop_signal") or signal.SIGTERM)
        with contextlib.suppress(Conflict, ShimGone):
            await self.kill(record.id, stop_sig)
        if timeout < 0:
            await self.wait_exit(record.id)
        elif not await self.wait_exit(record.id, float(timeout)):
            with contextlib.suppress(Conflict, ShimGone):
                await self.kill(record.id, signal.SIGKILL)
            await self.wait_exit(record.id, 30)
        return self.resolve(record.id)

    async def wait(self, ref: str) -> ContainerRecord:
        record = self.resolve(ref)
        if record.running:
            await self.wait_exit(record.id)
        return self.store.get(record.id) or record

    # --- remove ------------------------------------------------------------------------

    async def remove(self, ref: str, force: bool = False) -> None:
        record = self.resolve(ref)
        if record.running:
            if not force:
                raise Conflict(f'cannot remove container "/{record.name}": container is running: '
                               "stop the container before removing or force remove")
            with contextlib.suppress(Conflict, ShimGone):
                await self.kill(record.id, signal.SIGKILL)
            await self.wait_exit(record.id, 30)
        async with self.lock(record.id):
            if self.store.get(record.id) is None:
                return
            self.store.remove(record.id)
            self._remove_files(record.id)
        self._locks.pop(record.id, None)
        self._exited.pop(record.id, None)

    def _remove_files(self, container_id: str) -> None:
        with contextlib.suppress(NotFound):
            self.snapshots.remove(snapshot_key(container_id))
        shutil.rmtree(self.bundle_dir(container_id), ignore_errors=True)
        shutil.rmtree(self.state_dir(container_id), ignore_errors=True)

    # --- exec ----------------------------------------------------------------------------

    def exec_process(self, record: ContainerRecord, cmd: list[str], env: list[str], working_dir: str,
                     user: str, tty: bool, privileged: bool = False) -> dict[str, Any]:
        """The OCI ``process`` for ``exec``: the container's, with docker exec's overrides."""
        import json

        if not cmd:
            raise InvalidArgument("no command specified")
        if working_dir and not working_dir.startswith("/"):
            raise InvalidArgument(f"the working directory {working_dir!r} is invalid, it needs to be an "
                                  "absolute path")
        spec = json.loads((self.bundle_dir(record.id) / "config.json").read_text())
        process = dict(spec["process"])
        process["args"] = list(cmd)
        process["terminal"] = tty
        if env:
            merged = {e.partition("=")[0]: e for e in process.get("env", [])}
            for e in env:
                if "=" not in e:
                    raise InvalidArgument(f"invalid environment variable {e!r}: exec takes KEY=VALUE")
                merged[e.partition("=")[0]] = e
            process["env"] = list(merged.values())
        if working_dir:
            process["cwd"] = working_dir
        if user:
            resolved = imageconfig.resolve_user(self.snapshots.layers(str(record.config["snapshot"])), user)
            process["user"] = {"uid": resolved.uid, "gid": resolved.gid,
                               **({"additionalGids": resolved.additional_gids} if resolved.additional_gids else {})}
            caps = process.get("capabilities") or {}
            if resolved.uid != 0:
                process["capabilities"] = {**caps, "effective": [], "permitted": []}
            else:
                bounding = list(caps.get("bounding") or [])
                process["capabilities"] = {**caps, "effective": bounding, "permitted": bounding}
        if privileged:
            from agent.runtime.spec import all_capabilities

            every = all_capabilities()
            process["capabilities"] = {"bounding": every, "effective": every, "permitted": every,
                                       "inheritable": [], "ambient": []}
        return process

    def rename(self, ref: str, name: str) -> None:
        self.store.rename(self.resolve(ref), name)

    async def close(self) -> None:
        """The agent is stopping: containers keep running (live-restore); monitors end."""
        for task in list(self._monitors.values()):
            task.cancel()
        await asyncio.gather(*self._monitors.values(), return_exceptions=True)
        self._monitors.clear()


def _shim_alive(state_dir: Path) -> bool:
    try:
        pid = int((state_dir / p.PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return (state_dir / p.SOCKET).exists()


def _security_options(opts: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"no_new_privileges": False, "seccomp": "default"}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            key, sep, value = opt.partition(":")
        if key == "no-new-privileges":
            if value not in ("", "true", "false"):
                raise InvalidArgument(f"invalid --security-opt 2: {opt!r}")
            out["no_new_privileges"] = value != "false"
        elif key == "seccomp" and value:
            out["seccomp"] = value if value == "unconfined" else _parse_profile(value)
        elif key in ("label", "apparmor"):
            continue  # no LSM on these hosts: accepted and ignored, like docker without AppArmor
        else:
            raise InvalidArgument(f"invalid --security-opt: {opt!r}")
    return out


def _parse_profile(text: str) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(text)
    except ValueError:
        raise InvalidArgument("--security-opt seccomp: the CLI sends the profile's JSON; it is not valid JSON") \
            from None
    if not isinstance(doc, dict):
        raise InvalidArgument("--security-opt seccomp: a profile is a JSON object")
    return doc


def _seccomp_profile(choice: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from agent.runtime import seccomp

    caps = list(spec["process"]["capabilities"]["bounding"])
    if choice == "default":
        return seccomp.default_profile(capabilities=caps)
    return seccomp.profile_from_docker(choice, capabilities=caps)


def _start_message(record: ContainerRecord, exc: ShimLaunchError) -> str:
    argv0 = record.config["args"][0] if record.config.get("args") else "?"
    if exc.exit_code == 127:
        return f'failed to create task for container: exec: "{argv0}": executable file not found in $PATH'
    if exc.exit_code == 126:
        return f'failed to create task for container: exec: "{argv0}": permission denied'
    return f"failed to create task for container: {exc}"
