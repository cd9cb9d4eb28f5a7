"""The fan-out engine's outcomes and exit codes, against hosts that cannot answer (no agent needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.fanout import FAILED, OK, TIMEOUT, UNREACHABLE, HostResult, Limits, exit_code, fan_out, report


def test_exit_code_is_the_or_of_the_states() -> None:
    assert exit_code([HostResult("a", OK)]) == 0
    assert exit_code([HostResult("a", OK), HostResult("b", FAILED)]) == 2
    assert exit_code([HostResult("a", UNREACHABLE), HostResult("b", TIMEOUT)]) == 12
    assert exit_code([HostResult("a", FAILED), HostResult("b", UNREACHABLE), HostResult("c", TIMEOUT)]) == 14


def test_report_names_every_host_that_is_not_ok(capsys: pytest.CaptureFixture[str]) -> None:
    report([HostResult("a", OK), HostResult("b", TIMEOUT, error="no answer within 2s")])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "b: TIMEOUT: no answer within 2s"
    assert err[-1] == "1 OK, 0 FAILED, 0 UNREACHABLE, 1 TIMEOUT (2 hosts)"


def test_missing_sockets_are_unreachable(tmp_path: Path) -> None:
    hosts = [f"unix://{tmp_path / f's{n}.sock'}" for n in range(20)]

    async def never(agent: object) -> None:
        raise AssertionError("no agent answers here")

    results = asyncio.run(fan_out(hosts, never, limits=Limits(forks=5, connect_timeout=0.2)))
    assert [r.status for r in results] == [UNREACHABLE] * 20
    assert [r.host for r in results] == hosts
