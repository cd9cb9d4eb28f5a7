"""``skiff version`` and ``skiff info``."""

from __future__ import annotations

import platform
from typing import Any

import click

from controller import __version__
from controller.cli import Context, pass_ctx, run, run_each, template_text
from controller.client import Agent
from controller.render import human_size
from skiff.v1 import system_pb2


@click.command()
@click.option("-f", "--format", "fmt", help="Format the output using the given Go template.")
@pass_ctx
def version(ctx: Context, fmt: str | None) -> None:
    """Show the skiff version information."""
    client = {"Version": __version__, "ApiVersion": "v1", "PythonVersion": platform.python_version(),
              "Os": "linux", "Arch": platform.machine()}

    async def fetch(agent: Agent) -> Any:
        return await agent.system.Version(system_pb2.VersionRequest(), timeout=10)

    if ctx.many:  # each agent's version
        run_each(ctx, fetch, lambda resp: (_version_text(fmt, client, _server(resp)), ""))
    server: dict[str, Any] | None = None
    error: Exception | None = None
    try:
        server = _server(run(ctx, fetch))
    except Exception as exc:  # still print the client half, like docker
        error = exc
    click.echo(_version_text(fmt, client, server), nl=False)
    if error is not None:
        raise error


def _server(resp: Any) -> dict[str, Any]:
    return {"Version": resp.version, "ApiVersion": resp.api_version, "PythonVersion": resp.python_version,
            "GrpcVersion": resp.grpc_version, "Os": resp.os, "Arch": resp.arch, "KernelVersion": resp.kernel_version}


def _version_text(fmt: str | None, client: dict[str, Any], server: dict[str, Any] | None) -> str:
    if fmt:
        return template_text(fmt, [{"Client": client, "Server": server}])
    lines = ["Client:", *(f" {key + ':':<16}{client[key]}" for key in ("Version", "ApiVersion", "PythonVersion",
                                                                       "Os", "Arch"))]
    if server:
        lines += ["", "Server:", *(f" {key + ':':<16}{server[key]}" for key in (
            "Version", "ApiVersion", "PythonVersion", "GrpcVersion", "KernelVersion", "Os", "Arch"))]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("-f", "--format", "fmt", help="Format the output using the given Go template.")
@pass_ctx
def info(ctx: Context, fmt: str | None) -> None:
    """Display system-wide information."""

    async def fetch(agent: Agent) -> system_pb2.InfoResponse:
        return await agent.system.Info(system_pb2.InfoRequest(), timeout=10)

    if ctx.many:  # each agent's answer, prefixed with its host
        run_each(ctx, fetch, lambda resp: (_info_text(resp, fmt), ""))
    click.echo(_info_text(run(ctx, fetch), fmt), nl=False)


def _info_text(resp: system_pb2.InfoResponse, fmt: str | None) -> str:
    if fmt:
        from google.protobuf.json_format import MessageToDict

        doc = MessageToDict(resp, preserving_proto_field_name=False, always_print_fields_with_no_presence=True)
        return template_text(fmt, [{k[0].upper() + k[1:]: v for k, v in doc.items()}])
    lines = [
        "Server:",
        f" Containers: {resp.containers}",
        f"  Running: {resp.containers_running}",
        f"  Paused: {resp.containers_paused}",
        f"  Stopped: {resp.containers_stopped}",
        f" Images: {resp.images}",
        f" Server Version: {resp.server_version}",
        f" Storage Driver: {resp.storage_driver}",
        f" Cgroup Driver: {resp.cgroup_driver}",
        f" Cgroup Version: {resp.cgroup_version} ({resp.cgroup_mode})",
        f" Runtimes: {' '.join(resp.runtimes)}",
        f" Default Runtime: {resp.default_runtime}",
        f" Live Restore Enabled: {str(resp.live_restore_enabled).lower()}",
        f" Kernel Version: {resp.kernel_version}",
        f" Operating System: {resp.operating_system}",
        f" OSType: {resp.os_type}",
        f" Architecture: {resp.architecture}",
        f" CPUs: {resp.ncpu}",
        f" Total Memory: {human_size(resp.mem_total)}",
        f" Name: {resp.name}",
        f" ID: {resp.id}",
        f" Skiff Root Dir: {resp.data_root}",
        f" Exec Root Dir: {resp.exec_root}",
        " Insecure Registries:",
        *[f"  {r}" for r in resp.insecure_registries],
        f" Max Concurrent Downloads: {resp.max_concurrent_downloads}",
    ]
    return "\n".join(lines) + "\n"


