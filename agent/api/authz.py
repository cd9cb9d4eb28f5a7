"""Who may call what: one table, denying by default.

Peers on the local unix socket are trusted as ``admin`` (the socket's mode
and group are the gate, as with dockerd's socket).  Peers over TCP present a
client certificate from the fleet CA (``skiff ca client-cert NAME --role``);
its subject's OU is the role.  A ``viewer`` may list, inspect, read logs and
info; an ``admin`` may also run, exec, pull and remove.  A method in neither
list is refused to everyone, so a new RPC is closed until it is classified.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from agent.errors import PermissionDenied

ROLES = ("viewer", "admin")

#: what a viewer may call (service/method)
VIEWER: frozenset[str] = frozenset({
    "skiff.v1.System/Version", "skiff.v1.System/Info",
    "skiff.v1.Images/List", "skiff.v1.Images/Inspect", "skiff.v1.Images/History",
    "skiff.v1.Containers/List", "skiff.v1.Containers/Inspect", "skiff.v1.Containers/Logs",
    "skiff.v1.Containers/Top", "skiff.v1.Containers/Wait",
    "grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch",
})

#: what only an admin may call
ADMIN: frozenset[str] = frozenset({
    "skiff.v1.Images/Pull", "skiff.v1.Images/Tag", "skiff.v1.Images/Remove", "skiff.v1.Images/Prune",
    "skiff.v1.Images/Save", "skiff.v1.Images/Load",
    "skiff.v1.Registries/Login", "skiff.v1.Registries/Logout",
    "skiff.v1.Containers/Create", "skiff.v1.Containers/Start", "skiff.v1.Containers/Stop",
    "skiff.v1.Containers/Restart", "skiff.v1.Containers/Kill", "skiff.v1.Containers/Remove",
    "skiff.v1.Containers/Rename", "skiff.v1.Containers/Prune", "skiff.v1.Containers/Attach",
    "skiff.v1.Containers/Exec",
})


def allowed(role: str, method: str) -> bool:
    """Whether ``role`` may call ``method`` (``/package.Service/Method``)."""
    name = method.lstrip("/")
    if role == "admin":
        return name in VIEWER or name in ADMIN
    if role == "viewer":
        return name in VIEWER
    return False


@lru_cache(maxsize=256)
def role_of(pem: bytes) -> str | None:
    """The role a client certificate carries: its subject's OU, when it is one of ours."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    return next((str(u) for u in units if u in ROLES), None)


def peer_role(context: Any) -> tuple[str, str]:
    """(role, who) of the caller: ``admin`` on the unix socket or on a TCP listener the operator
    opened without TLS; from the client certificate on a TLS one."""
    peer = str(context.peer() or "")
    auth = context.auth_context() or {}
    if peer.startswith("unix:") or not auth.get("transport_security_type"):
        return "admin", peer or "local"
    pems = auth.get("x509_pem_cert") or []
    names = auth.get("x509_common_name") or []
    who = (names[0].decode(errors="replace") if names else "") or peer
    role = role_of(bytes(pems[0])) if pems else None
    return (role or ""), who


def check(method: str, context: Any) -> None:
    """Raise :class:`PermissionDenied` unless the caller's role allows ``method``."""
    role, who = peer_role(context)
    if not allowed(role, method):
        what = method.lstrip("/").replace("skiff.v1.", "")
        if not role:
            raise PermissionDenied(f"{who}: the client certificate carries no skiff role; {what} is refused")
        raise PermissionDenied(f"{who} ({role}) may not call {what}")
