"""Unit tests for agent.images.registry over httpx.MockTransport (no network)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import (
    DigestMismatch,
    InvalidReference,
    ManifestUnknown,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailable,
    SizeMismatch,
    TooLarge,
)
from agent.images.auth import Credentials
from agent.images.registry import FetchedManifest, RegistryClient, RegistryConfig

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": []}).encode()
CREDS = Credentials("alice", "s3cret-pa55")
Handler = Callable[[httpx.Request], httpx.Response]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config(**kw: Any) -> RegistryConfig:
    kw.setdefault("insecure_registries", [])
    kw.setdefault("ca_dir", None)
    kw.setdefault("backoff_base", 0.0)
    kw.setdefault("backoff_max", 0.0)
    return RegistryConfig(**kw)


class Recorder:
    """Wraps a handler and records every request it sees."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def urls(self) -> list[str]:
        return [str(r.url) for r in self.requests]

    def to(self, host: str, path: str | None = None) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == host and (path is None or r.url.path == path)]


def make_client(host: str, handler: Handler, creds: Credentials | None = None,
                **cfg: Any) -> tuple[RegistryClient, Recorder]:
    rec = Recorder(handler)
    return RegistryClient(host, config(**cfg), creds, transport=httpx.MockTransport(rec)), rec


def manifest_response(data: bytes = MANIFEST, **headers: str) -> httpx.Response:
    return httpx.Response(200, content=data, headers={"Content-Type": MANIFEST_TYPE, **headers})


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def basic_of(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


# --- scheme ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost:5000", "127.0.0.1:5000", "127.9.9.9", "[::1]:5000"])
async def test_loopback_falls_back_to_http_once(host: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https":
            return refuse(request)
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        return manifest_response()

    client, rec = make_client(host, handler)
    async with client:
        await client.ping()
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert [r.url.scheme for r in rec.requests] == ["https", "http", "http"]


async def test_public_host_never_falls_back_to_http() -> None:
    client, rec = make_client("registry.example.com:5000", refuse, retries=2)
    async with client:
        with pytest.raises(RegistryUnavailable) as info:
            await client.ping()
    assert {r.url.scheme for r in rec.requests} == {"https"}
    assert len(rec.requests) == 3  # first attempt + 2 retries
    assert "registry.example.com:5000" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("host", "insecure", "falls_back"),
    [
        ("10.1.2.3:5000", ["10.0.0.0/8"], True),
        ("192.168.7.7:5000", ["10.0.0.0/8"], False),
        ("reg.internal:5000", ["reg.internal:5000"], True),
        ("reg.internal:5001", ["reg.internal:5000"], False),
    ],
)
async def test_insecure_registries(host: str, insecure: list[str], falls_back: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https":
            return refuse(request)
        return httpx.Response(200, json={})

    client, rec = make_client(host, handler, insecure_registries=insecure, retries=0)
    async with client:
        if falls_back:
            await client.ping()
        else:
            with pytest.raises(RegistryUnavailable):
                await client.ping()
    assert ("http" in [r.url.scheme for r in rec.requests]) is falls_back


def cert_failure(request: httpx.Request) -> httpx.Response:
    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    cause.verify_message = "self-signed certificate"
    raise httpx.ConnectError("certificate verify failed", request=request) from cause


async def test_tls_verification_failure_is_x509_not_retried_not_downgraded() -> None:
    client, rec = make_client("registry.example.com", cert_failure, retries=3)
    async with client:
        with pytest.raises(RegistryUnavailable) as info:
            await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert len(rec.requests) == 1
    assert "x509" in str(info.value) and "self-signed certificate" in str(info.value)
    assert "registry.example.com" in str(info.value)


async def test_tls_failure_on_loopback_downgrades_to_http() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https":
            return cert_failure(request)
        return httpx.Response(200, json={})

    client, rec = make_client("localhost:5000", handler)
    async with client:
        await client.ping()
    assert [r.url.scheme for r in rec.requests] == ["https", "http"]


async def test_docker_hub_uses_registry_1_and_user_agent() -> None:
    client, rec = make_client("index.docker.io", lambda r: manifest_response())
    assert client.host == "docker.io"
    async with client:
        await client.get_manifest("library/busybox", "latest", [MANIFEST_TYPE])
    (request,) = rec.requests
    assert str(request.url) == "https://registry-1.docker.io/v2/library/busybox/manifests/latest"
    assert request.headers["user-agent"] == "skiff/0.1"
    assert request.headers["accept"] == MANIFEST_TYPE


async def test_cidr_matches_resolved_name() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return refuse(request) if request.url.scheme == "https" else httpx.Response(200)

    client, rec = make_client("reg.corp:5000", handler, insecure_registries=["10.0.0.0/8"])

    async def fake_resolve(name: str) -> list[Any]:  # no DNS in unit tests
        assert name == "reg.corp"
        return [ipaddress.ip_address("10.9.9.9")]

    client._policy.resolve = fake_resolve  # type: ignore[method-assign,assignment]
    async with client:
        await client.ping()
    assert [r.url.scheme for r in rec.requests] == ["https", "http"]


def test_ssl_context_loads_ca_from_ca_dir(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    host_dir = tmp_path / "reg.example:5000"
    host_dir.mkdir()
    ca.cert_pem.write_to_path(str(host_dir / "ca.crt"))
    client = RegistryClient("reg.example:5000", config(ca_dir=tmp_path))
    context = client._ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    subjects = [str(c["subject"]) for c in context.get_ca_certs()]
    assert any("trustme" in subject for subject in subjects)


# --- auth --------------------------------------------------------------------


async def test_anonymous_sends_no_authorization() -> None:
    client, rec = make_client("reg.example.com", lambda r: manifest_response())
    async with client:
        fetched = await client.get_manifest("busybox", "latest", [MANIFEST_TYPE, "b"])
    assert fetched == FetchedManifest(MANIFEST_TYPE, MANIFEST, sha(MANIFEST))
    assert "authorization" not in rec.requests[0].headers
    assert rec.requests[0].headers["accept"] == f"{MANIFEST_TYPE}, b"


class BearerRegistry:
    """A registry on reg.example.com with a token server on auth.example.com."""

    def __init__(self, scope_in_challenge: bool = True, token_key: str = "token",
                 good: Credentials | None = CREDS) -> None:
        self.scope_in_challenge = scope_in_challenge
        self.token_key = token_key
        self.good = good
        self.issued = 0
        self.valid: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            auth = request.headers.get("authorization")
            if self.good is not None and auth is not None and auth != basic_of(self.good):
                return httpx.Response(401, json={"details": "incorrect username or password"})
            self.issued += 1
            token = f"tok{self.issued}"
            self.valid.add(f"Bearer {token}")
            return httpx.Response(200, json={self.token_key: token, "expires_in": 300})
        if request.headers.get("authorization") in self.valid:
            return manifest_response() if "/manifests/" in request.url.path else httpx.Response(200)
        repo = request.url.path.split("/manifests/")[0].removeprefix("/v2/")
        challenge = 'Bearer realm="https://auth.example.com/token",service="reg.example.com"'
        if self.scope_in_challenge and "/manifests/" in request.url.path:
            challenge += f',scope="repository:{repo}:pull"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge},
                              json={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})


@pytest.mark.parametrize("token_key", ["token", "access_token"])
async def test_bearer_flow_with_credentials(token_key: str) -> None:
    client, rec = make_client("reg.example.com", BearerRegistry(token_key=token_key), CREDS)
    async with client:
        fetched = await client.get_manifest("library/busybox", "latest", [MANIFEST_TYPE])
    assert fetched.data == MANIFEST
    (token_req,) = rec.to("auth.example.com")
    assert token_req.url.params["service"] == "reg.example.com"
    assert token_req.url.params.get_list("scope") == ["repository:library/busybox:pull"]
    assert token_req.headers["authorization"] == basic_of(CREDS)
    assert rec.requests[-1].headers["authorization"] == "Bearer tok1"


async def test_bearer_anonymous_token_and_caching_per_scope() -> None:
    registry = BearerRegistry()
    client, rec = make_client("reg.example.com", registry)
    async with client:
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
        await client.get_manifest("busybox", "1.36", [MANIFEST_TYPE])
        assert registry.issued == 1  # cached for the scope
        await client.get_manifest("alpine", "latest", [MANIFEST_TYPE])
    assert registry.issued == 2
    token_reqs = rec.to("auth.example.com")
    assert all("authorization" not in r.headers for r in token_reqs)
    assert [r.url.params["scope"] for r in token_reqs] == [
        "repository:busybox:pull", "repository:alpine:pull"]
    # The second repository reused the known realm: no extra 401 round trip.
    assert [r.url.path for r in rec.to("reg.example.com")] == [
        "/v2/busybox/manifests/latest", "/v2/busybox/manifests/latest",
        "/v2/busybox/manifests/1.36", "/v2/alpine/manifests/latest"]


async def test_bearer_uses_scope_from_challenge_and_default_otherwise() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            return httpx.Response(200, json={"token": "T"})
        if request.headers.get("authorization") == "Bearer T":
            return manifest_response()
        return httpx.Response(401, headers={"WWW-Authenticate": (
            'Bearer realm="https://auth.example.com/token?x=1",service="svc",'
            'scope="repository:busybox:pull,push"')})

    client, rec = make_client("reg.example.com", handler)
    async with client:
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    (token_req,) = rec.to("auth.example.com")
    assert token_req.url.params["scope"] == "repository:busybox:pull,push"
    assert token_req.url.params["x"] == "1"

    client, rec = make_client("reg.example.com", BearerRegistry(scope_in_challenge=False))
    async with client:
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert rec.to("auth.example.com")[0].url.params["scope"] == "repository:busybox:pull"


async def test_bearer_token_expires() -> None:
    registry = BearerRegistry()
    client, _ = make_client("reg.example.com", registry)
    now = [1000.0]
    client._now = lambda: now[0]
    async with client:
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
        now[0] += 200
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
        assert registry.issued == 1
        now[0] += 200  # past expires_in=300
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert registry.issued == 2


async def test_bearer_bad_credentials_raise_auth_error_without_secret() -> None:
    client, _ = make_client("reg.example.com", BearerRegistry(), Credentials("alice", "wrong-pw"))
    async with client:
        with pytest.raises(RegistryAuthError) as info:
            await client.ping()
    assert "reg.example.com" in str(info.value)
    assert "wrong-pw" not in str(info.value)


async def test_plain_http_realm_refused_for_public_host() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.example.com/t"'})

    client, rec = make_client("reg.example.com", handler, CREDS)
    async with client:
        with pytest.raises(RegistryAuthError, match="HTTPS"):
            await client.ping()
    assert not rec.to("auth.example.com")


class BasicRegistry:
    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") == basic_of(CREDS):
            return manifest_response() if "/manifests/" in request.url.path else httpx.Response(200)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="Registry Realm, v2"'})


async def test_basic_flow_then_preemptive() -> None:
    client, rec = make_client("reg.example.com", BasicRegistry(), CREDS)
    async with client:
        await client.ping()
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert [r.headers.get("authorization") for r in rec.requests] == [
        None, basic_of(CREDS), basic_of(CREDS)]


@pytest.mark.parametrize("creds", [Credentials("alice", "not-it"), None])
async def test_basic_bad_or_missing_credentials(creds: Credentials | None) -> None:
    client, rec = make_client("reg.example.com:5443", BasicRegistry(), creds)
    async with client:
        with pytest.raises(RegistryAuthError) as info:
            await client.ping()
    assert "reg.example.com:5443" in str(info.value)
    assert "not-it" not in str(info.value)
    assert len(rec.requests) <= 2


async def test_credentials_not_sent_to_redirect_on_another_host() -> None:
    blob = b"layer-bytes" * 100

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage.example.net":
            return httpx.Response(200, content=blob)
        if request.headers.get("authorization") != basic_of(CREDS):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if request.url.path.endswith("/same"):
            return httpx.Response(307, headers={"Location": f"/v2/busybox/blobs/{sha(blob)}"})
        if "/blobs/" in request.url.path and "redirected" not in request.url.params:
            return httpx.Response(307, headers={"Location": "https://storage.example.net/b?sig=abc&redirected=1"})
        return httpx.Response(404)

    client, rec = make_client("reg.example.com", handler, CREDS)
    async with client:
        data = await client.get_blob("busybox", sha(blob), len(blob), 1 << 20)
    assert data == blob
    (storage,) = rec.to("storage.example.net")
    assert "authorization" not in storage.headers
    assert rec.to("reg.example.com")[-1].headers["authorization"] == basic_of(CREDS)


async def test_credentials_kept_on_same_host_redirect() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != basic_of(CREDS):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if request.url.path == "/v2/busybox/manifests/latest":
            return httpx.Response(302, headers={"Location": "/v2/busybox/manifests/other"})
        return manifest_response()

    client, rec = make_client("reg.example.com", handler, CREDS)
    async with client:
        await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert rec.requests[-1].url.path == "/v2/busybox/manifests/other"


# --- manifests -----------------------------------------------------------------


async def test_manifest_by_digest_must_hash_to_it() -> None:
    client, _ = make_client("reg.example.com", lambda r: manifest_response(MANIFEST + b" "))
    async with client:
        with pytest.raises(DigestMismatch) as info:
            await client.get_manifest("busybox", sha(MANIFEST), [MANIFEST_TYPE])
        fetched = await client.get_manifest("busybox", sha(MANIFEST + b" "), [MANIFEST_TYPE])
    assert sha(MANIFEST) in str(info.value)
    assert fetched.digest == sha(MANIFEST + b" ")


async def test_docker_content_digest_is_verified() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        wrong = request.url.path.endswith("/bad")
        digest = sha(b"x" if wrong else MANIFEST)
        return httpx.Response(200, content=MANIFEST, headers={"Docker-Content-Digest": digest})

    client, _ = make_client("reg.example.com", handler)
    async with client:
        assert (await client.get_manifest("busybox", "good", [MANIFEST_TYPE])).digest == sha(MANIFEST)
        with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
            await client.get_manifest("busybox", "bad", [MANIFEST_TYPE])


async def test_oversized_manifest_is_capped_while_streaming() -> None:
    pulled = [0]

    async def endless() -> AsyncIterator[bytes]:
        while True:
            pulled[0] += 1
            yield b"x" * 65536

    client, _ = make_client("reg.example.com", lambda r: httpx.Response(200, content=endless()),
                            max_manifest_size=1 << 20)
    async with client:
        with pytest.raises(TooLarge):
            await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert pulled[0] <= (1 << 20) // 65536 + 2


async def test_oversized_manifest_by_content_length() -> None:
    client, _ = make_client("reg.example.com", lambda r: manifest_response(b"{" * 2048),
                            max_manifest_size=1024)
    async with client:
        with pytest.raises(TooLarge, match="1024"):
            await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])


