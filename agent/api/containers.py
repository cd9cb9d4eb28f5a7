"""The Containers service: convert requests, call the manager, stream logs and attach."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from grpc import aio

from agent.containers import inspect as views
from agent.containers.manager import ContainerManager
from agent.containers.shims import ShimGone, ShimStream
from agent.containers.store import RUNNING, ContainerRecord
from agent.daemon import Daemon
from agent.errors import Conflict, ContainerStartFailed, Internal, InvalidArgument, SkiffError
from agent.runtime.imageconfig import parse_signal
from agent.shim import protocol as p
from skiff.v1 import containers_pb2 as pb
from skiff.v1 import containers_pb2_grpc

LOG_BATCH = 1000
LOG_BATCH_BYTES = 256 << 10
_OUT_KIND = {p.STDOUT: pb.StreamOutput.STDOUT, p.STDERR: pb.StreamOutput.STDERR}


def config_dict(c: pb.ContainerConfig) -> dict[str, Any]:
    """The request's ContainerConfig as the plain dict the manager takes."""
    resources: dict[str, Any] = {}
    for name in ("memory", "memory_reservation", "memory_swap", "cpus"):
        value = getattr(c, name)
        if value:
            resources[name] = value
    if c.cpuset_cpus:
        resources["cpuset_cpus"] = c.cpuset_cpus
    if c.pids_limit_set:
        resources["pids_limit"] = c.pids_limit
    for name in ("memory", "memory_reservation"):
        if resources.get(name, 0) < 0:
            raise InvalidArgument(f"invalid --{name.replace('_', '-')}: must not be negative")
    if c.cpus < 0:
        raise InvalidArgument("invalid --cpus: must not be negative")
    return {
        "image": c.image, "name": c.name, "cmd": list(c.cmd), "entrypoint": list(c.entrypoint),
        "entrypoint_set": c.entrypoint_set, "env": list(c.env), "env_files": list(c.env_files),
        "working_dir": c.working_dir, "user": c.user, "hostname": c.hostname, "tty": c.tty,
        "open_stdin": c.open_stdin, "stdin_once": c.stdin_once, "auto_remove": c.auto_remove, "init": c.init,
        "stop_signal": c.stop_signal, "stop_timeout": c.stop_timeout if c.stop_timeout_set else None,
        "log_opts": dict(c.log_opts), "network_mode": c.network_mode, "cap_add": list(c.cap_add),
        "cap_drop": list(c.cap_drop), "security_opt": list(c.security_opt), "read_only": c.read_only,
        "ulimits": [{"name": u.name, "soft": u.soft, "hard": u.hard} for u in c.ulimits],
        "resources": resources, "runtime": c.runtime, "labels": dict(c.labels), "privileged": c.privileged,
        "shm_size": c.shm_size, "pid_mode": c.pid_mode, "ipc_mode": c.ipc_mode, "uts_mode": c.uts_mode,
    }


def _signal(text: str, default: int) -> int:
    return parse_signal(text) if text else default


