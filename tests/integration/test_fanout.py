"""Fan-out across several real agents: merged tables, and dead or hung hosts that never stall the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess, Result
from tests.support.registry import Registry

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    try:
        for n in range(3):
            agent = AgentProcess(tmp_path_factory.mktemp(f"fleet{n}")).start()
            started.append(agent)
            agent.ok("pull", "-q", f"{registry.host}/busybox:1")
            agent.ok("create", "--name", f"box{n}", f"{registry.host}/busybox:1", "true")
        yield started
    finally:
        for agent in started:
            agent.stop()


def skiff(*args: str, timeout: float = 60) -> Result:
    proc = subprocess.run([str(BIN / "skiff"), *args], capture_output=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "SKIFF_HOST"})
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def _hosts(agents: list[AgentProcess]) -> list[str]:
    return [arg for a in agents for arg in ("-H", a.host)]


def test_tables_merge_with_a_host_column(agents: list[AgentProcess]) -> None:
    result = skiff(*_hosts(agents), "ps", "-a")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split()[:3] == ["HOST", "CONTAINER", "ID"]
    for n, agent in enumerate(agents):
        assert any(line.startswith(agent.host) and f"box{n}" in line for line in lines[1:]), result.out
    assert "3 OK" in result.err
    images = skiff(*_hosts(agents), "images", "--format", "{{.Host}} {{.Tag}}")
    assert sorted(images.out.split("\n")[:-1]) == sorted(f"{a.host} 1" for a in agents)


def test_a_dead_host_is_unreachable_and_the_others_answer(agents: list[AgentProcess], tmp_path: Path) -> None:
    dead = f"unix://{tmp_path / 'nobody.sock'}"
    started = time.monotonic()
    result = skiff(*_hosts(agents), "-H", dead, "--connect-timeout", "1", "ps", "-a")
    assert time.monotonic() - started < 30
    assert result.code == 4, result.err
    assert f"{dead}: UNREACHABLE" in result.err and "3 OK" in result.err and "1 UNREACHABLE" in result.err
    assert sum("box" in line for line in result.out.splitlines()) == 3


def test_a_frozen_agent_times_out_within_the_limit(agents: list[AgentProcess]) -> None:
    frozen = agents[0]
    assert frozen.proc is not None
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = skiff(*_hosts(agents), "--timeout", "2", "--connect-timeout", "2", "ps", "-a")
        assert time.monotonic() - started < 30
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    assert result.code in (4, 8), result.err
    assert frozen.host in result.err and ("TIMEOUT" in result.err or "UNREACHABLE" in result.err)
    assert "2 OK" in result.err
    assert sum("box" in line for line in result.out.splitlines()) == 2


def test_pull_run_stop_rm_across_hosts(agents: list[AgentProcess], registry: Registry, tmp_path: Path) -> None:
    ref = f"{registry.host}/busybox:1"
    pulled = skiff(*_hosts(agents), "pull", ref)
    assert pulled.code == 0, pulled.err
    assert sorted(line.split()[0] for line in pulled.out.splitlines()) == sorted(a.host for a in agents)
    assert all(line.split()[1:] == ["Pulled", ref] for line in pulled.out.splitlines()), pulled.out
    ran = skiff(*_hosts(agents), "run", "-d", "--name", "everywhere", ref, "sleep", "1000")
    assert ran.code == 0, ran.err
    assert len(ran.out.splitlines()) == 3 and all(len(line.split("\t")[1]) == 64 for line in ran.out.splitlines())
    running = skiff(*_hosts(agents), "ps", "--filter", "name=everywhere", "-q")
    assert len(running.out.splitlines()) == 3
    attached = skiff(*_hosts(agents), "run", ref, "true")
    assert attached.code == 125 and "needs -d" in attached.err
    dead = f"unix://{tmp_path / 'gone.sock'}"
    stopped = skiff(*_hosts(agents), "-H", dead, "--connect-timeout", "1", "stop", "-t", "0", "everywhere")
    assert stopped.code == 4, stopped.err
    assert sorted(line.split("\t")[0] for line in stopped.out.splitlines()) == sorted(a.host for a in agents)
    restarted = skiff(*_hosts(agents), "start", "everywhere")
    assert restarted.code == 0 and len(restarted.out.splitlines()) == 3, restarted.err
    assert skiff(*_hosts(agents), "stop", "-t", "0", "everywhere").code == 0
    removed = skiff(*_hosts(agents), "rm", "everywhere")
    assert removed.code == 0, removed.err
    again = skiff(*_hosts(agents), "rm", "everywhere")
    assert again.code == 2 and "No such container" in again.err


def test_logs_from_every_host_prefixed(agents: list[AgentProcess], registry: Registry) -> None:
    ref = f"{registry.host}/busybox:1"
    ran = skiff(*_hosts(agents), "run", "-d", "--name", "talker", ref, "sh", "-c",
                "for i in 1 2 3; do echo line $i; sleep 0.2; done; echo oops >&2")
    assert ran.code == 0, ran.err
    followed = skiff(*_hosts(agents), "logs", "-f", "talker")  # ends when every container has
    assert followed.code == 0, followed.err
    for agent in agents:
        mine = [line for line in followed.out.splitlines() if line.startswith(agent.host)]
        assert [line.split("| ", 1)[1] for line in mine] == ["line 1", "line 2", "line 3"]
        assert any(line.startswith(agent.host) and line.endswith("| oops") for line in followed.err.splitlines())
    stamped = skiff(*_hosts(agents), "logs", "-t", "--tail", "1", "talker")
    assert len(stamped.out.splitlines()) == 0 and len(stamped.err.splitlines()) >= 3
    import re

    assert len(re.findall(r"\| \d{4}-\d\d-\d\dT[\d:.]+Z oops", stamped.err)) == 3
    assert skiff(*_hosts(agents), "rm", "-f", "talker").code == 0


def test_exec_on_every_host_prefixed_with_each_exit_code(agents: list[AgentProcess], registry: Registry) -> None:
    ref = f"{registry.host}/busybox:1"
    assert skiff(*_hosts(agents), "run", "-d", "--name", "execbox", ref, "sleep", "60").code == 0
    try:
        ran = skiff(*_hosts(agents), "exec", "execbox", "sh", "-c", "echo out; echo err >&2; hostname >/dev/null")
        assert ran.code == 0, ran.err
        for agent in agents:
            assert f"{agent.host} | out" in ran.out.splitlines(), ran.out
            assert f"{agent.host} | err" in ran.err.splitlines(), ran.err
            assert f"{agent.host}: exit code 0" in ran.err
        failing = skiff(*_hosts(agents), "exec", "execbox", "sh", "-c", "exit 3")
        assert failing.code == 2, failing.err
        assert failing.err.count("FAILED: exit code 3") == 3
        interactive = skiff(*_hosts(agents), "exec", "-it", "execbox", "sh")
        assert interactive.code == 125 and "one host" in interactive.err
    finally:
        skiff(*_hosts(agents), "rm", "-f", "execbox")


def test_json_results_and_a_retry_file(agents: list[AgentProcess], tmp_path: Path) -> None:
    import json

    dead = f"unix://{tmp_path / 'gone.sock'}"
    retry = tmp_path / "retry.ini"
    result = skiff(*_hosts(agents), "-H", dead, "--format", "json", "--retries", "0", "--connect-timeout", "0.5",
                   "--retry-file", str(retry), "ps", "-a")
    assert result.code == 4, result.err
    docs = json.loads(result.out)
    assert [d["host"] for d in docs] == [a.host for a in agents] + [dead]
    assert [d["status"] for d in docs] == ["OK"] * 3 + ["UNREACHABLE"]
    assert all(isinstance(d["result"]["containers"], list) for d in docs[:3])
    again = skiff("-i", str(retry), "--connect-timeout", "0.5", "--retries", "0", "ps")
    assert again.code != 0 and "gone.sock" in again.err, again.err


def test_a_repeated_operation_id_is_answered_not_done_twice(agents: list[AgentProcess], registry: Registry) -> None:
    import asyncio

    from controller.client import OPERATION_HEADER, connect
    from skiff.v1 import containers_pb2 as pb

    agent = agents[0]
    config = pb.ContainerConfig(image=f"{registry.host}/busybox:1", cmd=["true"])

    async def twice() -> list[str]:
        async with connect(agent.host) as client:
            ids = []
            for _ in range(2):  # the same operation id: a retry after a lost answer
                resp = await client.containers.Create(pb.CreateContainerRequest(config=config), timeout=30,
                                                      metadata=((OPERATION_HEADER, "run-1/host/1"),))
                ids.append(resp.id)
            other = await client.containers.Create(pb.CreateContainerRequest(config=config), timeout=30,
                                                   metadata=((OPERATION_HEADER, "run-1/host/2"),))
            return [*ids, other.id]

    first, again, other = asyncio.run(twice())
    try:
        assert first == again and other != first
        listed = agent.ok("ps", "-a", "-q", "--no-trunc").split()
        assert listed.count(first) == 1 and other in listed
    finally:
        agent.cli("rm", "-f", first, other)


def test_every_other_command_fans_out_with_prefixed_output(agents: list[AgentProcess], registry: Registry) -> None:
    ref = f"{registry.host}/busybox:1"
    hosts = _hosts(agents)

    def lines_of(text: str, agent: AgentProcess) -> list[str]:
        return [ln.split(" | ", 1)[1] for ln in text.splitlines() if ln.startswith(agent.host + " ")]

    info = skiff(*hosts, "info", "--format", "{{.ServerVersion}} {{.CgroupDriver}}")
    assert info.code == 0 and all(lines_of(info.out, a) == ["0.1.0 cgroupfs"] for a in agents), info.out + info.err
    version = skiff(*hosts, "version", "--format", "{{.Server.Version}}")
    assert version.code == 0 and all(lines_of(version.out, a) == ["0.1.0"] for a in agents), version.out
    assert skiff(*hosts, "tag", ref, "fleet/tagged:1").code == 0
    inspected = skiff(*hosts, "inspect", "--format", "{{index .RepoTags 0}}", "fleet/tagged:1")
    assert inspected.code == 0 and all(lines_of(inspected.out, a) for a in agents), inspected.out
    history = skiff(*hosts, "history", "-q", "fleet/tagged:1")
    assert history.code == 0 and all(lines_of(history.out, a) for a in agents)
    created = skiff(*hosts, "create", "--name", "made-everywhere", ref, "sleep", "30")
    assert created.code == 0 and all(len(lines_of(created.out, a)[0]) == 64 for a in agents), created.out
    assert skiff(*hosts, "rename", "made-everywhere", "renamed-everywhere").code == 0
    assert skiff(*hosts, "start", "renamed-everywhere").code == 0
    top = skiff(*hosts, "top", "renamed-everywhere")
    assert top.code == 0 and all(any("sleep 30" in ln for ln in lines_of(top.out, a)) for a in agents), top.out
    assert skiff(*hosts, "rm", "-f", "renamed-everywhere").code == 0
    removed = skiff(*hosts, "rmi", "fleet/tagged:1")
    assert removed.code == 0 and all(lines_of(removed.out, a) == ["Untagged: fleet/tagged:1"] for a in agents)
    missing = skiff(*hosts, "rmi", "fleet/tagged:1")
    assert missing.code == 2 and missing.err.count(": FAILED: No such image") == 3, missing.err
    pruned = skiff(*hosts, "container", "prune", "-f")
    assert pruned.code == 0 and all(lines_of(pruned.out, a)[-1].startswith("Total reclaimed space") for a in agents)
