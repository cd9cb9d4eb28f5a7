"""The gRPC server: listeners, services, health, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import grp
import os
import signal
import socket
from pathlib import Path

import structlog
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from agent import __version__
from agent.api.containers import ContainersService
from agent.api.images import ImagesService, RegistriesService
from agent.api.interceptor import RpcInterceptor
from agent.api.system import SystemService
from agent.config import DaemonConfig, tcp_address
from agent.daemon import Daemon
from agent.errors import Conflict, InvalidArgument
from skiff.v1 import containers_pb2_grpc, images_pb2_grpc, system_pb2_grpc

log = structlog.get_logger("skiffd")

MAX_MESSAGE = 64 << 20
SERVICES = ("skiff.v1.System", "skiff.v1.Images", "skiff.v1.Registries", "skiff.v1.Containers")


def _prepare_socket(path: Path) -> None:
    """Refuse a socket another agent is serving; remove a stale one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise InvalidArgument(f"listen path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise Conflict(f"another agent is listening on {path}")


def _secure_socket(path: Path, group: str) -> None:
    gid = 0
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("socket group not found, socket left to root only", group=group, socket=str(path))
    os.chown(path, 0 if os.geteuid() == 0 else -1, gid if os.geteuid() == 0 else -1)
    os.chmod(path, 0o660)


def _listen_tcp(server: aio.Server, config: DaemonConfig, host: str) -> None:
    """A tcp:// listener: mutual TLS with the fleet CA, or (loudly) none."""
    import grpc

    address = tcp_address(host)
    if config.tlsverify:
        assert config.tlscacert and config.tlscert and config.tlskey
        credentials = grpc.ssl_server_credentials(
            [(config.tlskey.read_bytes(), config.tlscert.read_bytes())],
            root_certificates=config.tlscacert.read_bytes(), require_client_auth=True)
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
    else:
        log.warning("listening on TCP WITHOUT TLS: anyone who reaches this port is root here", host=host)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
    if port == 0:
        raise Conflict(f"cannot listen on {host} (address in use or not available)")


async def serve(config: DaemonConfig, ready: asyncio.Event | None = None) -> None:
    daemon = Daemon(config)
    recovered = daemon.recover()
    daemon.warm_up()
    daemon.shims.fill()
    recovered.update(await daemon.containers.restore())
    server = aio.server(
        interceptors=[RpcInterceptor()],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.max_send_message_length", MAX_MESSAGE)],
    )
    system_pb2_grpc.add_SystemServicer_to_server(SystemService(daemon), server)
    images_pb2_grpc.add_ImagesServicer_to_server(ImagesService(daemon), server)
    images_pb2_grpc.add_RegistriesServicer_to_server(RegistriesService(daemon), server)
    containers_pb2_grpc.add_ContainersServicer_to_server(ContainersService(daemon), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    sockets: list[Path] = []
    try:
        for host in config.hosts:
            if host.startswith("tcp://"):
                _listen_tcp(server, config, host)
                continue
            path = Path(host.removeprefix("unix://"))
            _prepare_socket(path)
            server.add_insecure_port(f"unix:{path}")
            sockets.append(path)
        await server.start()
        for path in sockets:
            _secure_socket(path, config.group)
        for name in ("", *SERVICES):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("skiffd started", version=__version__, pid=os.getpid(), hosts=config.hosts,
                 data_root=str(config.data_root), exec_root=str(config.exec_root), **recovered)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down", grace_s=config.shutdown_timeout)
        await health.enter_graceful_shutdown()
        await server.stop(config.shutdown_timeout)
    finally:
        await server.stop(0)
        await daemon.puller.aclose()
        await daemon.containers.close()
        for path in sockets:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        daemon.close()
        log.info("skiffd stopped")
