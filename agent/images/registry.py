"""Client for the OCI distribution / Docker Registry HTTP API v2 (pull side).

One :class:`RegistryClient` talks to one registry host through one
``httpx.AsyncClient`` (the transport is injectable for tests). It decides the
scheme once (Docker's rule: HTTPS first; plain HTTP only for insecure or
loopback registries), answers ``Basic`` and ``Bearer`` challenges (tokens cached
per scope), retries transient failures with jittered exponential backoff,
follows blob redirects itself (credentials never leave the registry host and
the token realm it names), enforces size caps while streaming and verifies
every digest it is given. Failures become the image errors of
:mod:`agent.errors`; no message ever holds a secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog

from agent.errors import (
    DigestMismatch,
    InvalidArgument,
    InvalidReference,
    ManifestUnknown,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailable,
    SizeMismatch,
    TooLarge,
)
from agent.images.auth import (
    DOCKER_HUB,
    Challenge,
    Credentials,
    HostPolicy,
    basic_authorization,
    normalize_host,
    parse_token_response,
    parse_www_authenticate,
    split_hostport,
    token_request_url,
)

__all__ = ["BlobStream", "FetchedManifest", "RegistryClient", "RegistryConfig"]

log = structlog.get_logger(__name__)

DOCKER_HUB_API_HOST = "registry-1.docker.io"
CHUNK_SIZE = 1 << 20
MAX_REDIRECTS = 10
_TOKEN_BODY_LIMIT = 1 << 20
_ERROR_BODY_LIMIT = 64 << 10
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REPOSITORY_RE = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

_Origin = tuple[str, str, int]


@dataclass
class RegistryConfig:
    """Per-agent registry settings."""

    insecure_registries: list[str] = field(default_factory=list)
    """``host:port`` or CIDR (``10.0.0.0/8``): plain HTTP allowed, TLS not verified."""
    ca_dir: Path | None = None
    """Docker's certs.d layout: ``<ca_dir>/<host:port>/*.crt`` (CAs), ``client.cert``/``.key``."""
    max_manifest_size: int = 4 << 20
    max_config_size: int = 8 << 20
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 3
    """Extra attempts after the first for connect errors, timeouts, 5xx and 429."""
    backoff_base: float = 0.5
    backoff_max: float = 8.0


@dataclass(frozen=True)
class FetchedManifest:
    media_type: str
    data: bytes
    digest: str  # "sha256:<hex>" of data


