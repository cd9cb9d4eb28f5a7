"""``skiffd``: the agent's command line (flags named as dockerd's)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from agent import __version__
from agent.config import DEFAULT_CONFIG_FILE, load_config
from agent.errors import SkiffError
from agent.log import configure


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config-file", type=click.Path(path_type=Path), default=DEFAULT_CONFIG_FILE,
              show_default=True, help="Daemon configuration file (TOML; flags override it).")
@click.option("--data-root", type=click.Path(path_type=Path), help="Root of persistent state [/var/lib/skiff].")
@click.option("--exec-root", type=click.Path(path_type=Path), help="Root of runtime state [/run/skiff].")
@click.option("-H", "--host", "hosts", multiple=True,
              help="Socket to listen on, repeatable [unix://<exec-root>/skiffd.sock].")
@click.option("-G", "--group", help="Group owning the unix socket [skiff].")
@click.option("--insecure-registry", "insecure_registries", multiple=True,
              help="Registry (host:port or CIDR) that may be reached over plain HTTP.")
@click.option("--cgroup-parent", help="Parent cgroup of every container's cgroup [/skiff].")
@click.option("--tlsverify", is_flag=True, default=None, help="Require a client certificate from --tlscacert on tcp:// "
              "listeners (mutual TLS).")
@click.option("--tlscacert", type=click.Path(path_type=Path), help="The fleet CA (skiff ca init).")
@click.option("--tlscert", type=click.Path(path_type=Path), help="This agent's certificate (skiff ca agent-cert).")
@click.option("--tlskey", type=click.Path(path_type=Path), help="This agent's private key.")
@click.option("--allow-insecure-tcp", is_flag=True, default=None,
              help="Serve tcp:// without TLS. Anyone who reaches the port is root here: never on a network.")
@click.option("--max-concurrent-downloads", type=int, help="Parallel layer downloads per pull [3].")
@click.option("-l", "--log-level", type=click.Choice(["debug", "info", "warn", "error"]), help="[info]")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), help="[auto]")
@click.version_option(__version__, "-v", "--version", prog_name="skiffd")
def cli(config_file: Path, data_root: Path | None, exec_root: Path | None, hosts: tuple[str, ...],
        group: str | None, insecure_registries: tuple[str, ...], cgroup_parent: str | None,
        tlsverify: bool | None, tlscacert: Path | None, tlscert: Path | None, tlskey: Path | None,
        allow_insecure_tcp: bool | None,
        max_concurrent_downloads: int | None,
        log_level: str | None, log_format: str | None) -> None:
    """skiffd: the skiff agent, a container runtime served over gRPC."""
    try:
        config = load_config(config_file, {
            "data_root": str(data_root) if data_root else None,
            "exec_root": str(exec_root) if exec_root else None,
            "hosts": hosts, "group": group, "insecure_registries": insecure_registries,
            "max_concurrent_downloads": max_concurrent_downloads, "cgroup_parent": cgroup_parent,
            "tlsverify": tlsverify, "tlscacert": str(tlscacert) if tlscacert else None,
            "tlscert": str(tlscert) if tlscert else None, "tlskey": str(tlskey) if tlskey else None,
            "allow_insecure_tcp": allow_insecure_tcp,
            "log_level": "warning" if log_level == "warn" else log_level, "log_format": log_format,
        })
        configure(config.log_level, config.log_format)
        from agent.server import serve

        asyncio.run(serve(config))
    except SkiffError as exc:
        click.echo(f"skiffd: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def main() -> None:
    cli()
