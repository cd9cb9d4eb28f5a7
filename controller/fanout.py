"""Fan-out: one call on many agents at once, bounded, each host ending in one of four states.

Every host ends ``OK``, ``FAILED`` (the agent answered with an error),
``UNREACHABLE`` (no connection within ``connect_timeout``) or ``TIMEOUT`` (no
answer within ``timeout``); a dead or hung host never stalls the others.  At
most ``forks`` hosts are in flight at once.

Rolling (``serial``): hosts go in batches; when more than
``max_fail_percentage`` of a batch did not end OK (unreachable and timed-out
hosts count, unlike Ansible's), or every host of it failed, the rest are not
touched and end ``SKIPPED``.

Retries: only a connection that could not be made or was lost (transport
unavailability) is retried, with jittered exponential backoff, at most
``retries`` times; never TLS, host-key, login, permission or argument errors.
Every unary call carries an operation id (the same on a retry), which the agent
remembers, so a mutating call whose answer was lost is not done twice; a host
whose streaming call (logs, exec, attach) had begun is never retried.

Exit codes (bits, OR-ed, like ansible-playbook's 2 and 4): 0 every host OK,
2 some host FAILED, 4 some host UNREACHABLE, 8 some host TIMEOUT, 16 some
hosts SKIPPED by a rolling run's failure budget.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from controller.client import Agent, TLSFiles, connect
from controller.errors import AgentError, ConnectionFailed, ControllerError, UsageError
from controller.targets import Target

if TYPE_CHECKING:
    from controller.ssh import SSHOptions

T = TypeVar("T")

OK = "OK"
FAILED = "FAILED"
UNREACHABLE = "UNREACHABLE"
TIMEOUT = "TIMEOUT"
SKIPPED = "SKIPPED"
EXIT_BITS = {OK: 0, FAILED: 2, UNREACHABLE: 4, TIMEOUT: 8, SKIPPED: 16}


@dataclass
class HostResult:
    host: str
    status: str
    value: Any = None
    error: str = ""
    target: Target | None = None
    attempts: int = 1


@dataclass(frozen=True)
class Limits:
    forks: int = 50
    connect_timeout: float = 5.0
    #: None: no limit (streams that end with the container, such as logs -f)
    timeout: float | None = 60.0
    #: hosts per rolling batch (None: all at once)
    serial: int | None = None
    #: stop before the next batch when more than this share of a batch failed
    max_fail_percentage: float | None = None
    #: further attempts after a transport failure
    retries: int = 2
    #: first backoff in seconds (doubled each time, jittered ±50%)
    backoff: float = 0.25


def parse_serial(value: str, total: int) -> int:
    """``N`` or ``N%`` of ``total`` hosts (at least 1), like Ansible's ``serial``."""
    text = value.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return max(1, math.floor(total * share / 100))
        count = int(text)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise UsageError(f"invalid --serial {value!r}: use a count (5) or a share of the hosts (20%)") from None


def _backoff(limits: Limits, attempt: int) -> float:
    return float(limits.backoff * (2 ** attempt) * random.uniform(0.5, 1.5))


async def _attempt(target: Target, fn: Callable[[Agent], Awaitable[Any]], tls: TLSFiles | None,
                   ssh: SSHOptions | None, limits: Limits, operation: str) -> tuple[HostResult, bool]:
    """One try; the flag says whether trying again may help (and is safe)."""
    label = target.label
    opened: list[Agent] = []

    async def go() -> tuple[HostResult, bool]:
        async with connect(target, tls, ssh, operation=operation) as agent:
            opened.append(agent)
            if not await _ready(agent, limits):
                if await _reachable(target):  # accepted, then nothing: a hung agent, not worth a retry
                    return HostResult(label, TIMEOUT, error=f"the agent accepted the connection but did not "
                                      f"answer within {limits.connect_timeout:g}s (hung?)", target=target), False
                return HostResult(label, UNREACHABLE, error=f"no connection within {limits.connect_timeout:g}s",
                                  target=target), True
            try:
                value = await asyncio.wait_for(fn(agent), limits.timeout)
            except TimeoutError:
                return HostResult(label, TIMEOUT, error=f"no answer within {limits.timeout or 0:g}s",
                                  target=target), False
            return HostResult(label, OK, value, target=target), False

    try:
        return await go()
    except ConnectionFailed as exc:
        safe = not (opened and opened[0].streamed)
        return HostResult(label, UNREACHABLE, error=str(exc), target=target), exc.retryable and safe
    except ControllerError as exc:  # the agent's error, or ours (a bad template, say)
        return HostResult(label, FAILED, error=str(exc), target=target), False