class BlobStream:
    """An open blob response. ``start`` is the offset the body begins at."""

    def __init__(self, response: httpx.Response, start: int, total: int | None, what: str) -> None:
        self._response = response
        self.start = start
        self.total = total
        self._what = what

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, as received (no content decoding), in chunks of about 1 MiB."""
        if self._response.is_stream_consumed:  # read already (in-memory transports)
            content = self._response.content
            for i in range(0, len(content), CHUNK_SIZE):
                yield content[i:i + CHUNK_SIZE]
            return
        try:
            async for chunk in self._response.aiter_raw(CHUNK_SIZE):
                yield chunk
        except httpx.TransportError as exc:
            raise RegistryUnavailable(f"reading {self._what} failed: {_describe(exc)}") from exc
        except httpx.StreamError as exc:
            raise RegistryError(f"reading {self._what} failed: {exc}") from exc


class _BothSchemesFailed(Exception):
    def __init__(self, https_exc: httpx.TransportError, http_exc: httpx.TransportError) -> None:
        super().__init__(f"https: {_describe(https_exc)}; http: {_describe(http_exc)}")
        self.https_exc = https_exc
        self.http_exc = http_exc


class RegistryClient:
    """Pull-side client for one registry host."""

    def __init__(
        self,
        host: str,
        config: RegistryConfig,
        credentials: Credentials | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = "skiff/0.1",
    ) -> None:
        self.host = normalize_host(host)
        self._config = config
        self._credentials = credentials
        self._transport = transport
        self._user_agent = user_agent
        api = DOCKER_HUB_API_HOST if self.host == DOCKER_HUB else self.host
        self._api_host, self._api_port = split_hostport(api)
        bracketed = f"[{self._api_host}]" if ":" in self._api_host else self._api_host
        self._api_netloc = bracketed if self._api_port is None else f"{bracketed}:{self._api_port}"
        self._scheme: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._setup_lock = asyncio.Lock()
        self._policy = HostPolicy(config.insecure_registries, config.connect_timeout)
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, expiry)
        self._bearer: Challenge | None = None
        self._use_basic = False
        self._now: Callable[[], float] = time.monotonic  # seams for tests
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def __repr__(self) -> str:
        return f"RegistryClient(host={self.host!r}, scheme={self._scheme!r})"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- public API -------------------------------------------------------

    async def ping(self) -> None:
        """``GET /v2/`` with authentication; :class:`RegistryAuthError` on bad credentials."""
        what = f"registry {self.host} API /v2/"
        response = await self._request("/v2/", None, {}, what, RegistryError)
        await response.aclose()

    async def get_manifest(self, repository: str, reference: str,
                           accept: Sequence[str]) -> FetchedManifest:
        _check_repository(repository)
        is_digest = _is_digest(reference)
        if not is_digest and not _TAG_RE.fullmatch(reference):
            raise InvalidReference(f"invalid tag or digest {reference!r} for {repository}")
        sep = "@" if is_digest else ":"
        what = f"manifest for {self.host}/{repository}{sep}{reference}"
        headers = {"Accept": ", ".join(accept)} if accept else {}
        path = f"/v2/{repository}/manifests/{reference}"
        response = await self._request(path, repository, headers, what, ManifestUnknown)
        try:
            data = await _read_capped(response, self._config.max_manifest_size, what)
        finally:
            await response.aclose()
        if is_digest:
            _verify_digest(data, reference, what)
        header_digest = response.headers.get("docker-content-digest", "").strip()
        if header_digest:
            if not _is_digest(header_digest):
                raise RegistryError(f"{what}: invalid Docker-Content-Digest {header_digest[:80]!r}")
            _verify_digest(data, header_digest, f"{what} (Docker-Content-Digest)")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        return FetchedManifest(media_type, data, digest)

    async def get_blob(self, repository: str, digest: str, expected_size: int,
                       max_size: int) -> bytes:
        """A small blob (an image config) read whole, digest and size verified."""
        what = f"blob {digest} in {self.host}/{repository}"
        if expected_size < 0:
            raise InvalidArgument(f"{what}: negative expected size {expected_size}")
        if expected_size > max_size:
            raise TooLarge(f"{what} has size {expected_size}, above the limit of {max_size} bytes")
        buf = bytearray()
        async with self.open_blob(repository, digest) as stream:
            if stream.total is not None and stream.total != expected_size:
                raise SizeMismatch(f"{what}: registry reports {stream.total} bytes, expected {expected_size}")
            async for chunk in stream.chunks():
                buf += chunk
                if len(buf) > expected_size:
                    raise SizeMismatch(f"{what}: more than the expected {expected_size} bytes")
        if len(buf) != expected_size:
            raise SizeMismatch(f"{what}: got {len(buf)} bytes, expected {expected_size}")
        data = bytes(buf)
        _verify_digest(data, digest, what)
        return data

    def open_blob(self, repository: str, digest: str,
                  offset: int = 0) -> AbstractAsyncContextManager[BlobStream]:
        """Stream a blob from ``offset``; the caller verifies its digest and size."""
        _check_repository(repository)
        if not _is_digest(digest):
            raise InvalidArgument(f"invalid blob digest {digest!r}")
        if offset < 0:
            raise InvalidArgument(f"invalid offset {offset} for blob {digest}")
        return self._open_blob(repository, digest, offset)

    @asynccontextmanager
    async def _open_blob(self, repository: str, digest: str, offset: int) -> AsyncIterator[BlobStream]:
        what = f"blob {digest} in {self.host}/{repository}"
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        path = f"/v2/{repository}/blobs/{digest}"
        response = await self._request(path, repository, headers, what, ManifestUnknown)
        try:
            start, total = _body_range(response, offset, what)
            yield BlobStream(response, start, total, what)
        finally:
            await response.aclose()

    # --- requests, auth, retries -----------------------------------------

    async def _request(self, path: str, repository: str | None, headers: Mapping[str, str],
                       what: str, not_found: type[Exception]) -> httpx.Response:
        """GET a registry path with auth; a successful streaming response or an error."""
        scope = f"repository:{repository}:pull" if repository else ""
        auth = await self._preemptive_auth(scope)
        response = await self._send(path, headers, auth)
        if response.status_code == 401 and self._is_registry(response.url):
            challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"))
            await response.aclose()
            auth = await self._answer(challenges, scope, auth)
            response = await self._send(path, headers, auth)
        if not response.is_success:
            await self._raise_for_status(response, what, not_found)
        return response

    async def _preemptive_auth(self, scope: str) -> str | None:
        token, expires_at = self._tokens.get(scope, ("", 0.0))
        if token and expires_at > self._now():
            return f"Bearer {token}"
        if self._use_basic and self._credentials is not None:
            return basic_authorization(self._credentials)
        if self._bearer is not None:  # known token server: skip the 401 round trip
            return await self._bearer_auth(self._bearer, scope, scope)
        return None

    async def _answer(self, challenges: list[Challenge], scope: str, previous: str | None) -> str:
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            self._bearer = Challenge("bearer", {k: v for k, v in bearer.params.items() if k != "scope"})
            return await self._bearer_auth(bearer, scope, bearer.params.get("scope") or scope)
        if any(c.scheme == "basic" for c in challenges):
            if self._credentials is None:
                raise RegistryAuthError(f"registry {self.host} requires authentication; log in first")
            if previous is not None and previous.startswith("Basic "):
                raise RegistryAuthError(f"registry {self.host} rejected the credentials (basic auth)")
            self._use_basic = True
            return basic_authorization(self._credentials)
        raise RegistryAuthError(f"registry {self.host} answered 401 without a usable challenge")

    async def _bearer_auth(self, challenge: Challenge, cache_key: str, scope: str) -> str:
        url = token_request_url(challenge, scope, self.host)
        if url.scheme == "http" and not (await self._policy.classify(_netloc(url)))[0]:
            raise RegistryAuthError(
                f"registry {self.host}: refusing plain-HTTP token server {_netloc(url)}; "
                "it must use HTTPS or be an insecure registry"
            )
        auth = basic_authorization(self._credentials) if self._credentials else None
        who = "credentials" if self._credentials else "anonymous access"
        response = await self._send(url, {}, auth)
        try:
            if response.status_code in (401, 403):
                raise RegistryAuthError(
                    f"token server {url.host} for registry {self.host} refused {who} "
                    f"(HTTP {response.status_code})"
                )
            if not response.is_success:
                await self._raise_for_status(response, f"token from {url.host}", RegistryAuthError)
            body = await _read_capped(response, _TOKEN_BODY_LIMIT, f"token from {url.host}")
        finally:
            await response.aclose()
        value, lifetime = parse_token_response(body, url.host)
        self._tokens[cache_key] = (value, self._now() + lifetime - 5.0)
        log.debug("registry.token", host=self.host, scope=scope, expires_in=lifetime)
        return f"Bearer {value}"

    async def _send(self, target: str | httpx.URL, headers: Mapping[str, str],
                    auth: str | None) -> httpx.Response:
        """One GET with retries; ``target`` is a registry path or an absolute URL (token realm)."""
        await self._setup()
        attempts = max(0, self._config.retries) + 1
        failure: BaseException | None = None
        retry_after = 0.0
        for attempt in range(attempts):
            if attempt:
                delay = min(self._config.backoff_max, self._config.backoff_base * 2 ** (attempt - 1))
                delay = max(delay * random.uniform(0.5, 1.0), min(retry_after, self._config.backoff_max))
                log.info("registry.retry", host=self.host, attempt=attempt, delay=round(delay, 3),
                         cause=_describe(failure) if failure else None)
                await self._sleep(delay)
            try:
                response = await self._send_once(target, headers, auth)
            except _BothSchemesFailed as exc:
                reason = _cert_reason(exc.https_exc)
                if reason is not None:
                    raise self._x509_error(reason) from exc.https_exc
                failure = exc
                continue
            except httpx.TransportError as exc:
                reason = _cert_reason(exc)
                if reason is not None:
                    raise self._x509_error(reason) from exc
                failure = exc
                continue
            except httpx.HTTPError as exc:
                raise RegistryError(f"registry {self.host}: {_describe(exc)}") from exc
            if response.status_code in _RETRY_STATUSES and attempt + 1 < attempts:
                retry_after = _retry_after(response)
                failure = None
                await response.aclose()
                continue
            return response
        cause = _describe(failure) if failure else "no answer"
        raise RegistryUnavailable(f"registry {self.host} unreachable after {attempts} attempts: "
                                  f"{cause}") from failure

    async def _send_once(self, target: str | httpx.URL, headers: Mapping[str, str],
                         auth: str | None) -> httpx.Response:
        if isinstance(target, httpx.URL):
            return await self._send_hops(target, headers, auth, _origin(target))
        if self._scheme is not None:
            url = self._registry_url(self._scheme, target)
            return await self._send_hops(url, headers, auth, _origin(url))
        # Docker's rule for a registry where HTTP is allowed: try HTTPS, then HTTP.
        https = self._registry_url("https", target)
        try:
            response = await self._send_hops(https, headers, auth, _origin(https))
        except httpx.TransportError as https_exc:
            http = self._registry_url("http", target)
            try:
                response = await self._send_hops(http, headers, auth, _origin(http))
            except httpx.TransportError as http_exc:
                raise _BothSchemesFailed(https_exc, http_exc) from http_exc
            self._scheme = "http"
            log.info("registry.scheme", host=self.host, scheme="http", https_error=_describe(https_exc))
            return response
        self._scheme = "https"
        return response

    async def _send_hops(self, url: httpx.URL, headers: Mapping[str, str], auth: str | None,
                         auth_origin: _Origin) -> httpx.Response:
        """Send, following redirects; ``Authorization`` only goes to ``auth_origin``."""
        assert self._client is not None
        for _ in range(MAX_REDIRECTS + 1):
            hop_headers = dict(headers)
            if auth is not None and _origin(url) == auth_origin:
                hop_headers["Authorization"] = auth
            request = self._client.build_request("GET", url, headers=hop_headers)
            response = await self._client.send(request, stream=True)
            if not response.is_redirect:
                return response
            location = response.headers["location"]
            await response.aclose()
            try:
                url = url.join(location)
            except httpx.InvalidURL as exc:
                raise RegistryError(f"registry {self.host} redirected to an invalid URL") from exc
            if url.scheme not in _DEFAULT_PORTS:
                raise RegistryError(f"registry {self.host} redirected to unsupported scheme {url.scheme!r}")
        raise RegistryError(f"registry {self.host}: more than {MAX_REDIRECTS} redirects")

    # --- setup: scheme, TLS, client --------------------------------------

    async def _setup(self) -> None:
        if self._client is not None:
            return
        async with self._setup_lock:
            if self._client is not None:
                return
            http_allowed, insecure = await self._policy.classify(self._api_netloc)
            if not http_allowed:
                self._scheme = "https"
            timeout = httpx.Timeout(self._config.read_timeout, connect=self._config.connect_timeout)
            # Several parallel blob downloads plus manifest/token requests share the pool.
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=30.0)
            # identity: hash exactly the bytes stored, and no decompression bombs under a cap.
            headers = {"User-Agent": self._user_agent, "Accept-Encoding": "identity"}
            verify: ssl.SSLContext | bool = False
            if self._transport is None and not insecure:
                verify = await asyncio.to_thread(self._ssl_context)
            self._client = httpx.AsyncClient(
                transport=self._transport,
                verify=verify,
                limits=limits,
                timeout=timeout,
                headers=headers,
                trust_env=self._transport is None,  # env proxies would bypass an injected transport
                follow_redirects=False,  # _send_hops follows them, minding credentials
            )

    def _ssl_context(self) -> ssl.SSLContext:
        """System CAs plus ``<ca_dir>/<host>/*.crt`` and a ``client.cert``/``client.key`` pair."""
        context = ssl.create_default_context()
        if self._config.ca_dir is None:
            return context
        for name in {self.host, self._api_netloc}:
            directory = self._config.ca_dir / name
            if not directory.is_dir():
                continue
            for ca in sorted(directory.glob("*.crt")):
                context.load_verify_locations(cafile=str(ca))
            cert, key = directory / "client.cert", directory / "client.key"
            if cert.is_file() and key.is_file():
                context.load_cert_chain(str(cert), str(key))
        return context

    # --- helpers ------------------------------------------------------------

    def _registry_url(self, scheme: str, path: str) -> httpx.URL:
        return httpx.URL(f"{scheme}://{self._api_netloc}{path}")

    def _is_registry(self, url: httpx.URL) -> bool:
        port = self._api_port or _DEFAULT_PORTS.get(url.scheme, 0)
        return _origin(url)[1:] == (self._api_host.lower(), port)

    def _x509_error(self, reason: str) -> RegistryUnavailable:
        ca = f"{self._config.ca_dir or '<ca_dir>'}/{self.host}/ca.crt"
        return RegistryUnavailable(
            f"registry {self.host}: x509: certificate verification failed: {reason} "
            f"(install the registry's CA as {ca}, or list the host in insecure_registries)"
        )

    async def _raise_for_status(self, response: httpx.Response, what: str, not_found: type[Exception]) -> None:
        status = response.status_code
        try:
            body = await _read_capped(response, _ERROR_BODY_LIMIT, what, truncate=True)
        except (RegistryUnavailable, RegistryError):
            body = b""
        finally:
            await response.aclose()
        code, message = _registry_error(body)
        detail = message or code.lower().replace("_", " ") or f"HTTP {status} {response.reason_phrase}".strip()
        if status == 404 or code in _NOT_FOUND_CODES:
            raise not_found(f"{what} not found: {detail}")
        if status in (401, 403) or code in ("UNAUTHORIZED", "DENIED"):
            hint = "" if self._credentials else "; it may not exist or may require 'skiff login'"
            raise RegistryAuthError(f"access to {what} denied by {self.host}: {detail}{hint}")
        if status >= 500 or status == 429:
            raise RegistryUnavailable(f"registry {self.host} answered HTTP {status} for {what}: {detail}")
        raise RegistryError(f"registry {self.host} answered HTTP {status} for {what}: {detail}")


# --- module helpers ---------------------------------------------------------


def _check_repository(repository: str) -> None:
    if len(repository) > 255 or not _REPOSITORY_RE.fullmatch(repository):
        raise InvalidReference(f"invalid repository name {repository!r}")


def _is_digest(value: str) -> bool:
    return _DIGEST_RE.fullmatch(value) is not None


def _verify_digest(data: bytes, digest: str, what: str) -> None:
    algorithm, _, expected = digest.partition(":")
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected:
        raise DigestMismatch(f"{what}: content has digest {algorithm}:{actual}, expected {digest}")


async def _read_capped(response: httpx.Response, limit: int, what: str, *, truncate: bool = False) -> bytes:
    """Read a (decoded) body, never more than ``limit`` bytes into memory."""
    declared = response.headers.get("content-length")
    if not truncate and declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what} is {declared} bytes, above the limit of {limit} bytes")
    buf = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                if truncate:
                    return bytes(buf[:limit])
                raise TooLarge(f"{what} is larger than the limit of {limit} bytes")
    except httpx.TransportError as exc:
        raise RegistryUnavailable(f"reading {what} failed: {_describe(exc)}") from exc
    except httpx.HTTPError as exc:
        raise RegistryError(f"reading {what} failed: {exc}") from exc
    return bytes(buf)


def _body_range(response: httpx.Response, offset: int, what: str) -> tuple[int, int | None]:
    if response.status_code == 206:
        match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None or int(match.group(1)) != offset:
            raise RegistryError(
                f"{what}: partial answer with Content-Range "
                f"{response.headers.get('content-range', '')[:80]!r} for offset {offset}"
            )
        total = match.group(3)
        return offset, None if total == "*" else int(total)
    if response.status_code == 200:
        length = response.headers.get("content-length", "")
        return 0, int(length) if length.isdigit() else None
    raise RegistryError(f"{what}: unexpected HTTP {response.status_code}")


def _registry_error(body: bytes) -> tuple[str, str]:
    """``(code, message)`` of the first entry of a registry's ``{"errors": […]}`` body."""
    try:
        doc = json.loads(body)
        first = doc["errors"][0]
        code, message = str(first.get("code") or ""), str(first.get("message") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "", ""
    message = "".join(ch if ch.isprintable() else " " for ch in message)[:300]
    return code.upper()[:64], message


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else 0.0


def _netloc(url: httpx.URL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return host if url.port is None else f"{host}:{url.port}"


def _origin(url: httpx.URL) -> _Origin:
    return (url.scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(url.scheme, 0))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in out):
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _cert_reason(exc: BaseException) -> str | None:
    """The verification failure behind ``exc``, or ``None`` if it is no certificate error."""
    chain = _chain(exc)
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError):
            return str(item.verify_message or item.reason or "certificate verify failed")
    if any("CERTIFICATE_VERIFY_FAILED" in str(item) for item in chain):
        return "certificate verify failed"
    return None


def _describe(exc: BaseException) -> str:
    """A short, secret-free cause: the exception type and the root OS error if any."""
    if isinstance(exc, _BothSchemesFailed):
        return str(exc)
    if isinstance(exc, httpx.TimeoutException):
        return f"{type(exc).__name__} (timed out)"
    text = str(exc).strip()
    for item in reversed(_chain(exc)):
        if isinstance(item, socket.gaierror):
            text = f"DNS lookup failed: {item.strerror}"
            break
        if isinstance(item, OSError) and isinstance(item.errno, int) and item.errno > 0:
            text = os.strerror(item.errno).lower()
            break
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