async def test_media_type_is_content_type_without_parameters() -> None:
    client, _ = make_client("reg.example.com", lambda r: httpx.Response(
        200, content=MANIFEST, headers={"Content-Type": f"{MANIFEST_TYPE}; charset=utf-8"}))
    async with client:
        fetched = await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert fetched.media_type == MANIFEST_TYPE


async def test_404_maps_to_manifest_unknown_with_registry_message() -> None:
    body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {}}]}
    client, _ = make_client("127.0.0.1:5000", lambda r: httpx.Response(404, json=body))
    async with client:
        with pytest.raises(ManifestUnknown) as info:
            await client.get_manifest("busybox", "nope", [MANIFEST_TYPE])
    assert str(info.value) == "manifest for 127.0.0.1:5000/busybox:nope not found: manifest unknown"


async def test_name_unknown_and_blob_unknown() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        code = "BLOB_UNKNOWN" if "/blobs/" in request.url.path else "NAME_UNKNOWN"
        return httpx.Response(404, json={"errors": [{"code": code, "message": code.lower().replace("_", " ")}]})

    client, _ = make_client("reg.example.com", handler)
    async with client:
        with pytest.raises(ManifestUnknown, match="repository name not known|name unknown"):
            await client.get_manifest("nosuch", "latest", [MANIFEST_TYPE])
        with pytest.raises(ManifestUnknown, match="blob unknown"):
            await client.get_blob("busybox", sha(b""), 0, 10)


