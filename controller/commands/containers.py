"""Container commands: ps, logs, stop, kill, restart, rm, wait, rename, prune."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from controller.cli import Context, finish_many, pass_ctx, print_table, run, run_each, run_many
from controller.client import Agent
from controller.commands.images import confirm, rpc_details
from controller.errors import AgentError, CancelledError, UsageError
from controller.render import human_duration, human_size
from skiff.v1 import containers_pb2 as pb


def status_text(c: pb.ContainerSummary, now_ns: int | None = None) -> str:
    """docker's STATUS column."""
    now = now_ns or time.time_ns()
    if c.state == "running":
        return "Up " + human_duration((now - (c.started_ns or now)) / 1e9)
    if c.state == "exited":
        if not c.finished_ns:
            return "Exited"
        return f"Exited ({c.exit_code}) {human_duration((now - c.finished_ns) / 1e9)} ago"
    if c.state == "created":
        return "Created"
    return c.state.capitalize()


def _command(c: pb.ContainerSummary, no_trunc: bool) -> str:
    text = c.command
    if not no_trunc and len(text) > 20:
        text = text[:19] + "…"
    return json.dumps(text, ensure_ascii=False)


def container_rows(containers: list[pb.ContainerSummary], no_trunc: bool) -> list[dict[str, Any]]:
    now = time.time_ns()
    rows = []
    for c in containers:
        created_s = c.created_ns / 1e9
        rows.append({
            "ID": c.id if no_trunc else c.id[:12], "Image": c.image, "Command": _command(c, no_trunc),
            "CreatedAt": time.strftime("%Y-%m-%d %H:%M:%S %z %Z", time.localtime(created_s)),
            "RunningFor": human_duration((now - c.created_ns) / 1e9) + " ago", "Ports": "",
            "State": c.state, "Status": status_text(c, now),
            "Size": f"{human_size(c.size_rw)} (virtual {human_size(c.size_root_fs)})" if c.size_root_fs else "0B",
            "Names": ",".join(n.lstrip("/") for n in c.names),
            "Labels": ",".join(f"{k}={v}" for k, v in sorted(c.labels.items())), "Mounts": "",
            "Networks": c.networks, "LabelsMap": dict(c.labels),
        })
    return rows


@click.command("ps")
@click.option("-a", "--all", "all_", is_flag=True, help="Show all containers (default shows just running).")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output based on conditions provided.")
@click.option("--format", "fmt", help="Format output using a custom template ('table', 'table TEMPLATE', "
              "'json', or a Go template).")
@click.option("-n", "--last", type=int, default=-1, help="Show n last created containers (includes all states).")
@click.option("-l", "--latest", is_flag=True, help="Show the latest created container (includes all states).")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-q", "--quiet", is_flag=True, help="Only display container IDs.")
@click.option("-s", "--size", is_flag=True, help="Display total file sizes.")
@pass_ctx
def ps(ctx: Context, all_: bool, filters: tuple[str, ...], fmt: str | None, last: int, latest: bool,
       no_trunc: bool, quiet: bool, size: bool) -> None:
    """List containers."""
    if latest:
        last = 1
    request = pb.ListContainersRequest(all=all_ or last > 0, filters=list(filters), size=size,
                                       last=max(last, 0))
    results = None
    if ctx.many:
        results = run_many(ctx, lambda agent: agent.containers.List(request, timeout=ctx.limits.timeout))
        if ctx.json:
            finish_many(ctx, results)
        rows = [{**row, "Host": r.host} for r in results if r.status == "OK"
                for row in container_rows(list(r.value.containers), no_trunc)]
    else:
        resp = run(ctx, lambda agent: agent.containers.List(request, timeout=30))
        rows = container_rows(list(resp.containers), no_trunc)
    if quiet:
        for row in rows:
            click.echo(f"{row['Host']}\t{row['ID']}" if results is not None else row["ID"])
    elif fmt == "json":
        for row in rows:
            click.echo(json.dumps({k: v for k, v in row.items() if k != "LabelsMap"}, separators=(",", ":")))
    else:
        default = "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"
        if size:
            default += "\t{{.Size}}"
        if results is not None:
            default = default.replace("table ", "table {{.Host}}\t", 1)
        print_table(rows, default, fmt if fmt != "table" else None,
                    {"ID": "CONTAINER ID", "RunningFor": "CREATED", "CreatedAt": "CREATED AT"})
    if results is not None:
        finish_many(ctx, results)


