"""Shared CLI plumbing: the root group's context, running coroutines, formatting helpers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from controller.client import Agent, TLSFiles, connect
from controller.errors import UsageError
from controller.fanout import HostResult, Limits

T = TypeVar("T")


@dataclass
class Context:
    hosts: list[str]
    tls: TLSFiles | None = None
    limits: Limits = field(default_factory=Limits)

    @property
    def host(self) -> str:
        if len(self.hosts) != 1:
            raise UsageError("this command takes one host for now; ps and images fan out across several -H")
        return self.hosts[0]

    @property
    def many(self) -> bool:
        return len(self.hosts) > 1


pass_ctx = click.make_pass_decorator(Context)


def run(ctx: Context, fn: Callable[[Agent], Awaitable[T]]) -> T:
    async def go() -> T:
        async with connect(ctx.host, ctx.tls) as agent:
            return await fn(agent)

    return asyncio.run(go())


def run_many(ctx: Context, fn: Callable[[Agent], Awaitable[T]]) -> list[HostResult]:
    """``fn`` on every ``-H`` host at once (see :mod:`controller.fanout`)."""
    from controller.fanout import fan_out

    return asyncio.run(fan_out(ctx.hosts, fn, tls=ctx.tls, limits=ctx.limits))


def finish_many(results: Sequence[HostResult]) -> None:
    """The per-host report and summary on stderr, then exit with the fan-out's code."""
    import sys

    from controller.fanout import exit_code, report

    report(results)
    sys.stdout.flush()
    sys.exit(exit_code(results))


def print_json_docs(docs: Sequence[Any]) -> None:
    """``inspect`` without -f: a JSON array, indented 4 spaces, like docker."""
    click.echo(json.dumps(list(docs), indent=4))


def print_template_docs(fmt: str, docs: Sequence[Any]) -> None:
    from controller.templates import Template

    template = Template(fmt)
    for doc in docs:
        click.echo(template.execute(doc))


def print_table(rows: Sequence[dict[str, Any]], default_format: str, fmt: str | None,
                headers: dict[str, str] | None = None) -> None:
    """List output: docker's default table, or the user's ``--format`` (with or without ``table``)."""
    from controller.templates import format_rows

    out = format_rows(fmt or default_format, rows, headers)
    if out:
        click.echo(out)


__all__ = ["Context", "pass_ctx", "run", "print_json_docs", "print_template_docs", "print_table"]