class ContainersService(containers_pb2_grpc.ContainersServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.manager: ContainerManager = daemon.containers

    async def Create(self, request: pb.CreateContainerRequest,
                     context: aio.ServicerContext) -> pb.CreateContainerResponse:
        record, warnings = await asyncio.to_thread(self.manager.create, config_dict(request.config))
        return pb.CreateContainerResponse(id=record.id, warnings=warnings)

    async def Start(self, request: pb.StartContainerRequest,
                    context: aio.ServicerContext) -> pb.StartContainerResponse:
        await self.manager.start(request.container)
        return pb.StartContainerResponse()

    async def Stop(self, request: pb.StopContainerRequest, context: aio.ServicerContext) -> pb.StopContainerResponse:
        sig = parse_signal(request.signal) if request.signal else None
        await self.manager.stop(request.container, request.timeout if request.timeout_set else None, sig)
        return pb.StopContainerResponse()

    async def Restart(self, request: pb.RestartContainerRequest,
                      context: aio.ServicerContext) -> pb.RestartContainerResponse:
        await self.manager.stop(request.container, request.timeout if request.timeout_set else None)
        await self.manager.start(request.container)
        return pb.RestartContainerResponse()

    async def Kill(self, request: pb.KillContainerRequest, context: aio.ServicerContext) -> pb.KillContainerResponse:
        await self.manager.kill(request.container, _signal(request.signal, int(signal.SIGKILL)))
        return pb.KillContainerResponse()

    async def Remove(self, request: pb.RemoveContainerRequest,
                     context: aio.ServicerContext) -> pb.RemoveContainerResponse:
        await self.manager.remove(request.container, force=request.force)
        return pb.RemoveContainerResponse()

    async def Wait(self, request: pb.WaitContainerRequest, context: aio.ServicerContext) -> pb.WaitContainerResponse:
        record = await self.manager.wait(request.container)
        return pb.WaitContainerResponse(status_code=int(record.state.get("exit_code") or 0),
                                        error=str(record.state.get("error") or ""))

    def _image_names(self, record: ContainerRecord) -> set[str]:
        names = {record.image, record.image_id, record.image_id.removeprefix("sha256:")[:12]}
        return names

    async def List(self, request: pb.ListContainersRequest,
                   context: aio.ServicerContext) -> pb.ListContainersResponse:
        filters = views.parse_filters(list(request.filters))
        out = []
        records = self.manager.store.all()
        for record in records:
            if not request.all and record.status != RUNNING and "status" not in filters and "exited" not in filters:
                continue
            if not views.matches(record, filters, self._image_names(record)):
                continue
            summary = pb.ContainerSummary(
                id=record.id, names=["/" + record.name], image=record.image, image_id=record.image_id,
                command=views.command_text(record), created=record.created // 1_000_000_000,
                created_ns=record.created, state=record.status, exit_code=int(record.state.get("exit_code") or 0),
                started_ns=int(record.state.get("started_at") or 0),
                finished_ns=int(record.state.get("finished_at") or 0),
                labels=dict(record.config.get("labels") or {}),
                networks=str(record.config.get("network_mode") or "none"))
            if request.size:
                summary.size_rw, summary.size_root_fs = await asyncio.to_thread(self._sizes, record)
            out.append(summary)
            if request.last and len(out) >= request.last:
                break
        return pb.ListContainersResponse(containers=out)

    def _sizes(self, record: ContainerRecord) -> tuple[int, int]:
        layers = self.manager.snapshots.layers(str(record.config["snapshot"]))
        rw = _du(layers[0])
        image = self.daemon.images.get(record.image_id) if hasattr(self.daemon.images, "get") else None
        base = int(getattr(image, "size", 0) or 0)
        return rw, rw + base

    async def Inspect(self, request: pb.InspectContainerRequest,
                      context: aio.ServicerContext) -> pb.InspectContainerResponse:
        record = self.manager.resolve(request.container)
        doc = views.inspect_document(record, log_path=str(self.manager.log_path(record.id)),
                                     bundle=str(self.manager.bundle_dir(record.id)))
        if request.size:
            doc["SizeRw"], doc["SizeRootFs"] = await asyncio.to_thread(self._sizes, record)
        return pb.InspectContainerResponse(json=json.dumps(doc).encode())

    async def Rename(self, request: pb.RenameContainerRequest,
                     context: aio.ServicerContext) -> pb.RenameContainerResponse:
        self.manager.rename(request.container, request.name)
        return pb.RenameContainerResponse()

    async def Top(self, request: pb.TopContainerRequest, context: aio.ServicerContext) -> pb.TopContainerResponse:
        record = self.manager.resolve(request.container)
        if not record.running:
            raise Conflict(f"container {record.id} is not running")
        titles, rows = await asyncio.to_thread(_top, self.manager.cgroup_path(record.id),
                                               list(request.ps_args) or ["-ef"])
        return pb.TopContainerResponse(titles=titles,
                                       processes=[pb.TopContainerResponse.Row(fields=r) for r in rows])

    async def Prune(self, request: pb.PruneContainersRequest,
                    context: aio.ServicerContext) -> pb.PruneContainersResponse:
        deleted = []
        reclaimed = 0
        filters = views.parse_filters([f for f in request.filters if not f.startswith("until=")])
        for record in self.manager.store.all():
            if record.status in (RUNNING, "paused", "restarting"):
                continue
            if not views.matches(record, filters, self._image_names(record)):
                continue
            with contextlib.suppress(SkiffError):
                rw, _ = await asyncio.to_thread(self._sizes, record)
                reclaimed += rw
            await self.manager.remove(record.id)
            deleted.append(record.id)
        return pb.PruneContainersResponse(deleted=deleted, space_reclaimed=reclaimed)

    async def Logs(self, request: pb.LogsRequest, context: aio.ServicerContext) -> AsyncIterator[pb.LogBatch]:
        from agent.containers import jsonlog

        record = self.manager.resolve(request.container)
        path = str(self.manager.log_path(record.id))
        streams = {s for s, on in (("stdout", request.stdout), ("stderr", request.stderr)) if on} or \
            {"stdout", "stderr"}
        tail = None if request.tail < 0 else int(request.tail)
        since = request.since_ns or None
        until = request.until_ns or None
        container_id = record.id

        def is_running() -> bool:
            current = self.manager.store.get(container_id)
            return current is not None and current.running

        if not (request.follow and is_running() and not until):
            entries = await asyncio.to_thread(
                lambda: [e for e in jsonlog.read_entries(path, since_ns=since, until_ns=until, tail=tail)
                         if e.stream in streams])
            for start in range(0, len(entries), LOG_BATCH):
                yield pb.LogBatch(entries=[_log_entry(e) for e in entries[start:start + LOG_BATCH]])
            return
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4 * LOG_BATCH)

        async def produce() -> None:
            try:
                async for entry in jsonlog.follow(path, since_ns=since, tail=tail, is_running=is_running):
                    if entry.stream in streams:
                        await queue.put(entry)
            finally:
                await queue.put(None)

        producer = asyncio.create_task(produce())
        try:
            done = False
            while not done:
                batch = [await queue.get()]
                size = 0
                while batch[-1] is not None and len(batch) < LOG_BATCH and size < LOG_BATCH_BYTES \
                        and not queue.empty():
                    batch.append(queue.get_nowait())
                    size += len(batch[-1].data) if batch[-1] is not None else 0
                done = batch[-1] is None
                ready = [_log_entry(e) for e in batch if e is not None]
                if ready:
                    yield pb.LogBatch(entries=ready)
            await producer
        finally:
            producer.cancel()
            with contextlib.suppress(BaseException):
                await producer

    async def Attach(self, request_iterator: AsyncIterator[pb.AttachInput],
                     context: aio.ServicerContext) -> AsyncIterator[pb.StreamOutput]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument("attach: the first message must name the container")
        request = {"op": "attach", "stdin": first.stdin, "stdout": first.stdout or not first.stdin,
                   "stderr": first.stderr or not first.stdin}
        if not (first.stdout or first.stderr or first.stdin):
            request.update(stdout=True, stderr=True)

        size = (first.resize.rows, first.resize.cols) if first.HasField("resize") and first.resize.rows else None
        if first.start:
            record, stream = await self.manager.start(first.container, attach=request, size=size)
            assert stream is not None
        else:
            record = self.manager.resolve(first.container)
            if not record.running:
                raise Conflict("You cannot attach to a stopped container, start it first")
            stream = await ShimStream.open(self.manager.state_dir(record.id), request)
            if size:
                await stream.send(p.RESIZE, json.dumps({"rows": size[0], "cols": size[1]}).encode())
        yield pb.StreamOutput(kind=pb.StreamOutput.STARTED, id=record.id)

        async def lost() -> pb.StreamOutput:  # the shim went away without an exit frame
            final = await self.manager.wait(record.id)
            return pb.StreamOutput(kind=pb.StreamOutput.EXIT, exit_code=int(final.state.get("exit_code") or 0),
                                   oom_killed=bool(final.state.get("oom_killed")))

        async for out in _serve_stream(request_iterator, stream, lost):
            yield out


    async def Exec(self, request_iterator: AsyncIterator[pb.ExecInput],
                   context: aio.ServicerContext) -> AsyncIterator[pb.StreamOutput]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument("exec: the first message must describe the process")
        record = self.manager.resolve(first.container)
        if not record.running:
            raise Conflict(f"container {record.id} is not running")
        process = self.manager.exec_process(record, list(first.cmd), list(first.env), first.working_dir,
                                            first.user, first.tty, first.privileged)
        exec_id = secrets.token_hex(32)
        size = [first.resize.rows, first.resize.cols] if first.HasField("resize") and first.resize.rows else None
        try:
            stream = await ShimStream.open(self.manager.state_dir(record.id), {
                "op": "exec", "id": exec_id, "process": process, "tty": first.tty,
                "stdin": first.stdin and not first.detach, "size": size})
        except ShimGone:
            raise Conflict(f"container {record.id} is not running") from None
        except Internal as exc:
            code = getattr(exc, "exit_code", None)
            raise ContainerStartFailed(f"OCI runtime exec failed: {exc}", code or 126) from None
        yield pb.StreamOutput(kind=pb.StreamOutput.STARTED, id=exec_id)
        if first.detach:
            stream.close()
            return

        async def lost() -> pb.StreamOutput:  # the container went away under the exec
            return pb.StreamOutput(kind=pb.StreamOutput.EXIT, exit_code=137)

        async for out in _serve_stream(request_iterator, stream, lost):
            yield out


