"""``skiff``: the controller CLI, speaking docker's command language.

Commands are imported only when invoked (``skiff run`` does not pay for the
image commands' imports): every ``skiff`` invocation is a fresh process, and
start-up is most of a short command's wall time.
"""

from __future__ import annotations

import importlib
import os
import sys

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from controller import __version__
from controller.errors import AgentError, ControllerError

if TYPE_CHECKING:
    from controller.targets import Target

#: command name -> "module:attribute", in the order ``--help`` lists them
TOP_LEVEL: dict[str, str] = {
    "run": "run:run", "create": "run:create", "start": "run:start", "stop": "containers:stop",
    "restart": "containers:restart", "kill": "containers:kill", "rm": "containers:rm", "wait": "containers:wait",
    "ps": "containers:ps", "logs": "containers:logs", "rename": "containers:rename", "top": "containers:top",
    "attach": "run:attach", "exec": "run:exec_", "pull": "images:pull", "images": "images:images",
    "inspect": "images:inspect", "history": "images:history", "tag": "images:tag", "rmi": "images:rmi",
    "save": "images:save", "load": "images:load", "login": "images:login", "logout": "images:logout",
    "version": "system:version", "info": "system:info", "ca": "ca:ca",
    "bootstrap": "bootstrap:bootstrap",
}
CONTAINER: dict[str, str] = {
    "run": "run:run", "create": "run:create", "start": "run:start", "stop": "containers:stop",
    "restart": "containers:restart", "kill": "containers:kill", "rm": "containers:rm", "remove": "containers:rm",
    "wait": "containers:wait", "ls": "containers:ps", "list": "containers:ps", "ps": "containers:ps",
    "logs": "containers:logs", "rename": "containers:rename", "attach": "run:attach", "exec": "run:exec_",
    "top": "containers:top", "prune": "containers:prune", "inspect": "images:container_inspect",
}
IMAGE: dict[str, str] = {
    "pull": "images:pull", "ls": "images:images", "list": "images:images", "inspect": "images:image_inspect",
    "history": "images:history", "tag": "images:tag", "rm": "images:rmi", "prune": "images:prune",
    "save": "images:save", "load": "images:load",
}


