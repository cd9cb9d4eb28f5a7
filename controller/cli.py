"""Shared CLI plumbing: the root group's context, running coroutines, formatting helpers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from controller.client import Agent, TLSFiles, connect
from controller.errors import UsageError

T = TypeVar("T")


@dataclass
class Context:
    hosts: list[str]
    tls: TLSFiles | None = None

    @property
    def host(self) -> str:
        if len(self.hosts) != 1:
            raise UsageError("this command takes one host; fan-out across several -H arrives with the fleet")
        return self.hosts[0]


pass_ctx = click.make_pass_decorator(Context)


def run(ctx: Context, fn: Callable[[Agent], Awaitable[T]]) -> T:
    async def go() -> T:
        async with connect(ctx.host, ctx.tls) as agent:
            return await fn(agent)

    return asyncio.run(go())


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
