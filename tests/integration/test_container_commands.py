"""Container commands end to end: ps, inspect, rename, wait, kill, restart, stop, start, prune,
the ``container`` aliases and the security/resource flags of ``run``, with the real skiff CLI
against a real skiffd.

Every test leaves no container, mount, cgroup or process behind (the ``clean`` fixture of
test_containers.py counts them before and after).
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tests.integration.test_containers import clean, image  # busybox pulled; nothing left behind
from tests.support.agent import AgentProcess

PS_COLUMNS = ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
#: PID 1 with a USR1 handler; "ready" once the trap is set (a signal before that would be lost)
TRAP = 'trap "echo got; exit 9" USR1; echo ready; while true; do sleep 0.1; done'
LOOP = "while true; do sleep 1; done"
DEFAULT_CAPS = 0xa80425fb
CAP_NET_ADMIN = 1 << 12

__all__ = ["clean", "image"]  # the fixtures of test_containers.py, shared


def _inspect(agent: AgentProcess, name: str) -> dict:
    return json.loads(agent.ok("inspect", "--type", "container", name))[0]


def _wait_for_log(agent: AgentProcess, name: str, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in agent.ok("logs", name):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the logs of {name} after {timeout}s")


def _table(out: str) -> tuple[list[str], list[dict[str, str]]]:
    """A docker table: the header's names, and each row cut at the header's column offsets."""
    lines = out.rstrip("\n").split("\n")
    header = lines[0]
    names = re.split(r" {2,}", header.strip())
    starts = [header.index(n) for n in names]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        rows.append(dict(zip(names, cells)))
    return names, rows


def _cap_eff(out: str) -> int:
    m = re.search(r"^CapEff:\t([0-9a-f]{16})$", out, re.M)
    assert m, out
    return int(m[1], 16)


# --- ps -------------------------------------------------------------------------------


def test_ps_columns_filters_and_formats(agent: AgentProcess, image: str, clean: None) -> None:
    web = agent.ok("run", "-d", "--name", "web", "-l", "tier=front", image, "sh", "-c", LOOP).strip()
    agent.cli("run", "--name", "three", "-l", "tier=back", image, "sh", "-c", "exit 3")
    zero = agent.ok("create", "--name", "zero", image, "true").strip()
    agent.ok("start", "-a", "zero")

    names, rows = _table(agent.ok("ps"))
    assert names == PS_COLUMNS
    assert [r["NAMES"] for r in rows] == ["web"]
    row = rows[0]
    assert row["CONTAINER ID"] == web[:12]
    assert row["IMAGE"] == image
    assert row["COMMAND"] == '"sh -c while true; d…"'  # docker: 19 characters and an ellipsis, quoted
    assert row["STATUS"].startswith("Up ")
    assert row["CREATED"].endswith(" ago")
    assert row["PORTS"] == ""

    names, rows = _table(agent.ok("ps", "-a"))
    assert names == PS_COLUMNS
    assert [r["NAMES"] for r in rows] == ["zero", "three", "web"]  # newest first
    assert rows[1]["STATUS"].startswith("Exited (3) ")
    assert rows[0]["STATUS"].startswith("Exited (0) ")

    assert agent.ok("ps", "-q").split() == [web[:12]]
    assert len(agent.ok("ps", "-aq").split()) == 3
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in agent.ok("ps", "-aq").split())

    no_trunc = agent.ok("ps", "--no-trunc")
    assert web in no_trunc
    assert f'"sh -c {LOOP}"' in no_trunc
    assert agent.ok("ps", "-q", "--no-trunc").split() == [web]
    assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in agent.ok("ps", "-aq", "--no-trunc").split())

    def listed(*args: str) -> list[str]:
        return agent.ok("ps", "--format", "{{.Names}}", *args).split()

    assert listed("--filter", "status=exited") == ["zero", "three"]  # a status filter implies -a
    assert listed("--filter", "status=running") == ["web"]
    assert listed("-a", "--filter", "name=three") == ["three"]
    assert listed("-a", "--filter", "name=nobody") == []
    assert listed("--filter", "label=tier=front") == ["web"]
    assert listed("-a", "--filter", "label=tier") == ["three", "web"]
    assert listed("-a", "--filter", "label=tier=back") == ["three"]
    assert listed("-a", "--filter", "exited=3") == ["three"]
    assert listed("-a", "--filter", "exited=0") == ["zero"]
    assert listed("-a", "--filter", f"id={zero[:6]}") == ["zero"]

    formatted = agent.ok("ps", "-a", "--format", "{{.Names}} {{.Status}}").splitlines()
    assert formatted[0].startswith("zero Exited (0) ") and formatted[0].endswith(" ago")
    assert formatted[1].startswith("three Exited (3) ")
    assert formatted[2].startswith("web Up ")

    docs = [json.loads(line) for line in agent.ok("ps", "-a", "--format", "json").splitlines()]
    assert [d["Names"] for d in docs] == ["zero", "three", "web"]
    assert docs[2]["ID"] == web[:12] and docs[2]["State"] == "running" and docs[2]["Image"] == image
    assert "tier=front" in docs[2]["Labels"].split(",")  # with the image's own labels, as in docker
    assert docs[1]["State"] == "exited" and docs[1]["Status"].startswith("Exited (3)")

    assert [r["NAMES"] for r in _table(agent.ok("ps", "-n", "1"))[1]] == ["zero"]
    assert [r["NAMES"] for r in _table(agent.ok("ps", "-n", "2"))[1]] == ["zero", "three"]
    assert [r["NAMES"] for r in _table(agent.ok("ps", "-l"))[1]] == ["zero"]

    names, rows = _table(agent.ok("ps", "-s"))
    assert names == [*PS_COLUMNS, "SIZE"]
    assert re.fullmatch(r"\d+(\.\d+)?[kMG]?B \(virtual \d+(\.\d+)?[kMG]?B\)", rows[0]["SIZE"]), rows[0]["SIZE"]

    bad = agent.cli("ps", "--filter", "colour=red")
    assert bad.code != 0 and len(bad.err.strip().splitlines()) == 1


# --- inspect, rename -------------------------------------------------------------------


def test_inspect_formats_and_lookups(agent: AgentProcess, image: str, clean: None) -> None:
    agent.cli("run", "--name", "insp", "-e", "A=b", image, "sh", "-c", "exit 3")
    assert agent.ok("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", "insp") == "exited 3\n"
    env = json.loads(agent.ok("inspect", "--format", "{{json .Config.Env}}", "insp"))
    assert "A=b" in env and any(e.startswith("PATH=") for e in env)
    doc = json.loads(agent.ok("container", "inspect", "insp"))
    assert len(doc) == 1 and doc[0]["Name"] == "/insp" and len(doc[0]["Id"]) == 64
    assert agent.ok("container", "inspect", "-f", "{{.Name}}", "insp") == "/insp\n"

    img = json.loads(agent.ok("inspect", image))
    assert img[0]["Id"].startswith("sha256:")
    assert agent.ok("inspect", "-f", "{{.Id}}", image).strip() == img[0]["Id"]

    missing = agent.cli("inspect", "no-such-thing")
    assert missing.code != 0
    assert "No such object: no-such-thing" in missing.err
    assert json.loads(missing.out or "[]") == []
    not_a_container = agent.cli("container", "inspect", image)
    assert not_a_container.code != 0 and "No such container" in not_a_container.err


def test_rename(agent: AgentProcess, image: str, clean: None) -> None:
    cid = agent.ok("create", "--name", "before", image, "echo", "renamed").strip()
    agent.ok("create", "--name", "taken", image, "true")
    assert agent.ok("rename", "before", "after") == ""
    doc = _inspect(agent, "after")
    assert doc["Name"] == "/after" and doc["Id"] == cid
    assert agent.cli("inspect", "--type", "container", "before").code != 0
    started = agent.cli("start", "-a", "after")
    assert started.code == 0 and started.out == "renamed\n"
    assert agent.ok("ps", "-a", "--filter", "name=after", "--format", "{{.Names}}") == "after\n"

    clash = agent.cli("rename", "after", "taken")
    assert clash.code != 0
    assert "already in use" in clash.err and len(clash.err.strip().splitlines()) == 1
    assert _inspect(agent, "after")["Id"] == cid
    assert agent.cli("rename", "nobody-here", "fresh").code != 0


# --- wait, kill, restart, stop, start ---------------------------------------------------


def test_wait_prints_the_exit_code_of_a_later_exit(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "-d", "--name", "later", image, "sh", "-c", "sleep 1; exit 5")
    started = time.monotonic()
    result = agent.cli("wait", "later", timeout=30)
    assert result.code == 0, result.err
    assert result.out == "5\n"
    assert time.monotonic() - started < 15
    assert agent.ok("wait", "later") == "5\n"  # already exited: at once


def test_kill_delivers_the_signal(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "-d", "--name", "trapper", image, "sh", "-c", TRAP)
    _wait_for_log(agent, "trapper", "ready")
    assert agent.ok("kill", "-s", "USR1", "trapper") == "trapper\n"
    assert agent.ok("wait", "trapper", timeout=30) == "9\n"
    assert "got\n" in agent.ok("logs", "trapper")
    assert _inspect(agent, "trapper")["State"]["ExitCode"] == 9

    again = agent.cli("kill", "trapper")
    assert again.code != 0
    assert "is not running" in again.err and len(again.err.strip().splitlines()) == 1


def test_restart_gives_a_new_start_and_keeps_the_name(agent: AgentProcess, image: str, clean: None) -> None:
    cid = agent.ok("run", "-d", "--name", "again", image, "sleep", "1000").strip()
    first = _inspect(agent, "again")["State"]
    assert agent.ok("restart", "-t", "0", "again") == "again\n"
    doc = _inspect(agent, "again")
    assert doc["Id"] == cid and doc["Name"] == "/again"
    assert doc["State"]["Running"] and doc["State"]["Pid"] != first["Pid"]
    assert doc["State"]["StartedAt"] > first["StartedAt"]
    assert agent.ok("ps", "-q", "--no-trunc").split() == [cid]


def test_stop_uses_the_signal_and_timeout_given_at_run(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "-d", "--name", "polite", "--stop-signal", "USR1", image, "sh", "-c", TRAP)
    assert _inspect(agent, "polite")["Config"]["StopSignal"] == "SIGUSR1"
    _wait_for_log(agent, "polite", "ready")
    started = time.monotonic()
    assert agent.ok("stop", "polite") == "polite\n"
    assert time.monotonic() - started < 5  # the trap exits at once: no 10 s grace period spent
    assert _inspect(agent, "polite")["State"]["ExitCode"] == 9
    assert "got\n" in agent.ok("logs", "polite")

    agent.ok("run", "-d", "--name", "stubborn", "--stop-timeout", "1", image, "sleep", "1000")
    config = _inspect(agent, "stubborn")["Config"]
    assert config["StopTimeout"] == 1 and config["StopSignal"] == "SIGTERM"
    started = time.monotonic()
    agent.ok("stop", "stubborn")  # PID 1 ignores SIGTERM: SIGKILL after the 1 s given at run
    elapsed = time.monotonic() - started
    assert 0.8 < elapsed < 6, elapsed
    assert _inspect(agent, "stubborn")["State"]["ExitCode"] == 137


def test_start_runs_an_exited_container_again(agent: AgentProcess, image: str, clean: None) -> None:
    assert agent.ok("run", "--name", "twice", image, "echo", "hi") == "hi\n"
    first = _inspect(agent, "twice")["State"]
    assert agent.ok("start", "twice") == "twice\n"
    assert agent.ok("wait", "twice", timeout=30) == "0\n"
    assert agent.ok("logs", "twice") == "hi\nhi\n"
    state = _inspect(agent, "twice")["State"]
    assert state["Status"] == "exited" and state["StartedAt"] > first["StartedAt"]


def test_create_then_start_attached(agent: AgentProcess, image: str, clean: None) -> None:
    cid = agent.ok("create", "--name", "later", image, "sh", "-c", "echo out; echo err >&2; exit 4").strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid)
    assert _inspect(agent, "later")["State"]["Status"] == "created"
    assert "Created" in agent.ok("ps", "-a", "--filter", "status=created")
    result = agent.cli("start", "-a", "later")
    assert result.code == 4, result.err
    assert result.out == "out\n" and result.err == "err\n"
    assert _inspect(agent, "later")["State"]["ExitCode"] == 4


def test_run_interactive_reads_piped_stdin(agent: AgentProcess, image: str, clean: None) -> None:
    result = agent.cli("run", "-i", "--rm", image, "cat", input=b"hello\n", timeout=30)
    assert result.code == 0, result.err
    assert result.out == "hello\n"
    counted = agent.cli("run", "-i", "--rm", image, "wc", "-l", input=b"a\nb\nc\n", timeout=30)
    assert counted.code == 0 and counted.out.strip() == "3"


# --- prune and aliases -------------------------------------------------------------------


def test_container_prune_removes_only_stopped(agent: AgentProcess, image: str, clean: None) -> None:
    keep = agent.ok("run", "-d", "--name", "keeper", image, "sleep", "1000").strip()
    agent.ok("run", "--name", "done0", image, "true")
    agent.cli("run", "--name", "done1", image, "sh", "-c", "exit 1")
    created = agent.ok("create", "--name", "fresh", image, "true").strip()
    stopped = {_inspect(agent, n)["Id"] for n in ("done0", "done1")} | {created}
    out = agent.ok("container", "prune", "-f")
    lines = out.splitlines()
    assert lines[0] == "Deleted Containers:"
    assert set(lines[1:4]) == stopped
    assert lines[-1].startswith("Total reclaimed space: ")
    assert agent.ok("ps", "-aq", "--no-trunc").split() == [keep]
    nothing = agent.ok("container", "prune", "-f")
    assert "Deleted Containers:" not in nothing and nothing.startswith("Total reclaimed space: 0B")


def test_container_ls_and_rm_aliases(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("create", "--name", "alias", image, "true")
    names, rows = _table(agent.ok("container", "ls", "-a"))
    assert names == PS_COLUMNS and [r["NAMES"] for r in rows] == ["alias"]
    assert agent.ok("container", "list", "-a", "--format", "{{.Names}}") == "alias\n"
    assert agent.ok("container", "rm", "alias") == "alias\n"
    assert agent.ok("container", "ls", "-aq") == ""
    gone = agent.cli("container", "rm", "alias")
    assert gone.code != 0 and "No such container" in gone.err


# --- security and resource flags ---------------------------------------------------------


def test_read_only_root(agent: AgentProcess, image: str, clean: None) -> None:
    script = ("touch /x 2>/dev/null && echo root-rw || echo root-ro; "
              "touch /tmp/x 2>/dev/null && echo tmp-rw || echo tmp-ro; "
              "touch /dev/shm/x && echo shm-rw; echo ok > /dev/null && echo null-ok")
    out = agent.ok("run", "--name", "ro", "--read-only", image, "sh", "-c", script)
    assert out.split() == ["root-ro", "tmp-ro", "shm-rw", "null-ok"]
    assert _inspect(agent, "ro")["HostConfig"]["ReadonlyRootfs"] is True
    out = agent.ok("run", "--rm", image, "sh", "-c", "touch /x && echo root-rw")
    assert out == "root-rw\n"


def test_capabilities(agent: AgentProcess, image: str, clean: None) -> None:
    status = ["grep", "CapEff", "/proc/self/status"]
    assert _cap_eff(agent.ok("run", "--rm", "--cap-drop", "ALL", image, *status)) == 0
    assert "CapEff:\t0000000000000000" in agent.ok("run", "--rm", "--cap-drop", "ALL", image, *status)
    only = _cap_eff(agent.ok("run", "--rm", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", image, *status))
    assert only == CAP_NET_ADMIN
    added = _cap_eff(agent.ok("run", "--rm", "--cap-add", "NET_ADMIN", image, *status))
    assert added == DEFAULT_CAPS | CAP_NET_ADMIN
    dropped = _cap_eff(agent.ok("run", "--rm", "--cap-drop", "CHOWN", image, *status))
    assert dropped == DEFAULT_CAPS & ~1


def test_no_new_privileges(agent: AgentProcess, image: str, clean: None) -> None:
    on = agent.ok("run", "--rm", "--security-opt", "no-new-privileges", image, "grep", "NoNewPrivs", "/proc/self/status")
    assert on == "NoNewPrivs:\t1\n"
    off = agent.ok("run", "--rm", image, "grep", "NoNewPrivs", "/proc/self/status")
    assert off == "NoNewPrivs:\t0\n"


def test_ulimit(agent: AgentProcess, image: str, clean: None) -> None:
    out = agent.ok("run", "--rm", "--ulimit", "nofile=100:200", image, "sh", "-c", "ulimit -n; ulimit -Hn")
    assert out == "100\n200\n"


def test_cpu_and_memory_reservation_flags(agent: AgentProcess, image: str, clean: None) -> None:
    out = agent.ok("run", "--name", "res", "--cpus", "0.5", "--cpuset-cpus", "0", "--memory-reservation", "16m",
                   image, "grep", "Cpus_allowed_list", "/proc/self/status")
    assert out == "Cpus_allowed_list:\t0\n"
    host = _inspect(agent, "res")["HostConfig"]
    assert host["NanoCpus"] == 500000000
    assert host["CpusetCpus"] == "0"
    assert host["MemoryReservation"] == 16 << 20

    refused = agent.cli("run", "--rm", "--cpuset-cpus", "99", image, "true")
    assert refused.code == 125, refused.err
    assert len(refused.err.strip().splitlines()) == 1, refused.err
    assert agent.ok("ps", "-aq", "--filter", "name=res") != ""
    assert len(agent.ok("ps", "-aq").split()) == 1  # the refused one was not left behind


def test_runtime_runc(agent: AgentProcess, image: str, clean: None) -> None:
    if not os.access("/usr/sbin/runc", os.X_OK):
        pytest.skip("needs runc at /usr/sbin/runc (apt-get install runc)")
    result = agent.cli("run", "--name", "viarunc", "--runtime", "runc", image, "echo", "hi")
    assert result.code == 0, result.err
    assert result.out == "hi\n"
    assert _inspect(agent, "viarunc")["HostConfig"]["Runtime"] == "runc"
