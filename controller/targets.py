"""Where a command goes: one agent, named by a URL, with how to reach it.

``-H`` URLs become targets as they are; an Ansible inventory (``-i``/``--on``)
becomes targets through :mod:`controller.inventory`.  The URL says the
transport:

* ``unix:///path``           the agent's socket on this machine
* ``tcp://HOST:PORT``         gRPC with mutual TLS
* ``ssh://[USER@]HOST[:PORT][/SOCKET]`` gRPC through an SSH connection to the
  agent's unix socket on that host (``/run/skiff/skiffd.sock`` unless a path
  is given), nothing listening on TCP there
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from controller.errors import UsageError

#: the agent's socket on a host reached over SSH (skiffd's default listener)
REMOTE_SOCKET = "/run/skiff/skiffd.sock"
#: skiffd's TLS port when an inventory does not give ``skiff_port`` (dockerd's 2376)
DEFAULT_TLS_PORT = 2376


@dataclass(frozen=True)
class SSHAddress:
    host: str
    port: int = 22
    user: str | None = None
    #: the agent's socket there, when the URL names one
    socket: str | None = None


@dataclass(frozen=True)
class Target:
    url: str
    #: the inventory's name for the host; output labels use it (the URL when empty)
    name: str = ""
    #: ``ansible_ssh_private_key_file``: the key for ssh:// targets (else ssh's defaults)
    ssh_key: str | None = None
    #: the agent's socket on the far side of an ssh:// target
    socket: str = REMOTE_SOCKET

    @property
    def label(self) -> str:
        return self.name or self.url

    @property
    def is_ssh(self) -> bool:
        return self.url.startswith("ssh://")

    def ssh_address(self) -> SSHAddress:
        return parse_ssh_url(self.url)

    @property
    def agent_socket(self) -> str:
        """The agent's socket on the far side of an ssh:// target: the URL's path, else ``socket``."""
        return self.ssh_address().socket or self.socket


def parse_ssh_url(url: str) -> SSHAddress:
    """``ssh://[user@]host[:port][/socket/path]`` (IPv6 hosts in brackets)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid host {url!r}: {exc}") from None
    if parts.scheme != "ssh" or not parts.hostname or parts.query or parts.fragment or parts.password:
        raise UsageError(f"invalid host {url!r}: use ssh://[USER@]HOST[:PORT][/SOCKET]")
    socket = parts.path if parts.path not in ("", "/") else None
    return SSHAddress(parts.hostname, port or 22, parts.username or None, socket)


def as_targets(hosts: list[str] | tuple[str, ...]) -> list[Target]:
    return [Target(h) for h in hosts]
