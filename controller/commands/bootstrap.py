"""``skiff bootstrap``: install skiffd on ssh:// hosts, configure and start it (:mod:`controller.bootstrap`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from controller.cli import Context, finish_many, pass_ctx


@click.command()
@click.option("--tls", is_flag=True,
              help="Also listen on tcp://0.0.0.0:2376 with mutual TLS, with a certificate from the fleet CA "
                   "for the host's address (see `skiff ca`).")
@click.option("--config", "config", multiple=True, metavar="KEY=VALUE",
              help="Another /etc/skiff/daemon.toml key, repeatable (e.g. insecure-registries=10.0.0.5:5000, "
                   "cgroup-parent=/skiff); list keys take a,b or the key again.")
@click.option("--wheels", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="Install from these wheels (skiff's and its dependencies') instead of building them from "
                   "this checkout.")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), envvar="SKIFF_CA_DIR", show_envvar=False,
              metavar="DIR", help="The fleet CA for --tls [$SKIFF_CA_DIR, default ~/.skiff/ca].")
@click.option("--health-timeout", type=click.FloatRange(1), default=60.0, show_default=True, metavar="SECONDS",
              help="How long skiffd may take to answer after it is started.")
@click.option("--host-timeout", type=click.FloatRange(1), default=900.0, show_default=True, metavar="SECONDS",
              help="How long one host's whole bootstrap may take (replaces --timeout here).")
@pass_ctx
def bootstrap(ctx: Context, tls: bool, config: tuple[str, ...], wheels: Path | None, ca_dir: Path | None,
              health_timeout: float, host_timeout: float) -> None:
    """Install skiffd on ssh:// hosts and start it; the hosts need no internet.

    The skiff wheel and its dependencies' wheels are built once on this machine (cached under
    ~/.cache/skiff/wheels) and copied to each host's /opt/skiff/wheels; skiffd goes into the
    venv /opt/skiff/venv, its configuration into /etc/skiff/daemon.toml, and it runs as the
    systemd unit skiffd.service, or where systemd does not run, detached with the pidfile
    /run/skiff/skiffd.pid and its log in /var/log/skiff/skiffd.log.  Only what differs is
    changed: each host ends "changed" or "ok", and a second run changes nothing.

    The hosts need python3 (3.11 or later) with python3-venv, and root over SSH.
    """
    from controller import ca as pki
    from controller.bootstrap import (BootstrapOptions, bootstrap_hosts, cached_wheels, parse_config_args,
                                      read_wheels, summary_line)
    from controller.fanout import OK
    from controller.ssh import SSHOptions

    extra = parse_config_args(config)
    if tls:
        root = ca_dir or pki.default_dir()
        for name in (pki.CA_CERT, pki.CA_KEY):
            if not (root / name).is_file():
                raise pki.CANotFoundError(f"--tls needs the fleet CA: {root / name} is missing "
                                          "(run `skiff ca init`, or pass --ca-dir)")
    targets = ctx.targets
    prepared = read_wheels(wheels) if wheels else cached_wheels(announce=lambda text: click.echo(text, err=True))
    options = BootstrapOptions(wheels=prepared, tls=tls, ca_dir=ca_dir, config=extra, health_timeout=health_timeout)
    results = asyncio.run(bootstrap_hosts(targets, options, ctx.ssh or SSHOptions(), ctx.limits, host_timeout))
    if not ctx.json:
        for result in results:
            if result.status == OK:
                click.echo(summary_line(result))
    finish_many(ctx, results)