def _each(ctx: Context, names: tuple[str, ...], call: Any, echo: bool = True) -> None:
    """Apply ``call`` to every container; docker prints the name of each success and every error,
    and fails at the end if any failed."""

    async def go(agent: Agent) -> list[str]:
        errors = []
        for name in names:
            try:
                result = await call(agent, name)
                if echo:
                    click.echo(result if isinstance(result, str) else name)
            except Exception as exc:  # the others still run, as docker does
                errors.append(rpc_details(exc))
        return errors

    if ctx.many:
        _each_on_many(ctx, names, call, echo)
        return
    errors = run(ctx, go)
    for error in errors[:-1]:
        click.echo(f"Error response from agent: {error}", err=True)
    if errors:
        raise AgentError(errors[-1])


def _each_on_many(ctx: Context, names: tuple[str, ...], call: Any, echo: bool) -> None:
    """``_each`` on every -H host: output lines prefixed with the host; a host where any
    container failed ends FAILED with its errors."""

    async def go(agent: Agent) -> tuple[list[str], list[str]]:
        out, errors = [], []
        for name in names:
            try:
                result = await call(agent, name)
                out.append(result if isinstance(result, str) else name)
            except Exception as exc:  # the others still run, as docker does
                errors.append(rpc_details(exc))
        return out, errors

    results = run_many(ctx, go)
    for r in results:
        if r.status != "OK":
            continue
        out, errors = r.value
        if echo and not ctx.json:
            for line in out:
                click.echo(f"{r.host}\t{line}")
        if errors:
            r.status, r.error = "FAILED", "; ".join(errors)
        r.value = out
    finish_many(ctx, results)


@click.command("stop")
@click.option("-s", "--signal", "sig", default="", help="Signal to send to the container.")
@click.option("-t", "--time", "--timeout", "timeout", type=int, default=None,
              help="Seconds to wait before killing the container.")
@click.argument("containers", nargs=-1, required=True)
@pass_ctx
def stop(ctx: Context, containers: tuple[str, ...], sig: str, timeout: int | None) -> None:
    """Stop one or more running containers."""
    _each(ctx, containers, lambda agent, name: agent.containers.Stop(pb.StopContainerRequest(
        container=name, timeout=timeout or 0, timeout_set=timeout is not None, signal=sig), timeout=(timeout or 10) + 60))


@click.command("restart")
@click.option("-t", "--time", "--timeout", "timeout", type=int, default=None,
              help="Seconds to wait before killing the container.")
@click.argument("containers", nargs=-1, required=True)
@pass_ctx
def restart(ctx: Context, containers: tuple[str, ...], timeout: int | None) -> None:
    """Restart one or more containers."""
    _each(ctx, containers, lambda agent, name: agent.containers.Restart(pb.RestartContainerRequest(
        container=name, timeout=timeout or 0, timeout_set=timeout is not None), timeout=(timeout or 10) + 90))


