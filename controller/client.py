"""Connection to one agent, and the one place gRPC errors become controller errors."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc import aio

from controller.errors import AgentError, ConnectionFailed, UsageError
if TYPE_CHECKING:
    from skiff.v1 import containers_pb2_grpc, images_pb2_grpc, system_pb2_grpc

DEFAULT_HOST = "unix:///run/skiff/skiffd.sock"
T = TypeVar("T")
MAX_MESSAGE = 64 << 20


def default_host() -> str:
    return os.environ.get("SKIFF_HOST") or DEFAULT_HOST


@dataclass(frozen=True)
class TLSFiles:
    """The client's side of mutual TLS (docker's --tlscacert/--tlscert/--tlskey; by default
    ca.pem, cert.pem and key.pem in $SKIFF_CERT_PATH or ~/.skiff, as ~/.docker)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def default(cls, ca: str | None = None, cert: str | None = None, key: str | None = None) -> TLSFiles:
        base = Path(os.environ.get("SKIFF_CERT_PATH") or Path.home() / ".skiff")
        return cls(Path(ca) if ca else base / "ca.pem", Path(cert) if cert else base / "cert.pem",
                   Path(key) if key else base / "key.pem")

    def credentials(self) -> grpc.ChannelCredentials:
        try:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                                private_key=self.key.read_bytes(),
                                                certificate_chain=self.cert.read_bytes())
        except OSError as exc:
            raise UsageError(f"TLS: cannot read {exc.filename}: {exc.strerror} "
                             "(--tlscacert/--tlscert/--tlskey, or $SKIFF_CERT_PATH; see `skiff ca`)") from None


def grpc_target(host: str) -> str:
    """``unix:///path`` or ``tcp://host:port`` → the gRPC target."""
    if host.startswith("tcp://"):
        rest = host.removeprefix("tcp://").rstrip("/")
        name, sep, port = rest.rpartition(":")
        if not sep or not name or not port.isdigit():
            raise UsageError(f"invalid host {host!r}: use tcp://HOST:PORT")
        return rest
    if host.startswith("unix://"):
        path = host.removeprefix("unix://")
        if not path.startswith("/"):
            raise UsageError(f"invalid host {host!r}: unix socket path must be absolute")
        return f"unix:{path}"
    if host.startswith("/"):
        return f"unix:{host}"
    raise UsageError(f"unsupported host {host!r}: use unix:///path/to/skiffd.sock or tcp://HOST:PORT")


class Agent:
    """Stubs for one agent over one channel, each made (and its module imported) on first use."""

    def __init__(self, host: str, channel: aio.Channel) -> None:
        self.host = host
        self.channel = channel

    @cached_property
    def system(self) -> system_pb2_grpc.SystemStub:
        from skiff.v1 import system_pb2_grpc

        return system_pb2_grpc.SystemStub(self.channel)

    @cached_property
    def images(self) -> images_pb2_grpc.ImagesStub:
        from skiff.v1 import images_pb2_grpc

        return images_pb2_grpc.ImagesStub(self.channel)

    @cached_property
    def registries(self) -> images_pb2_grpc.RegistriesStub:
        from skiff.v1 import images_pb2_grpc

        return images_pb2_grpc.RegistriesStub(self.channel)

    @cached_property
    def containers(self) -> containers_pb2_grpc.ContainersStub:
        from skiff.v1 import containers_pb2_grpc

        return containers_pb2_grpc.ContainersStub(self.channel)


def translate(host: str, exc: grpc.RpcError) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    lowered = (details or "").lower()
    if code == grpc.StatusCode.UNAVAILABLE and ("ssl" in lowered or "handshake" in lowered
                                                 or "certificate" in lowered):
        reason = (details or "").rsplit(":", 1)[-1].strip() or "handshake failed"
        return ConnectionFailed(f"TLS with the skiff agent at {host} failed ({reason}): check the CA, the "
                                "client certificate and its expiry")
    if code == grpc.StatusCode.UNAVAILABLE and host.startswith("tcp://") and "socket closed" in lowered:
        return ConnectionFailed(f"the skiff agent at {host} closed the connection during the TLS handshake: "
                                "it refused the client certificate (not from its CA, or expired?)")
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in (details or "").lower()
                                                 or "socket" in (details or "").lower()):
        return ConnectionFailed(f"cannot connect to the skiff agent at {host}: is skiffd running? ({details})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ConnectionFailed(f"timed out talking to the skiff agent at {host}")
    error = AgentError(details or f"agent at {host} failed: {code}")
    try:
        metadata = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not every RpcError carries metadata
        metadata = ()
    for key, value in metadata:
        if key == "skiff-exit-code" and str(value).isdigit():
            error.exit_code = int(value)
    return error


@asynccontextmanager
async def connect(host: str, tls: TLSFiles | None = None) -> AsyncIterator[Agent]:
    target = grpc_target(host)
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.enable_retries", 0),
    ]
    if host.startswith("tcp://"):  # always mutual TLS
        channel = aio.secure_channel(target, (tls or TLSFiles.default()).credentials(), options=options)
    else:
        channel = aio.insecure_channel(target, options=options)
    try:
        yield Agent(host, channel)
    except grpc.RpcError as exc:
        raise translate(host, exc) from exc
    finally:
        await channel.close(grace=None)


async def call(host: str, fn: Callable[[Agent], Awaitable[T]], tls: TLSFiles | None = None) -> T:
    async with connect(host, tls) as agent:
        return await fn(agent)
