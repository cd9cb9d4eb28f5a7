"""The SSH transport: gRPC to an agent's unix socket through one SSH connection per host.

Nothing listens on TCP on the far host: the controller opens a listener on an
abstract unix socket of its own (no file to clean up, gone with the process),
and asyncssh forwards each connection gRPC makes to it over the SSH connection
to the agent's socket there (OpenSSH's ``direct-streamlocal``, what ``ssh -L
local.sock:/run/skiff/skiffd.sock`` does).

Host keys are checked against known_hosts (``~/.ssh/known_hosts`` unless
given); an unknown host is refused, and a changed key is always refused.
``accept_new`` is the one opt-in, with OpenSSH's ``StrictHostKeyChecking
accept-new`` meaning: a host with no key on file is trusted on first use and
its key appended.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.errors import ConnectionFailed
from controller.targets import SSHAddress, Target

if TYPE_CHECKING:
    import asyncssh

_names = itertools.count()


class HostKeyRefused(ConnectionFailed):
    """The host's key is unknown or does not match known_hosts: never retried."""

    retryable = False


class SSHAuthFailed(ConnectionFailed):
    """The SSH server refused every key offered: never retried."""

    retryable = False


class NoAgent(ConnectionFailed):
    """SSH works but nothing listens on the agent's socket there."""


@dataclass(frozen=True)
class SSHOptions:
    #: known_hosts file; None: ~/.ssh/known_hosts
    known_hosts: Path | None = None
    #: trust a host with no key on file and record its key (OpenSSH's accept-new)
    accept_new: bool = False
    connect_timeout: float = 5.0
    #: the key for ssh:// hosts whose inventory entry names none (ansible's --private-key)
    identity: str | None = None
    #: install and start skiffd where none answers (``--bootstrap``; :func:`controller.bootstrap.ensure_agent`)
    bootstrap: bool = False

    def known_hosts_path(self) -> Path:
        return self.known_hosts or Path.home() / ".ssh" / "known_hosts"


def known_hosts_name(address: SSHAddress) -> str:
    """How OpenSSH names a host in known_hosts: ``host``, or ``[host]:port`` off port 22."""
    return address.host if address.port == 22 else f"[{address.host}]:{address.port}"


_parsed: dict[Path, tuple[float, int, Any]] = {}


def _known_hosts(path: Path) -> Any:
    """known_hosts parsed once per process (asyncssh re-reads a path for every connection), again
    only when the file changed (``--ssh-accept-new`` appends to it)."""
    import asyncssh

    try:
        st = path.stat()
        cached = _parsed.get(path)
        if cached is not None and cached[:2] == (st.st_mtime, st.st_size):
            return cached[2]
        known = asyncssh.import_known_hosts(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise HostKeyRefused(f"cannot read known_hosts {path}: {exc}") from None
    _parsed[path] = (st.st_mtime, st.st_size, known)
    return known


def _is_known(path: Path, address: SSHAddress) -> bool:
    """Whether known_hosts holds any key (or CA) for this host, matching or not."""
    known = _known_hosts(path)
    if known is None:
        return False
    host_keys, ca_keys, *_ = known.match(address.host, "", address.port)
    return bool(host_keys or ca_keys)


def _record_key(path: Path, address: SSHAddress, key: asyncssh.SSHKey) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = f"{known_hosts_name(address)} {key.export_public_key('openssh').decode().strip()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)


async def ssh_connect(target: Target, opts: SSHOptions) -> asyncssh.SSHClientConnection:
    """One verified SSH connection to the target's host (errors: :class:`ConnectionFailed`)."""
    import asyncssh

    address = target.ssh_address()
    where = f"{address.user + '@' if address.user else ''}{address.host}:{address.port}"
    known_hosts = opts.known_hosts_path()
    accepting = opts.accept_new and not _is_known(known_hosts, address)
    trusted = None if accepting else _known_hosts(known_hosts)
    if trusted is None and not accepting:
        trusted = ([], [], [])  # no file: nothing is trusted
    kwargs: dict[str, Any] = dict(port=address.port, known_hosts=trusted,
                                  config=[], connect_timeout=opts.connect_timeout, login_timeout=opts.connect_timeout)
    if address.user:
        kwargs["username"] = address.user
    identity = target.ssh_key or opts.identity
    if identity:
        kwargs["client_keys"] = [os.path.expanduser(identity)]
        kwargs["agent_path"] = None
    try:
        conn = await asyncssh.connect(address.host, **kwargs)
    except asyncssh.HostKeyNotVerifiable as exc:
        known = _is_known(known_hosts, address)
        why = "does not match the key on file (changed host key?)" if known else "is unknown"
        hint = "" if known else " (add it to known_hosts, e.g. ssh-keyscan, or pass --ssh-accept-new)"
        raise HostKeyRefused(f"SSH host key of {where} {why} in {known_hosts}{hint}: {exc.reason}") from None
    except asyncssh.PermissionDenied as exc:
        raise SSHAuthFailed(f"SSH login to {where} refused: {exc.reason}") from None
    except (asyncssh.DisconnectError, asyncssh.ChannelOpenError) as exc:
        raise ConnectionFailed(f"SSH to {where} failed: {exc.reason}") from None
    except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or "timed out")
        raise ConnectionFailed(f"cannot reach {where} over SSH: {reason}") from None
    except ValueError as exc:  # a key file that cannot be read or parsed
        raise SSHAuthFailed(f"SSH to {where}: {exc}") from None
    if accepting:
        key = conn.get_server_host_key()
        if key is not None:
            _record_key(known_hosts, address, key)
    return conn


async def _probe(conn: asyncssh.SSHClientConnection, target: Target, when: str = "") -> None:
    import asyncssh

    try:
        _, writer = await conn.open_unix_connection(target.agent_socket)
        writer.close()
    except asyncssh.ChannelOpenError as exc:
        hint = "" if when else ": is skiffd running there? (`skiff bootstrap` or --bootstrap installs it)"
        raise NoAgent(f"no skiff agent answers at {target.agent_socket} on {target.label}{when} "
                      f"({exc.reason}){hint}") from None


@asynccontextmanager
async def tunnel(target: Target, opts: SSHOptions) -> AsyncIterator[str]:
    """A gRPC target (``unix-abstract:…``) that reaches ``target.agent_socket`` on the far host."""
    conn = await ssh_connect(target, opts)
    try:
        try:  # the agent's socket, probed once: a clear error now rather than a channel that never connects
            await _probe(conn, target)
        except NoAgent:
            if not opts.bootstrap:
                raise
            from controller.bootstrap import ensure_agent

            await ensure_agent(conn, target)
            await _probe(conn, target, " after `skiff bootstrap`")
        name = f"skiff-ssh-{os.getpid()}-{next(_names)}"
        try:
            listener = await conn.forward_local_path("\0" + name, target.agent_socket)
        except OSError as exc:
            raise ConnectionFailed(f"cannot open a local forward for {target.label}: {exc}") from None
        try:
            yield f"unix-abstract:{name}"
        finally:
            listener.close()
    finally:
        conn.close()