@pytest.mark.parametrize(("status", "error"), [(403, RegistryAuthError), (400, RegistryError),
                                               (501, RegistryUnavailable)])
async def test_other_statuses(status: int, error: type[Exception]) -> None:
    client, _ = make_client("reg.example.com", lambda r: httpx.Response(status, json={
        "errors": [{"code": "DENIED", "message": "requested access to the resource is denied"}]}
        if status == 403 else None))
    async with client:
        with pytest.raises(error) as info:
            await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert "reg.example.com" in str(info.value)


async def test_invalid_names_rejected_before_any_request() -> None:
    client, rec = make_client("reg.example.com", lambda r: manifest_response())
    async with client:
        with pytest.raises(InvalidReference):
            await client.get_manifest("../etc", "latest", [])
        with pytest.raises(InvalidReference):
            await client.get_manifest("busybox", "bad tag", [])
    assert rec.requests == []


# --- retries -------------------------------------------------------------------


async def test_503_retried_then_success() -> None:
    answers = [httpx.Response(503), httpx.Response(503, headers={"Retry-After": "0"}), manifest_response()]
    client, rec = make_client("reg.example.com", lambda r: answers.pop(0), retries=3)
    async with client:
        fetched = await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert fetched.data == MANIFEST
    assert len(rec.requests) == 3


