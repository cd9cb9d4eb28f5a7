"""System service: Version and Info."""

from __future__ import annotations

import platform
from datetime import datetime, timezone

import grpc
from grpc import aio

from agent import __version__, host
from agent.daemon import Daemon
from agent.images.manifest import host_platform
from skiff.v1 import system_pb2, system_pb2_grpc

API_VERSION = "v1"


class SystemService(system_pb2_grpc.SystemServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def Version(self, request: system_pb2.VersionRequest,
                      context: aio.ServicerContext) -> system_pb2.VersionResponse:
        return system_pb2.VersionResponse(
            version=__version__, api_version=API_VERSION, python_version=platform.python_version(),
            grpc_version=grpc.__version__, os="linux", arch=host_platform().architecture,
            kernel_version=host.kernel_version(),
        )

    async def Info(self, request: system_pb2.InfoRequest,
                   context: aio.ServicerContext) -> system_pb2.InfoResponse:
        cfg = self.daemon.config
        mode = host.cgroup_mode()
        return system_pb2.InfoResponse(
            id=self.daemon.agent_id, name=host.hostname(), server_version=__version__,
            kernel_version=host.kernel_version(), operating_system=host.os_name(), os_type="linux",
            architecture=platform.machine(), ncpu=len(__import__("os").sched_getaffinity(0)),
            mem_total=host.mem_total(), cgroup_driver="cgroupfs",
            cgroup_version="2" if mode == "v2" else "1", cgroup_mode=mode, storage_driver="overlay",
            data_root=str(cfg.data_root), exec_root=str(cfg.exec_root),
            images=self.daemon.images.count(), containers=0, containers_running=0,
            containers_paused=0, containers_stopped=0,
            insecure_registries=["127.0.0.0/8", *cfg.insecure_registries],
            default_runtime="skiff", runtimes=["skiff"], live_restore_enabled=True,
            max_concurrent_downloads=cfg.max_concurrent_downloads,
            system_time=datetime.now(timezone.utc).isoformat(),
        )
