"""The agent's memory of operation ids: a repeated mutating call is answered, not done twice."""

from __future__ import annotations

import asyncio

import pytest

from agent.api.operations import Operations


def test_a_repeat_gets_the_first_answer() -> None:
    ops = Operations()
    calls = 0

    async def create() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return f"id{calls}"

    async def go() -> list[str]:
        first = await ops.run("Create run/1", create)
        again = await ops.run("Create run/1", create)
        other = await ops.run("Create run/2", create)
        return [first, again, other]

    assert asyncio.run(go()) == ["id1", "id1", "id2"]
    assert calls == 2


def test_a_repeat_while_running_waits_for_the_first() -> None:
    ops = Operations()
    calls = 0

    async def create() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return "only"

    async def go() -> list[str]:
        return list(await asyncio.gather(ops.run("k", create), ops.run("k", create), ops.run("k", create)))

    assert asyncio.run(go()) == ["only"] * 3
    assert calls == 1


def test_a_failure_is_forgotten_so_a_retry_acts() -> None:
    ops = Operations()
    outcomes = [ValueError("first fails"), "second works"]

    async def create() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def go() -> str:
        with pytest.raises(ValueError):
            await ops.run("k", create)
        return str(await ops.run("k", create))

    assert asyncio.run(go()) == "second works"


def test_answers_expire_and_the_table_is_bounded() -> None:
    ops = Operations(ttl=0.0, limit=3)

    async def answer() -> int:
        return 1

    async def go() -> None:
        for n in range(10):
            await ops.run(f"k{n}", answer)

    asyncio.run(go())
    assert len(ops) <= 1
