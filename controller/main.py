"""``skiff``: the controller CLI, speaking docker's command language."""

from __future__ import annotations

import sys

import click

from controller import __version__
from controller.cli import Context
from controller.client import default_host
from controller.commands import containers as ctr
from controller.commands import images as img
from controller.commands import run as runcmd
from controller.commands import system
from controller.errors import AgentError, ControllerError


class DockerGroup(click.Group):
    """A group that lists commands in definition order and maps errors to one line + exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AgentError as exc:
            click.echo(f"Error response from agent: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ControllerError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=DockerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-H", "--host", "hosts", multiple=True, metavar="URL",
              help="Agent to talk to (unix:///path); default $SKIFF_HOST or unix:///run/skiff/skiffd.sock.")
@click.version_option(__version__, "-v", "--version", prog_name="skiff")
@click.pass_context
def cli(ctx: click.Context, hosts: tuple[str, ...]) -> None:
    """skiff: Docker for a fleet. Commands mirror docker's."""
    ctx.obj = Context(hosts=list(hosts) or [default_host()])


@cli.group("image", cls=DockerGroup)
def image_group() -> None:
    """Manage images."""


@cli.group("container", cls=DockerGroup)
def container_group() -> None:
    """Manage containers."""


for command in (runcmd.run, runcmd.create, runcmd.start, ctr.stop, ctr.restart, ctr.kill, ctr.rm, ctr.wait,
                ctr.ps, ctr.logs, ctr.rename, runcmd.attach, runcmd.exec_, img.pull, img.images, img.inspect, img.history,
                img.tag, img.rmi, img.save, img.load, img.login, img.logout, system.version, system.info):
    cli.add_command(command)

for name, command in (("run", runcmd.run), ("create", runcmd.create), ("start", runcmd.start),
                      ("stop", ctr.stop), ("restart", ctr.restart), ("kill", ctr.kill), ("rm", ctr.rm),
                      ("remove", ctr.rm), ("wait", ctr.wait), ("ls", ctr.ps), ("list", ctr.ps), ("ps", ctr.ps),
                      ("logs", ctr.logs), ("rename", ctr.rename), ("attach", runcmd.attach), ("exec", runcmd.exec_),
                      ("prune", ctr.prune)):
    container_group.add_command(command, name)


@container_group.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Format output using a custom template.")
@click.option("-s", "--size", is_flag=True, help="Display total file sizes.")
@click.pass_obj
def container_inspect(ctx: Context, names: tuple[str, ...], fmt: str | None, size: bool) -> None:
    """Display detailed information on one or more containers."""
    img.inspect_objects(ctx, names, fmt, size, "container")


for name, command in (("pull", img.pull), ("ls", img.images), ("list", img.images), ("inspect", img.image_inspect),
                      ("history", img.history), ("tag", img.tag), ("rm", img.rmi), ("prune", img.prune),
                      ("save", img.save), ("load", img.load)):
    image_group.add_command(command, name)


def main() -> None:
    cli(prog_name="skiff")
