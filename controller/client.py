"""Connection to one agent, and the one place gRPC errors become controller errors."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from grpc import aio

from controller.errors import AgentError, ConnectionFailed, UsageError
from controller.targets import Target

if TYPE_CHECKING:
    from controller.ssh import SSHOptions
    from skiff.v1 import containers_pb2_grpc, images_pb2_grpc, system_pb2_grpc

DEFAULT_HOST = "unix:///run/skiff/skiffd.sock"
#: request metadata naming one mutating call, so the agent can answer a retry without acting twice
OPERATION_HEADER = "skiff-operation-id"
T = TypeVar("T")
S = TypeVar("S")
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
        """Read once per process and shared by every channel (a fan-out makes hundreds)."""
        return _credentials(self)

    def _read(self) -> grpc.ChannelCredentials:
        try:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                                private_key=self.key.read_bytes(),
                                                certificate_chain=self.cert.read_bytes())
        except OSError as exc:
            raise UsageError(f"TLS: cannot read {exc.filename}: {exc.strerror} "
                             "(--tlscacert/--tlscert/--tlskey, or $SKIFF_CERT_PATH; see `skiff ca`)") from None


@functools.lru_cache(maxsize=8)
def _credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    return files._read()


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
    raise UsageError(f"unsupported host {host!r}: use unix:///path/to/skiffd.sock, tcp://HOST:PORT "
                     "or ssh://[USER@]HOST[:PORT]")


class Agent:
    """Stubs for one agent over one channel, each made (and its module imported) on first use."""

    def __init__(self, host: str, channel: aio.Channel, operation: str | None = None) -> None:
        self.host = host
        self.channel = channel
        #: a streaming call (logs, exec, attach, pull) was opened: repeating this host's work is unsafe
        self.streamed = False
        #: this host's work's operation id: every unary call carries ``OPERATION/N`` (N: its ordinal),
        #: so a retry, which makes the same calls in the same order, carries the ids the agent already
        #: answered, and the agent does not do them twice
        self.operation = operation
        self.calls = 0

    async def probe(self, timeout: float = 2.0) -> None:
        """A health check, answered by every agent to every role: raises the connection's error."""
        check = self.channel.unary_unary("/grpc.health.v1.Health/Check")
        await check(b"", timeout=timeout)

    def _stub(self, kind: type[S]) -> S:
        """A stub whose methods are made on first use (a fan-out over hundreds of hosts calls one or
        two of a service's methods on each); calling a streaming method marks the host streamed."""
        return cast(S, _LazyStub(self, _method_table(cast(type, kind))))

    def _numbered(self, method: Callable[..., T]) -> Callable[..., T]:
        def call(request: object, *, metadata: Any = None, **kwargs: object) -> T:
            self.calls += 1
            numbered = (*(metadata or ()), (OPERATION_HEADER, f"{self.operation}/{self.calls}"))
            return method(request, metadata=numbered, **kwargs)

        return call

    def _streaming(self, method: Callable[..., T]) -> Callable[..., T]:
        def call(*args: object, **kwargs: object) -> T:
            self.streamed = True
            return method(*args, **kwargs)

        return call

    @cached_property
    def system(self) -> system_pb2_grpc.SystemStub:
        from skiff.v1 import system_pb2_grpc

        return self._stub(system_pb2_grpc.SystemStub)

    @cached_property
    def images(self) -> images_pb2_grpc.ImagesStub:
        from skiff.v1 import images_pb2_grpc

        return self._stub(images_pb2_grpc.ImagesStub)

    @cached_property
    def registries(self) -> images_pb2_grpc.RegistriesStub:
        from skiff.v1 import images_pb2_grpc

        return self._stub(images_pb2_grpc.RegistriesStub)

    @cached_property
    def containers(self) -> containers_pb2_grpc.ContainersStub:
        from skiff.v1 import containers_pb2_grpc

        return self._stub(containers_pb2_grpc.ContainersStub)


class _Recorder:
    """Takes a channel's place while a generated stub's constructor runs: each method it would make
    comes back as (kind, path, arguments)."""

    def __getattr__(self, kind: str) -> Callable[..., tuple[str, str, dict[str, Any]]]:
        if kind not in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            raise AttributeError(kind)
        return lambda path, **kwargs: (kind, path, kwargs)


@functools.cache
def _method_table(kind: type) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """A generated stub class's methods: name -> (channel method, path, its arguments)."""
    return dict(vars(kind(_Recorder())))


class _LazyStub:
    def __init__(self, agent: Agent, table: dict[str, tuple[str, str, dict[str, Any]]]) -> None:
        self._agent = agent
        self._table = table

    def __getattr__(self, name: str) -> Any:
        try:
            kind, path, kwargs = self._table[name]
        except KeyError:
            raise AttributeError(name) from None
        method = getattr(self._agent.channel, kind)(path, **kwargs)
        if kind != "unary_unary":
            method = self._agent._streaming(method)
        elif self._agent.operation:
            method = self._agent._numbered(method)
        setattr(self, name, method)
        return method


def translate(host: str, exc: grpc.RpcError, tcp: bool | None = None) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    lowered = (details or "").lower()
    if code == grpc.StatusCode.UNAVAILABLE and ("ssl" in lowered or "handshake" in lowered
                                                 or "certificate" in lowered):
        reason = (details or "").rsplit(":", 1)[-1].strip() or "handshake failed"
        failed = ConnectionFailed(f"TLS with the skiff agent at {host} failed ({reason}): check the CA, the "
                                  "client certificate and its expiry")
        failed.retryable = False
        return failed
    if tcp is None:
        tcp = host.startswith("tcp://")
    if code == grpc.StatusCode.UNAVAILABLE and tcp and "socket closed" in lowered:
        failed = ConnectionFailed(f"the skiff agent at {host} closed the connection during the TLS handshake: "
                                  "it refused the client certificate (not from its CA, or expired?)")
        failed.retryable = False
        return failed
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
async def connect(target: Target | str, tls: TLSFiles | None = None, ssh: SSHOptions | None = None,
                  operation: str | None = None) -> AsyncIterator[Agent]:
    """One agent's stubs over one channel; ``ssh://`` targets go through an SSH tunnel.  With an
    ``operation``, every unary call carries ``OPERATION/N`` (its ordinal) as its operation id."""
    if isinstance(target, str):
        target = Target(target)
    if target.is_ssh:
        from controller.ssh import SSHOptions, tunnel

        async with tunnel(target, ssh or SSHOptions()) as local:
            async with _channel(target.label, local, None, operation=operation) as agent:
                yield agent
        return
    secure = target.url.startswith("tcp://")
    async with _channel(target.label, grpc_target(target.url), tls if secure else None, secure=secure,
                        operation=operation) as agent:
        yield agent


@asynccontextmanager
async def _channel(host: str, target: str, tls: TLSFiles | None, *, secure: bool = False,
                   operation: str | None = None) -> AsyncIterator[Agent]:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.enable_retries", 0),
    ]
    if secure:  # tcp:// is always mutual TLS
        channel = aio.secure_channel(target, (tls or TLSFiles.default()).credentials(), options=options)
    else:
        channel = aio.insecure_channel(target, options=options)
    try:
        yield Agent(host, channel, operation)
    except grpc.RpcError as exc:
        raise translate(host, exc, secure) from exc
    finally:
        await channel.close(grace=None)


async def call(host: Target | str, fn: Callable[[Agent], Awaitable[T]], tls: TLSFiles | None = None) -> T:
    async with connect(host, tls) as agent:
        return await fn(agent)
