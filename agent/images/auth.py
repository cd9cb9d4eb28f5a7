"""Registry credentials and the agent's credential store.

The store is one JSON file in the layout of docker's ``config.json``::

    {"auths": {"docker.io": {"auth": "<base64 of user:password>"}}}

It is owned by the agent, written atomically (a temporary file in the same
directory, created mode 0600, fsynced, renamed over the old file, directory
fsynced) and never world-readable, not even for an instant.

Host keys are normalised with :func:`normalize_host`, so every spelling of
Docker Hub (``docker.io``, ``index.docker.io``, ``registry-1.docker.io``,
``https://index.docker.io/v1/``) is one entry, ``docker.io``.

Nothing here logs or formats a password or an encoded ``auth`` value. A store
file that cannot be read, parsed or written raises :class:`agent.errors.Internal`
naming the path.

Also here, for :mod:`agent.images.registry`, the rest of "whom do we trust
with what": :func:`parse_www_authenticate` (``Bearer realm="…",service="…",
scope="…"`` / ``Basic realm="…"``), the token request and answer of the Docker
token flow, and :class:`HostPolicy`, Docker's rule for which hosts may be
reached over plain HTTP or without TLS verification.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import os
import re
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

import httpx

from agent.errors import Internal, InvalidArgument, RegistryAuthError

__all__ = [
    "DOCKER_HUB",
    "Challenge",
    "Credentials",
    "CredentialStore",
    "HostPolicy",
    "basic_authorization",
    "normalize_host",
    "parse_token_response",
    "parse_www_authenticate",
    "split_hostport",
    "token_request_url",
]

#: The canonical key for Docker Hub.
DOCKER_HUB = "docker.io"

_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_MIN_TOKEN_LIFETIME = 60.0  # docker's floor for expires_in
_FILE_MODE = 0o600
_DIR_MODE = 0o700


@dataclass(frozen=True)
class Credentials:
    """A registry username and password (or token). ``repr`` never shows the password."""

    username: str
    password: str = field(repr=False)

    def __str__(self) -> str:
        return repr(self)


def normalize_host(host: str) -> str:
    """Return the store key for a registry host.

    Strips a URL scheme and path (``https://index.docker.io/v1/``), lower-cases,
    and maps every Docker Hub alias to ``docker.io``. Other hosts keep their
    ``host[:port]`` form.
    """
    value = host.strip()
    lowered = value.lower()
    for prefix in ("https://", "http://"):
        if lowered.startswith(prefix):
            value = value[len(prefix):]
            break
    value = value.split("/", 1)[0].lower()
    if not value or any(ch.isspace() for ch in value) or "@" in value:
        raise InvalidArgument(f"invalid registry host {host!r}")
    if value in _DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return value


def basic_authorization(creds: Credentials) -> str:
    """The ``Authorization`` header value for HTTP Basic with ``creds``."""
    return f"Basic {_encode(creds)}"


def _encode(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return base64.b64encode(raw).decode("ascii")


def _decode(entry: Any) -> Credentials | None:
    """Decode one ``auths`` entry; ``None`` if it holds no usable credentials."""
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            text = base64.b64decode(auth.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        username, sep, password = text.partition(":")
        if not sep or not username:
            return None
        return Credentials(username, password)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and user:
        return Credentials(user, secret)
    return None


class CredentialStore:
    """Registry credentials in one JSON file owned by the agent.

    Methods are synchronous and do small file I/O; callers on the event loop
    should run them in a thread (``asyncio.to_thread``). They are safe to call
    from several threads of one process.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"CredentialStore(path={str(self._path)!r})"

    # --- public API -------------------------------------------------------

    def get(self, host: str) -> Credentials | None:
        """The credentials stored for ``host`` (any alias), or ``None``."""
        key = normalize_host(host)
        with self._lock:
            auths = self._auths(self._load())
        # The canonical key wins over an alias spelling (docker writes the v1 URL).
        for name in sorted(_keys_for(auths, key), key=lambda name: name != key):
            creds = _decode(auths[name])
            if creds is not None:
                return creds
        return None

    def set(self, host: str, creds: Credentials) -> None:
        """Store ``creds`` for ``host``, replacing any previous entry (and its aliases)."""
        key = normalize_host(host)
        if not creds.username or ":" in creds.username:
            raise InvalidArgument(
                f"invalid username {creds.username!r} for {key}: must be non-empty without ':'"
            )
        with self._lock:
            doc = self._load()
            auths = self._auths(doc, create=True)
            for name in _keys_for(auths, key):
                del auths[name]
            auths[key] = {"auth": _encode(creds)}
            self._write(doc)

    def remove(self, host: str) -> bool:
        """Forget ``host`` (every alias spelling); ``True`` if there was an entry."""
        key = normalize_host(host)
        with self._lock:
            doc = self._load()
            auths = self._auths(doc)
            names = _keys_for(auths, key)
            if not names:
                return False
            for name in names:
                del auths[name]
            self._write(doc)
            return True

    def hosts(self) -> list[str]:
        """The normalised hosts with usable stored credentials, sorted."""
        with self._lock:
            auths = self._auths(self._load())
        found = set()
        for name, entry in auths.items():
            key = _try_normalize(name)
            if key is not None and _decode(entry) is not None:
                found.add(key)
        return sorted(found)

    # --- file handling ----------------------------------------------------

    @staticmethod
    def _auths(doc: dict[str, Any], *, create: bool = False) -> dict[str, Any]:
        auths = doc.get("auths")
        if isinstance(auths, dict):
            return auths
        auths = {}
        if create:
            doc["auths"] = auths
        return auths

    def _load(self) -> dict[str, Any]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise Internal(
                f"cannot read credential store {self._path}: {exc.strerror or exc}"
            ) from exc
        if not raw.strip():
            return {}
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            # The message names the file and position only, never its content.
            raise Internal(
                f"credential store {self._path} is not valid JSON"
            ) from exc
        if not isinstance(doc, dict):
            raise Internal(f"credential store {self._path} is not a JSON object")
        return doc

    def _write(self, doc: dict[str, Any]) -> None:
        """Atomically replace the file with ``doc`` (mode 0600 from creation on)."""
        directory = self._path.parent
        try:
            directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise Internal(
                f"cannot create directory {directory} for the credential store: "
                f"{exc.strerror or exc}"
            ) from exc
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        tmp_name: str | None = None
        try:
            # mkstemp creates the file O_EXCL with mode 0600: never readable by others.
            fd, tmp_name = tempfile.mkstemp(
                dir=directory, prefix=f".{self._path.name}.", suffix=".tmp"
            )
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), _FILE_MODE)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, self._path)
            tmp_name = None
            _fsync_dir(directory)
        except OSError as exc:
            raise Internal(
                f"cannot write credential store {self._path}: {exc.strerror or exc}"
            ) from exc
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass


