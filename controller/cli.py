"""Shared CLI plumbing: the root group's context, running coroutines, formatting helpers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import click

from controller.client import Agent, TLSFiles, connect
from controller.errors import UsageError
from controller.fanout import HostResult, Limits
from controller.targets import Target

if TYPE_CHECKING:
    from controller.ssh import SSHOptions

T = TypeVar("T")


@dataclass
class Context:
    #: the hosts, or how to find them (an inventory is read only by commands that talk to agents)
    targets_source: list[Target] | Callable[[], list[Target]]
    tls: TLSFiles | None = None
    limits: Limits = field(default_factory=Limits)
    ssh: SSHOptions | None = None
    #: ``--format json``: per-host results as one JSON document instead of the human output
    json: bool = False
    #: ``--retry-file``: where the hosts that did not end OK go, as an inventory
    retry_file: str | None = None

    @property
    def targets(self) -> list[Target]:
        if callable(self.targets_source):
            self.targets_source = self.targets_source()
        return self.targets_source

    @property
    def hosts(self) -> list[str]:
        return [t.label for t in self.targets]

    @property
    def host(self) -> Target:
        if len(self.targets) != 1:
            raise UsageError(f"this command takes one host; {len(self.targets)} were given")
        return self.targets[0]

    @property
    def many(self) -> bool:
        """Fan-out mode: several hosts, or per-host results asked for (JSON, a retry file, rolling)."""
        return len(self.targets) > 1 or self.json or bool(self.retry_file) or bool(self.limits.serial)


pass_ctx = click.make_pass_decorator(Context)


def run(ctx: Context, fn: Callable[[Agent], Awaitable[T]]) -> T:
    async def go() -> T:
        async with connect(ctx.host, ctx.tls, ctx.ssh) as agent:
            return await fn(agent)

    return asyncio.run(go())


def run_many(ctx: Context, fn: Callable[[Agent], Awaitable[T]]) -> list[HostResult]:
    """``fn`` on every ``-H`` host at once (see :mod:`controller.fanout`)."""
    from controller.fanout import fan_out

    return asyncio.run(fan_out(ctx.targets, fn, tls=ctx.tls, ssh=ctx.ssh, limits=ctx.limits))


def run_each(ctx: Context, fetch: Callable[[Agent], Awaitable[T]],
             render: Callable[[T], tuple[str, str]]) -> None:
    """A one-host command on many hosts: ``render`` turns a host's answer into (the text the
    one-host command prints, an error or ""); each host's lines are printed prefixed with the host,
    and a host with an error ends FAILED.  Then the summary and exit code, as for every fan-out."""
    from controller.fanout import FAILED, OK
    from controller.prefix import Prefixer

    results = run_many(ctx, fetch)
    prefixer = Prefixer(ctx.hosts)
    for r in results:
        if r.status != OK:
            continue
        text, error = render(r.value)
        if error:
            r.status, r.error = FAILED, error
        if text and not ctx.json:
            lines = prefixer.lines(r.host)
            lines.feed(text.encode())
            lines.close()
    finish_many(ctx, results)


def finish_many(ctx: Context, results: Sequence[HostResult]) -> None:
    """The per-host report and summary on stderr (or, with ``--format json``, every host's result
    on stdout), the retry file, then exit with the fan-out's code."""
    import sys

    from controller.fanout import OK, exit_code, report

    if ctx.json:
        click.echo(json.dumps([_json_result(r) for r in results], indent=2, default=_json_default))
    else:
        report(results)
    if ctx.retry_file:
        failed = [r.target for r in results if r.status != OK and r.target is not None]
        if failed:
            from controller.inventory import write_retry_file

            write_retry_file(ctx.retry_file, failed)
            print(f"{len(failed)} hosts that did not end OK: retry with -i {ctx.retry_file}", file=sys.stderr)
    sys.stdout.flush()
    sys.exit(exit_code(results))


def _json_result(r: HostResult) -> dict[str, Any]:
    doc: dict[str, Any] = {"host": r.host, "url": r.target.url if r.target else r.host, "status": r.status}
    if r.error:
        doc["error"] = r.error
    if r.value is not None:
        doc["result"] = r.value
    if r.attempts > 1:
        doc["attempts"] = r.attempts
    return doc


def _json_default(value: Any) -> Any:
    from google.protobuf.message import Message

    if isinstance(value, Message):
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def print_json_docs(docs: Sequence[Any]) -> None:
    """``inspect`` without -f: a JSON array, indented 4 spaces, like docker."""
    click.echo(json.dumps(list(docs), indent=4))


def print_template_docs(fmt: str, docs: Sequence[Any]) -> None:
    click.echo(template_text(fmt, docs), nl=False)


def template_text(fmt: str, docs: Sequence[Any]) -> str:
    """Each document through the ``--format`` template, one line each."""
    from controller.templates import Template

    template = Template(fmt)
    return "".join(template.execute(doc) + "\n" for doc in docs)


def print_table(rows: Sequence[dict[str, Any]], default_format: str, fmt: str | None,
                headers: dict[str, str] | None = None) -> None:
    """List output: docker's default table, or the user's ``--format`` (with or without ``table``)."""
    from controller.templates import format_rows

    out = format_rows(fmt or default_format, rows, headers)
    if out:
        click.echo(out)


__all__ = ["Context", "pass_ctx", "run", "print_json_docs", "print_template_docs", "print_table"]
