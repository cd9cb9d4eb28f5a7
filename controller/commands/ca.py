"""``skiff ca``: the fleet's CA, agent certificates and client certificates (:mod:`controller.ca`).

:mod:`controller.ca` imports ``cryptography`` only inside its functions, so listing
``skiff --help`` or loading this group costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import click

from controller import ca as pki

_DIR_HELP = "The CA directory [$SKIFF_CA_DIR, default ~/.skiff/ca]."


def _dir_option(fn: click.decorators.FC) -> click.decorators.FC:
    return click.option("--dir", "ca_dir", type=click.Path(file_okay=False, path_type=Path), envvar="SKIFF_CA_DIR",
                        show_envvar=False, metavar="DIR", help=_DIR_HELP)(fn)


def _shown(path: Path) -> str:
    return f"{path.absolute()}/"


@click.group()
def ca() -> None:
    """Manage the fleet's certificate authority."""


@ca.command()
@_dir_option
@click.option("--force", is_flag=True, help="Replace an existing CA (agents stop trusting what it issued).")
@click.option("--days", type=int, default=3650, show_default=True, help="Validity of the CA certificate.")
def init(ca_dir: Path | None, force: bool, days: int) -> None:
    """Create the fleet CA (ca.pem, and ca-key.pem with mode 0600)."""
    root = pki.init_ca(ca_dir or pki.default_dir(), days=days, force=force)
    click.echo(f"fleet CA: {_shown(root)}")


@ca.command("agent-cert")
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...")
@_dir_option
@click.option("--san", "sans", multiple=True, metavar="NAME",
              help="Another DNS name or IP address the agents are reached by (repeatable).")
@click.option("--days", type=int, default=825, show_default=True, help="Validity of each certificate.")
def agent_cert(hosts: tuple[str, ...], ca_dir: Path | None, sans: tuple[str, ...], days: int) -> None:
    """Issue a server certificate for each agent HOST.

    HOST is a DNS name or an IP address; the files go to agents/HOST/, for skiffd's
    --tlscacert/--tlscert/--tlskey."""
    root = ca_dir or pki.default_dir()
    for host in hosts:  # refuse a bad name before writing anything
        pki.check_host(host)
    for name in sans:
        pki.check_host(name)
    for host in hosts:
        click.echo(f"agent cert for {host}: {_shown(pki.issue_agent_cert(root, host, extra_names=sans, days=days))}")


@ca.command("client-cert")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(pki.ROLES),
              help="admin: run, exec, pull, remove and everything a viewer may; viewer: list, inspect, logs, info.")
@_dir_option
@click.option("--days", type=int, default=825, show_default=True, help="Validity of the certificate.")
def client_cert(name: str, role: str, ca_dir: Path | None, days: int) -> None:
    """Issue a client certificate with a role.

    The files go to clients/NAME/, usable as $SKIFF_CERT_PATH."""
    path = pki.issue_client_cert(ca_dir or pki.default_dir(), name, role=role, days=days)
    click.echo(f"client cert for {name} ({role}): {_shown(path)}")


@ca.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@_dir_option
def show(path: Path | None, ca_dir: Path | None) -> None:
    """List the CA and the certificates it issued.

    With PATH, describe the certificate there instead (a file, or a directory holding cert.pem);
    a CA directory lists the whole CA."""
    target = path or ca_dir or pki.default_dir()
    if path is None or target.is_dir() and not (target / pki.CERT).is_file():  # a CA's own directory
        infos = pki.list_certs(target)
    else:
        infos = [pki.describe(target)]
    rows = [("KIND", "NAME", "ROLE", "NAMES", "NOT AFTER", "SERIAL")]
    for info in infos:
        not_after = info.not_after.strftime("%Y-%m-%d %H:%M:%SZ") + (" (expired)" if info.expired else "")
        rows.append((info.kind, info.common_name or info.subject or "-", info.role or "-",
                     ",".join(info.sans) or "-", not_after, f"{info.serial:x}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("   ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "   " + row[-1])