def _try_normalize(name: str) -> str | None:
    try:
        return normalize_host(name)
    except InvalidArgument:
        return None


def _keys_for(auths: dict[str, Any], key: str) -> list[str]:
    """The names in ``auths`` (as written in the file) that normalise to ``key``."""
    return [name for name in auths if _try_normalize(name) == key]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- WWW-Authenticate ---------------------------------------------------------

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BLANK = " \t"


@dataclass(frozen=True)
class Challenge:
    """One parsed authentication challenge: a lower-cased scheme and its parameters."""

    scheme: str
    params: dict[str, str]


def parse_www_authenticate(values: str | Iterable[str]) -> list[Challenge]:
    """Parse one or more ``WWW-Authenticate`` header values (RFC 7235).

    Handles several challenges in one value (``Basic realm="a", Bearer realm="b"``),
    quoted values with commas and escaped quotes inside, unquoted token values,
    and any letter case of scheme and parameter names. Malformed input yields
    what could be parsed, never an exception.
    """
    if isinstance(values, str):
        values = [values]
    challenges: list[Challenge] = []
    for value in values:
        challenges.extend(_parse_challenges(value))
    return challenges


def _parse_challenges(text: str) -> list[Challenge]:
    out: list[Challenge] = []
    current: Challenge | None = None
    i, n = 0, len(text)
    while i < n:
        while i < n and (text[i] in _BLANK or text[i] == ","):
            i += 1
        if i >= n:
            break
        match = _TOKEN_RE.match(text, i)
        if match is None:
            i += 1  # stray character: skip it
            continue
        name, j = match.group(), match.end()
        k = j
        while k < n and text[k] in _BLANK:
            k += 1
        if current is not None and k < n and text[k] == "=":
            k += 1
            while k < n and text[k] in _BLANK:
                k += 1
            value, i = _parse_value(text, k)
            current.params.setdefault(name.lower(), value)
        else:
            current = Challenge(name.lower(), {})
            out.append(current)
            i = j
    return out


