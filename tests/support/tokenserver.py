"""A small Docker registry token issuer for tests (plain HTTP on loopback).

Implements the Docker token flow (distribution ``auth: token``):

* ``GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]`` with
  optional HTTP Basic credentials;
* ``POST /token`` with an OAuth2 ``grant_type=password`` form.

Tokens are RS256 JWTs whose header carries ``x5c`` = [signing cert]; the
signing cert is issued by a private CA written to ``root_cert_path``, which
the registry loads as ``rootcertbundle`` (distribution verifies the x5c chain
against it, any extended key usage).

Policy: anonymous callers get ``pull`` on repositories under
``public_prefix``; authenticated users get ``user_actions`` on every
repository.  Every request is recorded in ``requests`` so tests can check
whether credentials were sent.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

DEFAULT_SERVICE = "skiff-test-registry"
DEFAULT_ISSUER = "skiff-test-token-issuer"
DEFAULT_USERS: Mapping[str, str] = {"skiff": "skiff-token-password"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        # "<type>:<name>:<actions>"; the name itself may contain ':' (host:port/repo)
        head, sep, actions = text.rpartition(":")
        if not sep:
            return None
        type_, sep, name = head.partition(":")
        if not sep or not type_ or not name:
            return None
        return cls(type_, name, tuple(a for a in actions.split(",") if a))


@dataclass
class TokenRequest:
    """One request the token server saw."""

    method: str
    path: str
    query: dict[str, list[str]]
    auth_sent: bool
    username: str | None          # who authenticated (None: anonymous or rejected)
    status: int = 0
    scopes: list[str] = field(default_factory=list)
    granted: list[dict[str, Any]] = field(default_factory=list)


class QuietHTTPServer(ThreadingHTTPServer):
    """Threaded, daemon handler threads, no tracebacks for dropped clients."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class TokenServer:
    """Threaded token issuer on 127.0.0.1:<free port>; use as a context manager."""

    def __init__(self, users: Mapping[str, str] | None = None, *,
                 service: str = DEFAULT_SERVICE, issuer: str = DEFAULT_ISSUER,
                 public_prefix: str = "public/",
                 user_actions: Sequence[str] = ("pull", "push", "delete"),
                 expires_in: int = 300, workdir: str | os.PathLike[str] | None = None) -> None:
        self.users: dict[str, str] = dict(DEFAULT_USERS if users is None else users)
        self.service = service
        self.issuer = issuer
        self.public_prefix = public_prefix
        self.user_actions = tuple(user_actions)
        self.expires_in = expires_in
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="skiff-test-tokens-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._make_keys()

    # -- keys ----------------------------------------------------------------
    def _make_keys(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("skiff test token CA")).issuer_name(_name("skiff test token CA"))
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("skiff test token signer")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        self.signing_key = key
        self.signing_cert = cert
        self.root_cert_path = self.workdir / "token-root.pem"
        self.root_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]

    # -- tokens --------------------------------------------------------------
    def sign(self, claims: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
        """Sign arbitrary claims (tests may craft odd tokens with this)."""
        hdr = dict(header) if header is not None else {
            "typ": "JWT", "alg": "RS256", "x5c": list(self._x5c)}
        signing_input = (b64url(json.dumps(hdr, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(dict(claims), separators=(",", ":")).encode()))
        sig = self.signing_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(sig)

    def issue(self, subject: str, access: Sequence[Mapping[str, Any]],
              expires_in: int | None = None) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service,
            "exp": now + (self.expires_in if expires_in is None else expires_in),
            "nbf": now - 1, "iat": now, "jti": uuid.uuid4().hex,
            "access": [dict(a) for a in access],
        }
        return self.sign(claims)

    @staticmethod
    def decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(header, claims) of a token, unverified."""
        h, c, _ = token.split(".")
        return json.loads(b64url_decode(h)), json.loads(b64url_decode(c))

    def grant(self, username: str | None, scopes: Sequence[Scope]) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for s in scopes:
            if s.type != "repository":
                continue
            if username is not None:
                allowed = set(self.user_actions)
                if "*" in s.actions:
                    actions = sorted(allowed)
                else:
                    actions = [a for a in s.actions if a in allowed]
            elif s.name.startswith(self.public_prefix):
                actions = [a for a in s.actions if a == "pull"]
            else:
                actions = []
            if actions:
                access.append({"type": s.type, "name": s.name, "actions": actions})
        return access

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)

    @property
    def creds(self) -> tuple[str, str]:
        """(username, password) of the first configured user."""
        user = next(iter(self.users))
        return user, self.users[user]

    # -- server --------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def start(self) -> TokenServer:
        if self._server is not None:
            return self
        self._server = QuietHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"token-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _make_handler(ts: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "skiff-test-token-server"
        timeout = 30

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return None

        def _json(self, status: int, obj: Mapping[str, Any],
                  extra: Mapping[str, str] | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _basic(self) -> tuple[bool, str | None, bool]:
            """(auth_sent, username if valid, valid)"""
            header = self.headers.get("Authorization")
            if header is None:
                return False, None, True
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                return True, None, False
            try:
                user, _, pw = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return True, None, False
            if ts.users.get(user) == pw:
                return True, user, True
            return True, None, False

        def _issue(self, rec: TokenRequest, username: str | None, service: str,
                   scope_texts: list[str], oauth: bool) -> None:
            if service and service != ts.service:
                rec.status = 400
                self._json(400, {"errors": [{"code": "DENIED",
                                             "message": f"unknown service {service!r}"}]})
                return
            scopes = [s for t in scope_texts for part in t.split() if (s := Scope.parse(part))]
            rec.scopes = [p for t in scope_texts for p in t.split()]
            rec.granted = ts.grant(username, scopes)
            token = ts.issue(username or "", rec.granted)
            rec.status = 200
            issued = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            body: dict[str, Any] = {"token": token, "access_token": token,
                                    "expires_in": ts.expires_in, "issued_at": issued}
            if oauth:
                body["scope"] = " ".join(rec.scopes)
            self._json(200, body)

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            auth_sent, username, valid = self._basic()
            rec = TokenRequest("GET", parts.path, query, auth_sent, username)
            ts._record(rec)
            if parts.path != "/token":
                rec.status = 404
                self._json(404, {"errors": [{"code": "NOT_FOUND", "message": parts.path}]})
                return
            if not valid:
                rec.status = 401
                self._json(401, {"errors": [{"code": "UNAUTHORIZED",
                                             "message": "invalid credentials"}]},
                           {"WWW-Authenticate": 'Basic realm="skiff-test-token"'})
                return
            self._issue(rec, username, query.get("service", [""])[0], query.get("scope", []),
                        oauth=False)

        def do_POST(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode(errors="replace"),
                            keep_blank_values=True)
            auth_sent, username, valid = self._basic()
            rec = TokenRequest("POST", parts.path, form, auth_sent or "password" in form,
                               username)
            ts._record(rec)
            if parts.path != "/token":
                rec.status = 404
                self._json(404, {"errors": [{"code": "NOT_FOUND", "message": parts.path}]})
                return
            grant = form.get("grant_type", [""])[0]
            if grant != "password":
                rec.status = 400
                self._json(400, {"error": "unsupported_grant_type"})
                return
            user = form.get("username", [""])[0]
            if ts.users.get(user) != form.get("password", [None])[0] or not valid:
                rec.status = 401
                self._json(401, {"error": "invalid_grant"})
                return
            rec.username = user
            self._issue(rec, user, form.get("service", [""])[0], form.get("scope", []),
                        oauth=True)

    return Handler
