"""The role table and the agent's TCP/TLS configuration rules (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.api import authz
from agent.config import load_config
from agent.errors import InvalidArgument
from skiff.v1 import containers_pb2, images_pb2, system_pb2


def _methods() -> list[str]:
    out = []
    for module in (containers_pb2, images_pb2, system_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return out


def test_every_rpc_is_classified() -> None:
    for method in _methods():
        assert authz.allowed("admin", method), f"{method} is refused even to admins: classify it in authz"


@pytest.mark.parametrize("method", ["/skiff.v1.Containers/List", "/skiff.v1.Containers/Logs",
                                    "/skiff.v1.Images/Inspect", "/skiff.v1.System/Info"])
def test_viewer_reads(method: str) -> None:
    assert authz.allowed("viewer", method)


@pytest.mark.parametrize("method", ["/skiff.v1.Containers/Create", "/skiff.v1.Containers/Exec",
                                    "/skiff.v1.Containers/Attach", "/skiff.v1.Images/Pull",
                                    "/skiff.v1.Containers/Remove", "/skiff.v1.Registries/Login"])
def test_viewer_may_not_act(method: str) -> None:
    assert not authz.allowed("viewer", method)
    assert authz.allowed("admin", method)


def test_unknown_methods_and_roles_are_denied() -> None:
    assert not authz.allowed("admin", "/skiff.v1.Containers/Brand_New")
    assert not authz.allowed("", "/skiff.v1.System/Version")
    assert not authz.allowed("root", "/skiff.v1.System/Version")


class _Ctx:
    def __init__(self, peer: str, auth: dict[str, list[bytes]]) -> None:
        self._peer, self._auth = peer, auth

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_unix_peers_are_admins_and_tls_peers_need_a_role() -> None:
    authz.check("/skiff.v1.Containers/Create", _Ctx("unix:/run/skiff/skiffd.sock", {}))
    no_role = _Ctx("ipv4:127.0.0.1:5000", {"transport_security_type": [b"ssl"], "x509_common_name": [b"x"]})
    with pytest.raises(authz.PermissionDenied, match="no skiff role"):
        authz.check("/skiff.v1.System/Version", no_role)


def test_tcp_needs_mutual_tls_or_an_explicit_opt_in(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="without mutual TLS"):
        load_config(None, {"hosts": ["tcp://127.0.0.1:2376"]})
    with pytest.raises(InvalidArgument, match="needs --tlscacert"):
        load_config(None, {"hosts": ["tcp://127.0.0.1:2376"], "tlsverify": True})
    with pytest.raises(InvalidArgument, match="not found"):
        load_config(None, {"hosts": ["tcp://127.0.0.1:2376"], "tlsverify": True, "tlscacert": str(tmp_path / "a"),
                           "tlscert": str(tmp_path / "b"), "tlskey": str(tmp_path / "c")})
    with pytest.raises(InvalidArgument, match="use unix:///path or tcp://HOST:PORT"):
        load_config(None, {"hosts": ["tcp://nohost"], "allow_insecure_tcp": True})
    config = load_config(None, {"hosts": ["tcp://127.0.0.1:2376"], "allow_insecure_tcp": True})
    assert config.allow_insecure_tcp
