"""Rolling batches, the failure budget, retries and operation ids, against in-process gRPC servers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from controller.client import Agent
from controller.errors import AgentError, ConnectionFailed, UsageError
from controller.fanout import FAILED, OK, SKIPPED, UNREACHABLE, Limits, exit_code, fan_out, parse_serial
from skiff.v1 import system_pb2


class Seen:
    def __init__(self) -> None:
        self.operations: list[str] = []
        self.fail_first = 0


async def _server(paths: list[Path], seen: Seen) -> aio.Server:
    async def version(request: Any, context: aio.ServicerContext) -> system_pb2.VersionResponse:
        seen.operations.append(dict(context.invocation_metadata()).get("skiff-operation-id", ""))
        if seen.fail_first > 0:
            seen.fail_first -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "socket closed")
        return system_pb2.VersionResponse(version="test")

    handler = grpc.method_handlers_generic_handler("skiff.v1.System", {
        "Version": grpc.unary_unary_rpc_method_handler(
            version, request_deserializer=system_pb2.VersionRequest.FromString,
            response_serializer=system_pb2.VersionResponse.SerializeToString)})
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    for path in paths:
        server.add_insecure_port(f"unix:{path}")
    await server.start()
    return server


@pytest.fixture
def sockets(tmp_path: Path) -> list[Path]:
    return [tmp_path / f"h{n}.sock" for n in range(10)]


async def _with_server(paths: list[Path], seen: Seen, coro: Any) -> Any:
    server = await _server(paths, seen)
    try:
        return await coro
    finally:
        await server.stop(None)


def test_serial_stops_before_the_next_batch_when_over_budget(sockets: list[Path]) -> None:
    hosts = [f"unix://{p}" for p in sockets]
    batches: list[list[str]] = []

    async def work(agent: Agent) -> str:
        batches.append([agent.host])
        if agent.host in (hosts[1],):
            raise AgentError("boom")
        return "done"

    limits = Limits(serial=4, max_fail_percentage=20, connect_timeout=2)
    results = asyncio.run(_with_server(sockets, Seen(), fan_out(hosts, work, limits=limits)))
    assert [r.status for r in results] == [OK, FAILED, OK, OK] + [SKIPPED] * 6
    assert exit_code(results) == 2 | 16
    assert "1 of 4 hosts" in results[-1].error


def test_serial_within_budget_runs_every_batch(sockets: list[Path]) -> None:
    hosts = [f"unix://{p}" for p in sockets]

    async def work(agent: Agent) -> str:
        if agent.host == hosts[0]:
            raise AgentError("boom")
        return "done"

    limits = Limits(serial=4, max_fail_percentage=30, connect_timeout=2)
    results = asyncio.run(_with_server(sockets, Seen(), fan_out(hosts, work, limits=limits)))
    assert [r.status for r in results] == [FAILED] + [OK] * 9


def test_a_batch_that_failed_entirely_stops_even_without_a_budget(sockets: list[Path], tmp_path: Path) -> None:
    dead = [f"unix://{tmp_path / f'dead{n}.sock'}" for n in range(2)]
    hosts = dead + [f"unix://{p}" for p in sockets[:4]]

    async def work(agent: Agent) -> str:
        return "done"

    limits = Limits(serial=2, connect_timeout=0.2, retries=0)
    results = asyncio.run(_with_server(sockets, Seen(), fan_out(hosts, work, limits=limits)))
    assert [r.status for r in results] == [UNREACHABLE, UNREACHABLE] + [SKIPPED] * 4
    assert exit_code(results) == 4 | 16


def test_unreachable_hosts_count_against_the_budget(sockets: list[Path], tmp_path: Path) -> None:
    hosts = [f"unix://{tmp_path / 'dead.sock'}"] + [f"unix://{p}" for p in sockets[:5]]

    async def work(agent: Agent) -> str:
        return "done"

    limits = Limits(serial=3, max_fail_percentage=10, connect_timeout=0.2, retries=0)
    results = asyncio.run(_with_server(sockets, Seen(), fan_out(hosts, work, limits=limits)))
    assert [r.status for r in results] == [UNREACHABLE, OK, OK] + [SKIPPED] * 3


def test_parse_serial() -> None:
    assert parse_serial("5", 200) == 5
    assert parse_serial("25%", 10) == 2
    assert parse_serial("1%", 10) == 1
    for bad in ("0", "-1", "x", "0%", "101%", ""):
        with pytest.raises(UsageError):
            parse_serial(bad, 10)


def test_a_lost_answer_is_retried_with_the_same_operation_id(sockets: list[Path]) -> None:
    seen = Seen()
    seen.fail_first = 1

    async def work(agent: Agent) -> str:
        first = await agent.system.Version(system_pb2.VersionRequest(), timeout=5)
        second = await agent.system.Version(system_pb2.VersionRequest(), timeout=5)
        return first.version + second.version

    limits = Limits(connect_timeout=2, backoff=0.01)
    results = asyncio.run(_with_server(sockets[:1], seen, fan_out([f"unix://{sockets[0]}"], work, limits=limits)))
    assert results[0].status == OK and results[0].attempts == 2
    first, again, second = seen.operations
    assert first == again and first.endswith("/1") and second.endswith("/2")
    assert first.rsplit("/", 1)[0] == second.rsplit("/", 1)[0]


def test_retries_wait_for_a_host_that_comes_up(sockets: list[Path]) -> None:
    async def work(agent: Agent) -> str:
        return (await agent.system.Version(system_pb2.VersionRequest(), timeout=5)).version

    async def late() -> Any:
        task = asyncio.ensure_future(fan_out([f"unix://{sockets[0]}"], work,
                                             limits=Limits(connect_timeout=0.3, backoff=0.3, retries=3)))
        await asyncio.sleep(0.4)
        return await _with_server(sockets[:1], Seen(), task)

    results = asyncio.run(late())
    assert results[0].status == OK and results[0].attempts > 1 and results[0].value == "test"


def test_no_retry_for_errors_that_will_not_go_away(sockets: list[Path]) -> None:
    calls = 0

    async def work(agent: Agent) -> str:
        nonlocal calls
        calls += 1
        failure = ConnectionFailed("TLS with the skiff agent failed")
        failure.retryable = False
        raise failure

    results = asyncio.run(_with_server(sockets[:1], Seen(), fan_out([f"unix://{sockets[0]}"], work,
                                                                        limits=Limits(connect_timeout=2))))
    assert results[0].status == UNREACHABLE and calls == 1


def test_no_retry_once_a_stream_has_begun(sockets: list[Path]) -> None:
    calls = 0

    async def work(agent: Agent) -> str:
        nonlocal calls
        calls += 1
        agent.streamed = True
        raise ConnectionFailed("connection reset")

    results = asyncio.run(_with_server(sockets[:1], Seen(), fan_out([f"unix://{sockets[0]}"], work,
                                                                        limits=Limits(connect_timeout=2))))
    assert results[0].status == UNREACHABLE and calls == 1


async def test_stubs_make_methods_on_first_use_and_streams_mark_the_host(tmp_path: Path) -> None:
    from skiff.v1 import containers_pb2

    channel = aio.insecure_channel(f"unix://{tmp_path / 'nobody.sock'}")
    try:
        agent = Agent("unix://nobody", channel)
        stub = agent.containers
        assert "List" not in vars(stub)
        listing = stub.List
        assert stub.List is listing and isinstance(listing, aio.UnaryUnaryMultiCallable)
        assert not agent.streamed
        call = stub.Logs(containers_pb2.LogsRequest(container="x"))
        assert agent.streamed
        call.cancel()
        with pytest.raises(AttributeError):
            stub.NoSuchMethod
    finally:
        await channel.close()