async def test_5xx_and_timeouts_exhaust_retries() -> None:
    client, rec = make_client("reg.example.com", lambda r: httpx.Response(502), retries=2)
    async with client:
        with pytest.raises(RegistryUnavailable, match="502"):
            await client.get_manifest("busybox", "latest", [MANIFEST_TYPE])
    assert len(rec.requests) == 3

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    client, rec = make_client("reg.example.com", timeout, retries=1)
    async with client:
        with pytest.raises(RegistryUnavailable, match="reg.example.com.*ConnectTimeout"):
            await client.ping()
    assert len(rec.requests) == 2


async def test_backoff_is_jittered_exponential() -> None:
    client, _ = make_client("reg.example.com", lambda r: httpx.Response(503), retries=3,
                            backoff_base=1.0, backoff_max=3.0)
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)

    client._sleep = fake_sleep
    async with client:
        with pytest.raises(RegistryUnavailable):
            await client.ping()
    assert len(delays) == 3
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 1.5 <= delays[2] <= 3.0


# --- blobs -----------------------------------------------------------------------

BLOB = bytes(range(256)) * 8


def range_handler(honour: bool) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        header = request.headers.get("range")
        if honour and header:
            start = int(header.removeprefix("bytes=").rstrip("-"))
            return httpx.Response(206, content=BLOB[start:], headers={
                "Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"})
        return httpx.Response(200, content=BLOB)

    return handler