async def _ready(agent: Agent, limits: Limits) -> bool:
    """Wait (up to ``connect_timeout``) for the channel to connect; a failed connection raises its
    own error at once (refused, TLS refusal: see :func:`controller.client.translate`) instead of
    waiting out the timeout while gRPC reconnects."""
    import grpc

    channel = agent.channel
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.connect_timeout
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            try:
                await agent.probe()  # fails fast, with the connection's error
            except AgentError as exc:  # an UNAVAILABLE the translation does not know
                raise ConnectionFailed(f"cannot connect to the skiff agent at {agent.host}: {exc}") from None
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except TimeoutError:
            return False
        state = channel.get_state()
    return True


async def _reachable(target: Target) -> bool:
    """Whether the agent's address accepts a connection at all (a frozen agent's still does)."""
    if target.is_ssh:
        return True  # the tunnel already reached the agent's socket
    try:
        if target.url.startswith("tcp://"):
            host, _, port = target.url.removeprefix("tcp://").rstrip("/").rpartition(":")
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 1.0)
        else:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(target.url.removeprefix("unix://")),
                                               1.0)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    return True


async def _one(target: Target, fn: Callable[[Agent], Awaitable[Any]], tls: TLSFiles | None,
               ssh: SSHOptions | None, limits: Limits, gate: asyncio.Semaphore, run_id: str) -> HostResult:
    operation = f"{run_id}/{target.url}"
    async with gate:
        attempt = 0
        while True:
            result, again = await _attempt(target, fn, tls, ssh, limits, operation)
            result.attempts = attempt + 1
            if not again or attempt >= limits.retries:
                return result
            await asyncio.sleep(_backoff(limits, attempt))
            attempt += 1


def _over_budget(batch: Sequence[HostResult], limits: Limits) -> bool:
    failed = sum(1 for r in batch if r.status != OK)
    if not batch or not failed:
        return False
    if failed == len(batch):
        return True
    return limits.max_fail_percentage is not None and 100.0 * failed / len(batch) > limits.max_fail_percentage


async def fan_out(targets: Sequence[Target | str], fn: Callable[[Agent], Awaitable[T]], *,
                  tls: TLSFiles | None = None, ssh: SSHOptions | None = None,
                  limits: Limits = Limits()) -> list[HostResult]:
    """``fn`` on every target, results in the targets' order, each ending in one of the states."""
    hosts = [Target(t) if isinstance(t, str) else t for t in targets]
    gate = asyncio.Semaphore(max(1, limits.forks))
    run_id = uuid.uuid4().hex
    size = limits.serial or len(hosts) or 1
    results: list[HostResult] = []
    for start in range(0, len(hosts), size):
        batch = hosts[start:start + size]
        done = list(await asyncio.gather(*(_one(t, fn, tls, ssh, limits, gate, run_id) for t in batch)))
        results.extend(done)
        if limits.serial and start + size < len(hosts) and _over_budget(done, limits):
            failed = sum(1 for r in done if r.status != OK)
            why = f"{failed} of {len(done)} hosts in the last batch did not end OK"
            results.extend(HostResult(t.label, SKIPPED, error=f"not run: {why}", target=t)
                           for t in hosts[start + size:])
            break
    return results


def exit_code(results: Sequence[HostResult]) -> int:
    code = 0
    for r in results:
        code |= EXIT_BITS[r.status]
    return code


def report(results: Sequence[HostResult]) -> None:
    """Each host that did not end OK, one line, then a summary line, on stderr."""
    skipped = [r for r in results if r.status == SKIPPED]
    for r in results:
        if r.status not in (OK, SKIPPED):
            print(f"{r.host}: {r.status}: {r.error}", file=sys.stderr)
    if skipped:
        print(f"{len(skipped)} hosts SKIPPED: {skipped[0].error}", file=sys.stderr)
    counts = {s: sum(1 for r in results if r.status == s) for s in EXIT_BITS}
    shown = {s: n for s, n in counts.items() if n or s != SKIPPED}
    print(", ".join(f"{n} {s}" for s, n in shown.items()) + f" ({len(results)} hosts)", file=sys.stderr)
