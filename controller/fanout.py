"""Fan-out: one call on many agents at once, bounded, each host ending in one of four states.

Every host ends ``OK``, ``FAILED`` (the agent answered with an error),
``UNREACHABLE`` (no connection within ``connect_timeout``) or ``TIMEOUT`` (no
answer within ``timeout``); a dead or hung host never stalls the others.  At
most ``forks`` hosts are in flight at once.

Exit codes (bits, OR-ed, like ansible-playbook's 2 and 4): 0 every host OK,
2 some host FAILED, 4 some host UNREACHABLE, 8 some host TIMEOUT.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from controller.client import Agent, TLSFiles, connect
from controller.errors import AgentError, ConnectionFailed, ControllerError

T = TypeVar("T")

OK = "OK"
FAILED = "FAILED"
UNREACHABLE = "UNREACHABLE"
TIMEOUT = "TIMEOUT"
EXIT_BITS = {OK: 0, FAILED: 2, UNREACHABLE: 4, TIMEOUT: 8}


@dataclass
class HostResult:
    host: str
    status: str
    value: Any = None
    error: str = ""


@dataclass(frozen=True)
class Limits:
    forks: int = 50
    connect_timeout: float = 5.0
    #: None: no limit (streams that end with the container, such as logs -f)
    timeout: float | None = 60.0


async def _one(host: str, fn: Callable[[Agent], Awaitable[Any]], tls: TLSFiles | None, limits: Limits,
               gate: asyncio.Semaphore) -> HostResult:
    async with gate:
        try:
            async with connect(host, tls) as agent:
                try:
                    await asyncio.wait_for(agent.channel.channel_ready(), limits.connect_timeout)
                except TimeoutError:
                    return HostResult(host, UNREACHABLE, error=f"no connection within {limits.connect_timeout:g}s")
                try:
                    return HostResult(host, OK, await asyncio.wait_for(fn(agent), limits.timeout))
                except TimeoutError:
                    return HostResult(host, TIMEOUT, error=f"no answer within {limits.timeout or 0:g}s")
        except ConnectionFailed as exc:
            return HostResult(host, UNREACHABLE, error=str(exc))
        except AgentError as exc:
            return HostResult(host, FAILED, error=str(exc))
        except ControllerError as exc:
            return HostResult(host, FAILED, error=str(exc))


async def fan_out(hosts: Sequence[str], fn: Callable[[Agent], Awaitable[T]], *, tls: TLSFiles | None = None,
                  limits: Limits = Limits()) -> list[HostResult]:
    """``fn`` on every host, in the hosts' order, each ending in one of the four states."""
    gate = asyncio.Semaphore(max(1, limits.forks))
    return list(await asyncio.gather(*(_one(h, fn, tls, limits, gate) for h in hosts)))


def exit_code(results: Sequence[HostResult]) -> int:
    code = 0
    for r in results:
        code |= EXIT_BITS[r.status]
    return code


def report(results: Sequence[HostResult]) -> None:
    """Each host that did not end OK, one line, then a summary line, on stderr."""
    for r in results:
        if r.status != OK:
            print(f"{r.host}: {r.status}: {r.error}", file=sys.stderr)
    counts = {s: sum(1 for r in results if r.status == s) for s in EXIT_BITS}
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(results)} hosts)", file=sys.stderr)