def _parse_value(text: str, i: int) -> tuple[str, int]:
    """A quoted-string (with backslash escapes) or a bare token starting at ``i``."""
    n = len(text)
    if i < n and text[i] == '"':
        chars: list[str] = []
        i += 1
        while i < n:
            ch = text[i]
            if ch == "\\" and i + 1 < n:
                chars.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                return "".join(chars), i + 1
            chars.append(ch)
            i += 1
        return "".join(chars), n  # unterminated: take the rest
    start = i
    while i < n and text[i] != "," and text[i] not in _BLANK:
        i += 1
    return text[start:i], i


# --- the Docker token flow ----------------------------------------------------


def token_request_url(challenge: Challenge, scope: str, registry: str) -> httpx.URL:
    """The token server URL for a ``Bearer`` challenge: its realm plus ``service`` and ``scope``.

    ``scope`` may hold several space-separated scopes (one ``scope`` parameter each).
    The caller still decides whether a plain-HTTP realm is acceptable.
    """
    realm = challenge.params.get("realm", "")
    try:
        url = httpx.URL(realm)
    except httpx.InvalidURL as exc:
        raise RegistryAuthError(f"registry {registry} named an invalid token realm") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise RegistryAuthError(f"registry {registry} named an invalid token realm {realm[:200]!r}")
    params: list[tuple[str, str | int | float | bool | None]] = []
    if challenge.params.get("service"):
        params.append(("service", challenge.params["service"]))
    params.extend(("scope", item) for item in scope.split())
    return url.copy_merge_params(params)


def parse_token_response(body: bytes, token_host: str) -> tuple[str, float]:
    """``(token, lifetime in seconds)`` from a token server's JSON answer.

    Accepts ``token`` or ``access_token``; ``expires_in`` defaults to, and is
    raised to at least, 60 s (as docker does).
    """
    try:
        doc = json.loads(body)
        value = doc.get("token") or doc.get("access_token")
        expires_in = float(doc.get("expires_in") or _MIN_TOKEN_LIFETIME)
    except (ValueError, TypeError, AttributeError) as exc:
        raise RegistryAuthError(f"token server {token_host} sent an unreadable answer") from exc
    if not isinstance(value, str) or not value:
        raise RegistryAuthError(f"token server {token_host} sent no token")
    return value, max(expires_in, _MIN_TOKEN_LIFETIME)


# --- which hosts may be reached insecurely ------------------------------------

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def split_hostport(netloc: str) -> tuple[str, int | None]:
    """``("::1", 5000)`` for ``[::1]:5000``, ``("reg", None)`` for ``reg``."""
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if netloc.count(":") == 1:
        host, _, port = netloc.partition(":")
        if port.isdigit():
            return host, int(port)
        raise InvalidArgument(f"invalid registry host {netloc!r}")
    return netloc, None


def _ip(host: str) -> _IP | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class HostPolicy:
    """Docker's rule for plain HTTP and unverified TLS.

    A host may be reached over plain HTTP (after HTTPS failed) if it is listed in
    ``insecure_registries`` (exact ``host:port``, or an address within a listed
    CIDR; names are resolved for that) or is loopback (``localhost``,
    127.0.0.0/8, ::1). TLS verification is skipped only for listed hosts.
    """

    def __init__(self, insecure_registries: Sequence[str], resolve_timeout: float = 10.0) -> None:
        entries = [e.strip().lower() for e in insecure_registries if e.strip()]
        self._exact = {e for e in entries if "/" not in e}
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            if "/" in entry:
                try:
                    self._nets.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    pass
        self._timeout = resolve_timeout
        self._cache: dict[str, tuple[bool, bool]] = {}

    async def classify(self, netloc: str) -> tuple[bool, bool]:
        """``(http_allowed, skip_tls_verify)`` for ``host[:port]``."""
        key = netloc.lower()
        if key in self._cache:
            return self._cache[key]
        host, _ = split_hostport(key)
        ip = _ip(host)
        loopback = host == "localhost" or (ip is not None and ip.is_loopback)
        insecure = key in self._exact
        if not insecure and self._nets:
            if ip is not None:
                addresses: list[_IP] = [ip]
            elif host == "localhost":
                addresses = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
            else:
                addresses = await self.resolve(host)
            insecure = any(a in n for a in addresses for n in self._nets if a.version == n.version)
        self._cache[key] = result = (insecure or loopback, insecure)
        return result

    async def resolve(self, host: str) -> list[_IP]:
        """The addresses of ``host`` (empty if it does not resolve in time)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), self._timeout
            )
        except (OSError, asyncio.TimeoutError):
            return []
        found = [_ip(str(info[4][0]).split("%", 1)[0]) for info in infos]
        return [a for a in found if a is not None]
