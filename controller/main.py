"""``skiff``: the controller CLI, speaking docker's command language.

Commands are imported only when invoked (``skiff run`` does not pay for the
image commands' imports): every ``skiff`` invocation is a fresh process, and
start-up is most of a short command's wall time.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from controller import __version__
from controller.errors import AgentError, ControllerError

#: command name -> "module:attribute", in the order ``--help`` lists them
TOP_LEVEL: dict[str, str] = {
    "run": "run:run", "create": "run:create", "start": "run:start", "stop": "containers:stop",
    "restart": "containers:restart", "kill": "containers:kill", "rm": "containers:rm", "wait": "containers:wait",
    "ps": "containers:ps", "logs": "containers:logs", "rename": "containers:rename", "top": "containers:top",
    "attach": "run:attach", "exec": "run:exec_", "pull": "images:pull", "images": "images:images",
    "inspect": "images:inspect", "history": "images:history", "tag": "images:tag", "rmi": "images:rmi",
    "save": "images:save", "load": "images:load", "login": "images:login", "logout": "images:logout",
    "version": "system:version", "info": "system:info", "ca": "ca:ca",
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
              help="Agent to talk to (unix:///path, tcp://HOST:PORT with mutual TLS); default $SKIFF_HOST "
                   "or unix:///run/skiff/skiffd.sock.")
@click.option("--tlscacert", metavar="PATH", help="Trust certs signed only by this CA [$SKIFF_CERT_PATH/ca.pem].")
@click.option("--tlscert", metavar="PATH", help="Client certificate for tcp:// hosts [$SKIFF_CERT_PATH/cert.pem].")
@click.option("--tlskey", metavar="PATH", help="Client key for tcp:// hosts [$SKIFF_CERT_PATH/key.pem].")
@click.option("--tlsverify", is_flag=True, help="Verify the agent (always on for tcp:// hosts).")
@click.option("--forks", type=click.IntRange(1, 10000), default=50, show_default=True,
              help="Hosts talked to at once when several -H are given.")
@click.option("--connect-timeout", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds to reach each host before it counts as UNREACHABLE.")
@click.option("--timeout", type=click.FloatRange(0.1), default=60.0, show_default=True,
              help="Seconds for each host's answer before it counts as TIMEOUT.")
@click.version_option(__version__, "-v", "--version", prog_name="skiff")
@click.pass_context
def cli(ctx: click.Context, hosts: tuple[str, ...], tlscacert: str | None, tlscert: str | None,
        tlskey: str | None, tlsverify: bool, forks: int, connect_timeout: float, timeout: float) -> None:
    """skiff: Docker for a fleet. Commands mirror docker's.

    Several -H run ps and images on every host at once (a HOST column, a summary on stderr); the
    exit code is 0 when every host is OK, else the OR of 2 (FAILED), 4 (UNREACHABLE), 8 (TIMEOUT).
    """
    from controller.cli import Context
    from controller.client import TLSFiles, default_host
    from controller.fanout import Limits

    ctx.obj = Context(hosts=list(hosts) or [default_host()], tls=TLSFiles.default(tlscacert, tlscert, tlskey),
                      limits=Limits(forks, connect_timeout, timeout))


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