@click.command("kill")
@click.option("-s", "--signal", "sig", default="KILL", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
@pass_ctx
def kill(ctx: Context, containers: tuple[str, ...], sig: str) -> None:
    """Kill one or more running containers."""
    _each(ctx, containers, lambda agent, name: agent.containers.Kill(
        pb.KillContainerRequest(container=name, signal=sig), timeout=30))


@click.command("rm")
@click.option("-f", "--force", is_flag=True, help="Force the removal of a running container (uses SIGKILL).")
@click.option("-v", "--volumes", is_flag=True, help="Remove anonymous volumes associated with the container.")
@click.argument("containers", nargs=-1, required=True)
@pass_ctx
def rm(ctx: Context, containers: tuple[str, ...], force: bool, volumes: bool) -> None:
    """Remove one or more containers."""
    _each(ctx, containers, lambda agent, name: agent.containers.Remove(
        pb.RemoveContainerRequest(container=name, force=force), timeout=90))


@click.command("wait")
@click.argument("containers", nargs=-1, required=True)
@pass_ctx
def wait(ctx: Context, containers: tuple[str, ...]) -> None:
    """Block until one or more containers stop, then print their exit codes."""

    async def one(agent: Agent, name: str) -> str:
        resp = await agent.containers.Wait(pb.WaitContainerRequest(container=name))
        return str(resp.status_code)

    _each(ctx, containers, one)


@click.command("rename")
@click.argument("container")
@click.argument("new_name")
@pass_ctx
def rename(ctx: Context, container: str, new_name: str) -> None:
    """Rename a container."""
    async def go(agent: Agent) -> None:
        await agent.containers.Rename(pb.RenameContainerRequest(container=container, name=new_name), timeout=30)

    if ctx.many:
        run_each(ctx, go, lambda _: ("", ""))
    run(ctx, go)


@click.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.option("--filter", "filters", multiple=True, help="Provide filter values (e.g. 'label=<key>=<value>').")
@pass_ctx
def prune(ctx: Context, force: bool, filters: tuple[str, ...]) -> None:
    """Remove all stopped containers."""
    if not force and not confirm("WARNING! This will remove all stopped containers."):
        raise CancelledError("")
    async def go(agent: Agent) -> pb.PruneContainersResponse:
        return await agent.containers.Prune(pb.PruneContainersRequest(filters=list(filters)), timeout=300)

    if ctx.many:
        run_each(ctx, go, lambda resp: (_pruned_text(resp), ""))
    click.echo(_pruned_text(run(ctx, go)), nl=False)


def _pruned_text(resp: pb.PruneContainersResponse) -> str:
    lines = ["Deleted Containers:", *resp.deleted, ""] if resp.deleted else []
    lines.append(f"Total reclaimed space: {human_size(resp.space_reclaimed)}")
    return "\n".join(lines) + "\n"


def _parse_time(value: str, flag: str) -> int:
    if not value:
        return 0
    from agent.containers.jsonlog import parse_since

    try:
        return parse_since(value, time.time_ns())
    except Exception as exc:  # the agent module's InvalidArgument: one line for the user
        raise UsageError(f"invalid value for {flag}: {exc}") from None


@click.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Follow log output.")
@click.option("--since", default="", help="Show logs since timestamp (2013-01-02T13:23:37Z) or relative (42m).")
@click.option("--until", default="", help="Show logs before a timestamp or relative (42m).")
@click.option("-n", "--tail", default="all", help="Number of lines to show from the end of the logs.")
@click.option("-t", "--timestamps", is_flag=True, help="Show timestamps.")
@click.option("--details", is_flag=True, help="Show extra details provided to logs.")
@click.argument("container")
@pass_ctx
def logs(ctx: Context, container: str, follow: bool, since: str, until: str, tail: str, timestamps: bool,
         details: bool) -> None:
    """Fetch the logs of a container."""
    if tail == "all":
        tail_n = -1
    else:
        try:
            tail_n = int(tail)
        except ValueError:
            raise UsageError(f"invalid value for --tail: {tail!r}") from None
        if tail_n < 0:
            tail_n = -1
    request = pb.LogsRequest(container=container, follow=follow, stdout=True, stderr=True,
                             since_ns=_parse_time(since, "--since"), until_ns=_parse_time(until, "--until"),
                             tail=tail_n)

    async def go(agent: Agent) -> None:
        out = sys.stdout.buffer
        err = sys.stderr.buffer
        async for batch in agent.containers.Logs(request):
            for entry in batch.entries:
                target = err if entry.stream == pb.LogEntry.STDERR else out
                if timestamps:
                    target.write(_timestamp(entry.time_ns).encode() + b" ")
                target.write(entry.data)
            out.flush()
            err.flush()

    if ctx.many:
        _logs_on_many(ctx, request, timestamps)
    run(ctx, go)


def _logs_on_many(ctx: Context, request: pb.LogsRequest, timestamps: bool) -> None:
    """Every host's lines as they come, each prefixed with its host (coloured on a terminal); with
    -f it ends when every host's container has ended; a host that drops is reported, not fatal."""
    from dataclasses import replace

    from controller.prefix import Prefixer

    prefixer = Prefixer(ctx.hosts)

    async def go(agent: Agent) -> int:
        lines = prefixer.lines(agent.host)
        try:
            async for batch in agent.containers.Logs(request):
                for entry in batch.entries:
                    stamp = _timestamp(entry.time_ns).encode() + b" " if timestamps else b""
                    lines.feed(entry.data, stderr=entry.stream == pb.LogEntry.STDERR, stamp=stamp)
        finally:
            lines.close()
        return lines.count

    # following streams last as long as the containers: no call timeout, every host at once
    limits = replace(ctx.limits, timeout=None, forks=len(ctx.hosts)) if request.follow else ctx.limits
    finish_many(ctx, run_many(replace(ctx, limits=limits), go))


def _timestamp(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


@click.command("top", context_settings={"ignore_unknown_options": True})
@click.argument("container")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def top(ctx: Context, container: str, ps_args: tuple[str, ...]) -> None:
    """Display the running processes of a container."""
    async def go(agent: Agent) -> pb.TopContainerResponse:
        return await agent.containers.Top(pb.TopContainerRequest(container=container, ps_args=list(ps_args)),
                                          timeout=30)

    if ctx.many:
        run_each(ctx, go, lambda resp: (_top_text(resp), ""))
    click.echo(_top_text(run(ctx, go)), nl=False)


def _top_text(resp: pb.TopContainerResponse) -> str:
    from controller.templates import tabwrite

    lines = ["\t".join(resp.titles)] + ["\t".join(r.fields) for r in resp.processes]
    return tabwrite(lines, minwidth=0, padding=3).rstrip("\n") + "\n"