async def test_range_answered_with_206() -> None:
    client, rec = make_client("reg.example.com", range_handler(True))
    async with client:
        async with client.open_blob("busybox", sha(BLOB), 1000) as stream:
            body = b"".join([c async for c in stream.chunks()])
    assert rec.requests[0].headers["range"] == "bytes=1000-"
    assert (stream.start, stream.total) == (1000, len(BLOB))
    assert body == BLOB[1000:]


async def test_range_ignored_starts_at_zero() -> None:
    client, rec = make_client("reg.example.com", range_handler(False))
    async with client:
        async with client.open_blob("busybox", sha(BLOB), 1000) as stream:
            body = b"".join([c async for c in stream.chunks()])
        async with client.open_blob("busybox", sha(BLOB)) as whole:
            assert whole.start == 0
    assert (stream.start, stream.total) == (0, len(BLOB))
    assert body == BLOB
    assert "range" not in rec.requests[1].headers


async def test_206_with_wrong_content_range_is_an_error() -> None:
    client, _ = make_client("reg.example.com", lambda r: httpx.Response(
        206, content=b"x", headers={"Content-Range": "bytes 0-0/2048"}))
    async with client:
        with pytest.raises(RegistryError, match="Content-Range"):
            async with client.open_blob("busybox", sha(BLOB), 5):
                pass


async def test_get_blob_verifies_size_and_digest() -> None:
    client, _ = make_client("reg.example.com", lambda r: httpx.Response(200, content=BLOB))
    async with client:
        assert await client.get_blob("busybox", sha(BLOB), len(BLOB), 1 << 20) == BLOB
        with pytest.raises(DigestMismatch):
            await client.get_blob("busybox", sha(b"other"), len(BLOB), 1 << 20)
        with pytest.raises(SizeMismatch):
            await client.get_blob("busybox", sha(BLOB), len(BLOB) - 1, 1 << 20)
        with pytest.raises(TooLarge):
            await client.get_blob("busybox", sha(BLOB), len(BLOB), 100)


async def test_blob_stream_error_midway_is_unavailable() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"abc"
        raise httpx.ReadError("connection reset")

    client, _ = make_client("reg.example.com", lambda r: httpx.Response(200, content=broken()))
    async with client:
        async with client.open_blob("busybox", sha(BLOB)) as stream:
            with pytest.raises(RegistryUnavailable, match="connection reset"):
                async for _ in stream.chunks():
                    pass


def test_repr_has_no_secret() -> None:
    client = RegistryClient("reg.example.com", config(), CREDS)
    assert CREDS.password not in repr(client)