class DockerGroup(click.Group):
    """A group of lazily imported commands, listed in definition order; errors become one
    line and docker's exit code."""

    def __init__(self, *args: object, lazy: dict[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands) + [name for name in self.lazy if name not in self.commands]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return self.commands.get(cmd_name)
        module, _, attr = self.lazy[cmd_name].partition(":")
        command = getattr(importlib.import_module(f"controller.commands.{module}"), attr)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AgentError as exc:
            click.echo(f"Error response from agent: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ControllerError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=DockerGroup, lazy=TOP_LEVEL,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-H", "--host", "hosts", multiple=True, metavar="URL",
              help="Agent to talk to, repeatable: unix:///path, tcp://HOST:PORT (mutual TLS) or "
                   "ssh://[USER@]HOST[:PORT]; default $SKIFF_HOST or unix:///run/skiff/skiffd.sock.")
@click.option("-i", "--inventory", "inventories", multiple=True, metavar="PATH",
              help="Ansible inventory (INI, YAML, directory or script), repeatable [$SKIFF_INVENTORY].")
@click.option("--on", "pattern", metavar="PATTERN",
              help="Ansible host pattern in the inventory: web, web:&prod, all:!db1, web[0:2], web* [all].")
@click.option("--tlscacert", metavar="PATH", help="Trust certs signed only by this CA [$SKIFF_CERT_PATH/ca.pem].")
@click.option("--tlscert", metavar="PATH", help="Client certificate for tcp:// hosts [$SKIFF_CERT_PATH/cert.pem].")
@click.option("--tlskey", metavar="PATH", help="Client key for tcp:// hosts [$SKIFF_CERT_PATH/key.pem].")
@click.option("--tlsverify", is_flag=True, help="Verify the agent (always on for tcp:// hosts).")
@click.option("--known-hosts", metavar="PATH", help="SSH known_hosts file for ssh:// hosts [~/.ssh/known_hosts].")
@click.option("--ssh-key", metavar="PATH",
              help="SSH private key for ssh:// hosts without ansible_ssh_private_key_file [ssh's defaults].")
@click.option("--ssh-accept-new", is_flag=True,
              help="Trust ssh:// hosts with no key on file and record their keys (changed keys are still refused).")
@click.option("--bootstrap", "bootstrap", is_flag=True,
              help="On ssh:// hosts where no skiffd answers, install and start it first (as `skiff bootstrap`).")
@click.option("--forks", type=click.IntRange(1, 10000), default=50, show_default=True,
              help="Hosts talked to at once.")
@click.option("--connect-timeout", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds to reach each host before it counts as UNREACHABLE.")
@click.option("--timeout", type=click.FloatRange(0.1), default=60.0, show_default=True,
              help="Seconds for each host's answer before it counts as TIMEOUT.")
@click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True,
              help="Further attempts on a host whose connection failed or dropped (with jittered backoff).")
@click.option("--serial", metavar="N|N%", help="Rolling: hosts in batches of N (or N% of them).")
@click.option("--max-fail-percentage", type=click.FloatRange(0, 100), metavar="P",
              help="Rolling: stop before the next batch when more than P% of a batch did not end OK.")
@click.option("--format", "output", type=click.Choice(["json"]), metavar="json",
              help="Print every host's result as JSON (for scripts) instead of the summary.")
@click.option("--retry-file", metavar="PATH", help="Write the hosts that did not end OK as an inventory for -i.")
@click.version_option(__version__, "-v", "--version", prog_name="skiff")
@click.pass_context
def cli(ctx: click.Context, hosts: tuple[str, ...], inventories: tuple[str, ...], pattern: str | None,
        tlscacert: str | None, tlscert: str | None, tlskey: str | None, tlsverify: bool, known_hosts: str | None,
        ssh_key: str | None, ssh_accept_new: bool, bootstrap: bool, forks: int, connect_timeout: float, timeout: float, retries: int,
        serial: str | None, max_fail_percentage: float | None, output: str | None, retry_file: str | None) -> None:
    """skiff: Docker for a fleet. Commands mirror docker's.

    With several hosts (-H repeated, or -i INVENTORY --on PATTERN) a command runs on every host at
    once: tables gain a HOST column, other output is prefixed with the host, and a summary goes to
    stderr. Each host ends OK, FAILED, UNREACHABLE or TIMEOUT (or SKIPPED by --serial's failure
    budget); the exit code is 0 when every host is OK, else the OR of 2 (FAILED), 4 (UNREACHABLE),
    8 (TIMEOUT) and 16 (SKIPPED).
    """
    from pathlib import Path

    from controller.cli import Context
    from controller.client import TLSFiles
    from controller.fanout import Limits
    from controller.ssh import SSHOptions

    if pattern is not None and not inventories and not os.environ.get("SKIFF_INVENTORY"):
        raise click.UsageError("--on needs an inventory: -i PATH or $SKIFF_INVENTORY")
    if max_fail_percentage is not None and not serial:
        raise click.UsageError("--max-fail-percentage applies to rolling runs: give --serial too")
    resolve = _targets_resolver(list(hosts), list(inventories), pattern)
    limits = Limits(forks, connect_timeout, timeout, None, max_fail_percentage, retries)
    ctx.obj = Context(resolve, tls=TLSFiles.default(tlscacert, tlscert, tlskey), limits=limits,
                      ssh=SSHOptions(Path(known_hosts) if known_hosts else None, ssh_accept_new, connect_timeout,
                                     ssh_key, bootstrap),
                      json=output == "json", retry_file=retry_file)
    if serial:
        from dataclasses import replace

        from controller.fanout import parse_serial

        ctx.obj.limits = replace(limits, serial=parse_serial(serial, len(ctx.obj.targets)))


def _targets_resolver(hosts: list[str], inventories: list[str], pattern: str | None
                      ) -> Callable[[], list[Target]]:
    """-H hosts, then the inventory's hosts matching the pattern; $SKIFF_INVENTORY only without -H;
    the local agent when neither is given."""

    def resolve() -> list[Target]:
        from controller.client import default_host
        from controller.targets import Target

        targets = [Target(h) for h in hosts]
        sources = inventories
        if not sources and not hosts and os.environ.get("SKIFF_INVENTORY"):
            from controller.inventory import default_sources

            sources = default_sources()
        if sources:
            from controller.inventory import load_targets

            targets += load_targets(sources, pattern or "all")
        return targets or [Target(default_host())]

    return resolve


@cli.group("container", cls=DockerGroup, lazy=CONTAINER)
def container_group() -> None:
    """Manage containers."""


@cli.group("image", cls=DockerGroup, lazy=IMAGE)
def image_group() -> None:
    """Manage images."""


def main() -> None:
    """Run the CLI, then leave without the interpreter's teardown: grpc's shutdown at exit costs
    a short command a third of its wall time, and there is nothing left to clean up."""
    try:
        cli(prog_name="skiff")
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            sys.stderr.write(exc.code + "\n")
            code = 1
        else:
            code = int(exc.code or 0)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        code = code or 1  # stdout was a closed pipe
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)