async def _serve_stream(requests: AsyncIterator[Any], stream: ShimStream,
                        lost: Callable[[], Awaitable[pb.StreamOutput]]) -> AsyncIterator[pb.StreamOutput]:
    """Input from the client to the shim while output goes back, up to the exit frame (or
    ``lost()``'s word when the shim closes without one)."""
    pump = asyncio.create_task(_pump_input(requests, stream))
    try:
        async for out in _relay(stream):
            yield out
            if out.kind == pb.StreamOutput.EXIT:
                return
        yield await lost()
    finally:
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump
        stream.close()


async def _pump_input(requests: AsyncIterator[Any], stream: ShimStream) -> None:
    """Client → shim: stdin bytes, stdin close, terminal resizes."""
    try:
        async for msg in requests:
            if msg.data:
                await stream.send(p.STDIN, msg.data)
            if msg.HasField("resize") and msg.resize.rows:
                await stream.send(p.RESIZE, json.dumps({"rows": msg.resize.rows, "cols": msg.resize.cols}).encode())
            if msg.close_stdin:
                await stream.send(p.CLOSE_STDIN)
    except (ConnectionError, ShimGone):
        pass


async def _relay(stream: ShimStream) -> AsyncIterator[pb.StreamOutput]:
    while (frame := await stream.next_frame()) is not None:
        kind, payload = frame
        if kind in _OUT_KIND:
            yield pb.StreamOutput(kind=_OUT_KIND[kind], data=payload)
        elif kind == p.EXIT:
            result = json.loads(payload)
            yield pb.StreamOutput(kind=pb.StreamOutput.EXIT, exit_code=int(result.get("exit_code", 255)),
                                  oom_killed=bool(result.get("oom_killed")))
            return


