"""Unit tests for agent.images.auth: credentials, the store, challenge parsing."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.errors import Internal, InvalidArgument, RegistryAuthError
from agent.images.auth import (
    Challenge,
    Credentials,
    CredentialStore,
    HostPolicy,
    normalize_host,
    parse_token_response,
    split_hostport,
    token_request_url,
    parse_www_authenticate,
)

SECRET = "pa:ss w0rd!"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credentials_repr_hides_password() -> None:
    creds = Credentials("alice", SECRET)
    assert SECRET not in repr(creds)
    assert SECRET not in str(creds)
    assert "alice" in repr(creds)
    assert SECRET not in repr(CredentialStore(Path("/nonexistent/config.json")))


def test_round_trip_docker_layout_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "auth.json"
    store = CredentialStore(path)
    assert store.get("reg.example.com:5000") is None
    assert store.hosts() == []
    store.set("reg.example.com:5000", Credentials("alice", SECRET))
    assert store.get("reg.example.com:5000") == Credentials("alice", SECRET)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    doc = json.loads(path.read_text())
    encoded = doc["auths"]["reg.example.com:5000"]["auth"]
    assert base64.b64decode(encoded).decode() == f"alice:{SECRET}"
    assert CredentialStore(path).get("reg.example.com:5000") == Credentials("alice", SECRET)


def test_mode_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        CredentialStore(tmp_path / "auth.json").set("h", Credentials("u", "p"))
    finally:
        os.umask(old)
    assert mode(tmp_path / "auth.json") == 0o600


def test_write_is_atomic_and_never_world_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "auth.json"
    store = CredentialStore(path)
    store.set("one.example", Credentials("u1", "p1"))
    before = path.read_bytes()
    seen: list[tuple[int, bytes]] = []
    real_replace = os.replace

    def checking_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        # At rename time the new file is complete and private, in the same directory.
        assert Path(src).parent == tmp_path
        seen.append((mode(Path(src)), Path(src).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    store.set("two.example", Credentials("u2", "p2"))
    assert seen and seen[0][0] == 0o600
    assert json.loads(seen[0][1])["auths"].keys() == {"one.example", "two.example"}

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError(28, "No space left on device")

    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(Internal) as info:
        store.set("three.example", Credentials("u3", "p3-secret"))
    assert str(path) in str(info.value) and "p3-secret" not in str(info.value)
    assert path.read_bytes() == before  # old file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auth.json"]  # no temp file left


@pytest.mark.parametrize(
    "alias",
    ["docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/",
     "Docker.IO", "https://registry-1.docker.io"],
)
def test_docker_hub_aliases(tmp_path: Path, alias: str) -> None:
    store = CredentialStore(tmp_path / "auth.json")
    store.set(alias, Credentials("hubuser", SECRET))
    assert store.hosts() == ["docker.io"]
    for other in ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/"):
        assert store.get(other) == Credentials("hubuser", SECRET)
    assert store.remove("index.docker.io") is True
    assert store.hosts() == []


def test_normalize_other_hosts() -> None:
    assert normalize_host("Reg.Example.COM:5000") == "reg.example.com:5000"
    assert normalize_host("https://reg.example.com:5000/v2/") == "reg.example.com:5000"
    assert normalize_host("[::1]:5000") == "[::1]:5000"
    with pytest.raises(InvalidArgument):
        normalize_host("  ")
    with pytest.raises(InvalidArgument):
        normalize_host("user@host")


def test_remove_and_hosts(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "auth.json")
    assert store.remove("nothing.example") is False
    store.set("b.example", Credentials("u", "p"))
    store.set("a.example:443", Credentials("u", "p"))
    store.set("b.example", Credentials("u2", "p2"))
    assert store.hosts() == ["a.example:443", "b.example"]
    assert store.get("b.example") == Credentials("u2", "p2")
    assert store.remove("B.EXAMPLE") is True
    assert store.remove("b.example") is False
    assert store.hosts() == ["a.example:443"]


def test_reads_docker_config_variants_and_keeps_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "auths": {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:tok:with:colons").decode()},
            "plain.example": {"username": "pu", "password": "pp"},
            "broken.example": {"auth": "!!!not base64"},
        },
        "credsStore": "desktop",
    }))
    store = CredentialStore(path)
    assert store.get("docker.io") == Credentials("hub", "tok:with:colons")
    assert store.get("plain.example") == Credentials("pu", "pp")
    assert store.get("broken.example") is None
    assert "broken.example" not in store.hosts()
    store.set("new.example", Credentials("n", "m"))
    assert json.loads(path.read_text())["credsStore"] == "desktop"


def test_corrupt_file_raises_internal_without_content(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text('{"auths": {"x": {"auth": "c2VjcmV0"}')  # truncated
    with pytest.raises(Internal) as info:
        CredentialStore(path).get("x")
    assert str(path) in str(info.value)
    assert "c2VjcmV0" not in str(info.value)


def test_username_with_colon_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        CredentialStore(tmp_path / "a.json").set("h", Credentials("a:b", SECRET))
    assert SECRET not in str(info.value)


def test_concurrent_sets_from_threads(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "auth.json")
    threads = [threading.Thread(target=store.set, args=(f"h{i}.example", Credentials("u", f"p{i}")))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.hosts()) == 20


# --- WWW-Authenticate -----------------------------------------------------------


def test_parse_bearer_with_commas_in_quoted_values() -> None:
    header = ('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
              'scope="repository:samalba/my-app:pull,push",error="insufficient_scope"')
    assert parse_www_authenticate(header) == [Challenge("bearer", {
        "realm": "https://auth.example.com/token",
        "service": "registry.example.com",
        "scope": "repository:samalba/my-app:pull,push",
        "error": "insufficient_scope",
    })]


def test_parse_basic_multiple_challenges_and_escapes() -> None:
    got = parse_www_authenticate(['Basic realm="Registry \\"Realm\\", v2"',
                                  'BEARER Realm=https://a.example/t , Service = svc'])
    assert got == [
        Challenge("basic", {"realm": 'Registry "Realm", v2'}),
        Challenge("bearer", {"realm": "https://a.example/t", "service": "svc"}),
    ]
    assert parse_www_authenticate('Basic realm="a", Bearer realm="b"') == [
        Challenge("basic", {"realm": "a"}), Challenge("bearer", {"realm": "b"})]


@pytest.mark.parametrize("junk", ["", ",,,", '"', "Bearer realm=\"unterminated", "= = ="])
def test_parse_junk_never_raises(junk: str) -> None:
    parse_www_authenticate(junk)


# --- token flow helpers -----------------------------------------------------------


def test_token_request_url() -> None:
    challenge = Challenge("bearer", {"realm": "https://auth.example/token?a=1", "service": "svc"})
    url = token_request_url(challenge, "repository:a:pull repository:b:pull", "reg")
    assert url.params.get_list("scope") == ["repository:a:pull", "repository:b:pull"]
    assert (url.params["service"], url.params["a"]) == ("svc", "1")
    assert "scope" not in token_request_url(challenge, "", "reg").params
    for realm in ("", "ftp://x/t", "/relative"):
        with pytest.raises(RegistryAuthError):
            token_request_url(Challenge("bearer", {"realm": realm}), "", "reg")


def test_parse_token_response() -> None:
    assert parse_token_response(b'{"token": "t", "expires_in": 300}', "a") == ("t", 300.0)
    assert parse_token_response(b'{"access_token": "t"}', "a") == ("t", 60.0)
    assert parse_token_response(b'{"token": "t", "expires_in": 5}', "a") == ("t", 60.0)
    for bad in (b"not json", b"[]", b'{"token": ""}', b'{"token": 5}'):
        with pytest.raises(RegistryAuthError):
            parse_token_response(bad, "a")


# --- host policy --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.1.2.3:5000", (True, True)),  # CIDR: plain HTTP allowed and TLS unverified
        ("reg.internal:5000", (True, True)),  # exact host:port
        ("REG.internal:5000", (True, True)),
        ("reg.internal:5001", (False, False)),
        ("localhost:5000", (True, False)),  # loopback: HTTP fallback, TLS still verified
        ("127.0.0.1", (True, False)),
        ("[::1]:5000", (True, False)),
        ("registry.example.com", (False, False)),  # resolves (stub) outside the CIDR
        ("reg.corp:5000", (True, True)),  # resolves (stub) inside the CIDR
        ("nxdomain.example", (False, False)),  # does not resolve
    ],
)
async def test_host_policy(host: str, expected: tuple[bool, bool]) -> None:
    policy = HostPolicy(["10.0.0.0/8", "reg.internal:5000", "not-a-cidr/99"])
    answers = {"reg.corp": [ipaddress.ip_address("10.9.9.9")],
               "registry.example.com": [ipaddress.ip_address("93.184.216.34")],
               "nxdomain.example": [], "reg.internal": [ipaddress.ip_address("192.0.2.1")]}

    async def fake_resolve(name: str) -> list[Any]:  # no DNS in unit tests
        return answers[name]

    policy.resolve = fake_resolve  # type: ignore[method-assign,assignment]
    assert await policy.classify(host) == expected


def test_split_hostport() -> None:
    assert split_hostport("[::1]:5000") == ("::1", 5000)
    assert split_hostport("reg") == ("reg", None)
    assert split_hostport("reg:443") == ("reg", 443)
    with pytest.raises(InvalidArgument):
        split_hostport("reg:port")