def _log_entry(entry: Any) -> pb.LogEntry:
    return pb.LogEntry(stream=pb.LogEntry.STDERR if entry.stream == "stderr" else pb.LogEntry.STDOUT,
                       data=entry.data, time_ns=entry.time_ns)


def _top(cgroup_path: str, ps_args: list[str]) -> tuple[list[str], list[list[str]]]:
    """docker top: the host's ``ps`` output, only the rows of the container's processes."""
    import subprocess

    from agent.runtime.cgroups import detect

    pids = {str(pid) for pid in detect().pids(cgroup_path)}
    for arg in ps_args:
        if arg.startswith("-") and any(c in arg for c in "pqC") and not arg.startswith("--"):
            raise InvalidArgument(f"ps options {' '.join(ps_args)!r} select processes; top selects them")
    try:
        proc = subprocess.run(["ps", *ps_args], capture_output=True, text=True, timeout=30, check=False,
                              env={"PATH": "/usr/bin:/bin", "COLUMNS": "4096", "LC_ALL": "C"})
    except FileNotFoundError:
        raise InvalidArgument("ps is not installed on this host (procps)") from None
    if proc.returncode != 0:
        raise InvalidArgument(f"ps {' '.join(ps_args)}: {proc.stderr.strip() or 'failed'}")
    lines = proc.stdout.splitlines()
    if not lines:
        return [], []
    titles = lines[0].split()
    if "PID" not in titles:
        raise InvalidArgument(f"ps {' '.join(ps_args)}: no PID column in its output")
    col = titles.index("PID")
    rows = []
    for line in lines[1:]:
        fields = line.split(None, len(titles) - 1)
        if len(fields) > col and fields[col] in pids:
            rows.append(fields)
    return titles, rows


def _du(path: Any) -> int:
    import os

    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
