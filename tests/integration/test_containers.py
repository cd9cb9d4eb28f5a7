"""Containers end to end: the real skiff CLI against a real skiffd, shims, namespaces, cgroups.

Every test leaves no container, mount, cgroup or process behind (the
``clean`` fixture counts them before and after).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess
from tests.support.ptydriver import PtyProcess
from tests.support.registry import Registry


@pytest.fixture(scope="module")
def image(agent: AgentProcess, registry: Registry) -> str:
    ref = f"{registry.host}/busybox:1"
    agent.ok("pull", "-q", ref)
    return ref


@pytest.fixture
def clean(agent: AgentProcess) -> Iterator[None]:
    before = agent.leftovers()
    yield
    agent.remove_all_containers()
    agent.leftovers().assert_same_as(before)


def _inspect(agent: AgentProcess, name: str) -> dict:
    return json.loads(agent.ok("inspect", "--type", "container", name))[0]


def test_run_prints_output_and_returns_the_exit_code(agent: AgentProcess, image: str, clean: None) -> None:
    result = agent.cli("run", "--name", "hello", image, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.code == 3, result.err
    assert result.out == "out\n"
    assert result.err == "err\n"
    doc = _inspect(agent, "hello")
    assert doc["State"]["Status"] == "exited"
    assert doc["State"]["ExitCode"] == 3
    assert doc["Path"] == "sh" and doc["Args"] == ["-c", "echo out; echo err >&2; exit 3"]
    assert agent.ok("logs", "hello") == "out\n"
    logs = agent.cli("logs", "hello")
    assert logs.err == "err\n"


def test_exit_codes_for_commands_that_cannot_run(agent: AgentProcess, image: str, clean: None) -> None:
    missing = agent.cli("run", "--rm", image, "no-such-command")
    assert missing.code == 127, missing.err
    assert "executable file not found" in missing.err
    assert len(missing.err.strip().splitlines()) == 1
    not_exec = agent.cli("run", "--rm", image, "/etc/passwd")
    assert not_exec.code == 126, not_exec.err
    bad_flag = agent.cli("run", "--rm", "--memory", "lots", image, "true")
    assert bad_flag.code == 125 and "invalid" in bad_flag.err
    unknown = agent.cli("run", "--rm", "127.0.0.1:1/nothing:here", "true")
    assert unknown.code == 125


def test_isolation_defaults(agent: AgentProcess, image: str, clean: None) -> None:
    script = ("grep CapEff /proc/self/status; echo pid=$$; hostname; "
              "echo timer_list=$(wc -c < /proc/timer_list); echo firmware=$(ls /sys/firmware | wc -l); "
              "touch /proc/sys/kernel/x 2>&1 || echo ro-sys; ls /dev | tr '\\n' ' '")
    out = agent.ok("run", "--rm", "--hostname", "box", image, "sh", "-c", script)
    assert "CapEff:\t00000000a80425fb" in out
    assert "pid=1" in out
    assert "\nbox\n" in out
    assert "timer_list=0\n" in out  # masked: /dev/null bound over it
    assert "firmware=0\n" in out  # masked: an empty read-only tmpfs
    assert "ro-sys" in out
    devs = set(out.strip().splitlines()[-1].split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue"} <= devs
    assert not devs & {"sda", "vda", "mem", "kmsg"}


def test_seccomp_default_and_unconfined(agent: AgentProcess, image: str, clean: None) -> None:
    confined = agent.ok("run", "--rm", image, "grep", "Seccomp:", "/proc/self/status")
    assert confined.split() == ["Seccomp:", "2"]
    nnp = agent.ok("run", "--rm", "--security-opt", "no-new-privileges", image, "grep", "-E",
                   "Seccomp:|NoNewPrivs:", "/proc/self/status")
    assert "NoNewPrivs:\t1" in nnp and "Seccomp:\t2" in nnp
    unconfined = agent.ok("run", "--rm", "--security-opt", "seccomp=unconfined", image,
                          "grep", "Seccomp:", "/proc/self/status")
    assert unconfined.split() == ["Seccomp:", "0"]


def test_exec(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "-d", "--name", "target", "-e", "FROM_RUN=1", image, "sleep", "1000")
    out = agent.ok("exec", "-e", "EXTRA=2", "-w", "/tmp", "target", "sh", "-c",
                   "echo $FROM_RUN $EXTRA $(pwd) $$; grep -E 'CapEff|Seccomp:' /proc/self/status")
    words = out.split()
    assert words[:3] == ["1", "2", "/tmp"] and int(words[3]) > 1
    assert "00000000a80425fb" in out and "Seccomp:\t2" in out
    assert agent.cli("exec", "target", "sh", "-c", "exit 42").code == 42
    missing = agent.cli("exec", "target", "no-such-command")
    assert missing.code == 127 and len(missing.err.strip().splitlines()) == 1
    assert agent.ok("exec", "-u", "app", "target", "id", "-u") == "1000\n"
    assert agent.ok("exec", "-i", "target", "cat", input=b"piped\n") == "piped\n"
    agent.ok("exec", "-d", "target", "sh", "-c", "echo detached > /tmp/flag")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and agent.cli("exec", "target", "cat", "/tmp/flag").out != "detached\n":
        time.sleep(0.05)
    assert agent.ok("exec", "target", "cat", "/tmp/flag") == "detached\n"
    agent.ok("stop", "-t", "0", "target")
    stopped = agent.cli("exec", "target", "true")
    assert stopped.code != 0 and "not running" in stopped.err


def test_detached_lifecycle(agent: AgentProcess, image: str, clean: None) -> None:
    cid = agent.ok("run", "-d", "--name", "sleeper", image, "sleep", "1000").strip()
    assert len(cid) == 64
    ps = agent.ok("ps")
    assert "sleeper" in ps and cid[:12] in ps and "Up " in ps
    assert agent.ok("ps", "-q") .split() == [cid[:12]]
    doc = _inspect(agent, "sleeper")
    assert doc["State"]["Running"] and doc["State"]["Pid"] > 0
    assert Path(f"/proc/{doc['State']['Pid']}").exists()
    rm = agent.cli("rm", "sleeper")
    assert rm.code != 0 and "container is running" in rm.err
    started = time.monotonic()
    agent.ok("stop", "-t", "1", "sleeper")  # PID 1 ignores SIGTERM: killed after 1 s
    assert time.monotonic() - started < 10
    doc = _inspect(agent, "sleeper")
    assert doc["State"]["Status"] == "exited" and doc["State"]["ExitCode"] == 137
    assert "Exited (137)" in agent.ok("ps", "-a", "--filter", "name=sleeper")
    agent.ok("start", "sleeper")
    assert _inspect(agent, "sleeper")["State"]["Running"]
    agent.ok("rm", "-f", "sleeper")
    assert agent.cli("inspect", "sleeper").code != 0


def test_rm_flag_removes_the_container(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "--rm", "--name", "gone", image, "true")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "gone" in agent.ok("ps", "-a"):
        time.sleep(0.05)
    assert "gone" not in agent.ok("ps", "-a")


def test_name_conflict_is_one_line(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("create", "--name", "twin", image, "true")
    again = agent.cli("create", "--name", "twin", image, "true")
    assert again.code == 125 and "already in use" in again.err
    assert len(again.err.strip().splitlines()) == 1


def test_memory_limit_oom_kill_is_reported(agent: AgentProcess, image: str, clean: None) -> None:
    result = agent.cli("run", "--name", "hog", "--memory", "32m", image,
                       "dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1")
    assert result.code == 137, result.err
    state = _inspect(agent, "hog")["State"]
    assert state["OOMKilled"] is True and state["ExitCode"] == 137


def test_pids_limit_stops_a_fork_bomb(agent: AgentProcess, image: str, clean: None) -> None:
    out = agent.cli("run", "--rm", "--pids-limit", "10", image, "sh", "-c",
                    "for i in $(seq 30); do sleep 2 & done 2>&1; wait; echo done")
    assert "can't fork" in out.out + out.err or "Resource temporarily unavailable" in out.out + out.err


def test_env_user_workdir_and_entrypoint(agent: AgentProcess, image: str, clean: None, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("FROM_FILE=1\n# comment\n")
    out = agent.ok("run", "--rm", "-e", "A=b", "--env-file", str(env_file), "-u", "app", "-w", "/tmp",
                   image, "sh", "-c", "echo $A $FROM_FILE; id -u; id -g; pwd")
    assert out.split() == ["b", "1", "1000", "1000", "/tmp"]
    out = agent.ok("run", "--rm", "--entrypoint", "echo", image, "hi", "there")
    assert out == "hi there\n"
    bad_user = agent.cli("run", "--rm", "-u", "nobody-here", image, "true")
    assert bad_user.code != 0 and "unable to find user" in bad_user.err


def test_network_none_and_host(agent: AgentProcess, image: str, clean: None) -> None:
    none = agent.ok("run", "--rm", image, "cat", "/proc/net/dev")
    assert "lo:" in none and "eth0" not in none
    host = agent.ok("run", "--rm", "--network", "host", image, "cat", "/proc/net/dev")
    assert host.count(":") >= none.count(":")
    bridge = agent.cli("run", "--rm", "--network", "bridge", image, "true")
    assert bridge.code == 125


def test_init_reaps_and_forwards(agent: AgentProcess, image: str, clean: None) -> None:
    out = agent.ok("run", "--rm", "--init", image, "sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '")
    assert out.startswith("/sbin/docker-init -- sh")


def test_live_restore(fresh_agent: AgentProcess, registry: Registry) -> None:
    agent = fresh_agent
    before = agent.leftovers()
    ref = f"{registry.host}/busybox:1"
    agent.ok("pull", "-q", ref)
    agent.ok("run", "-d", "--name", "keeps", ref, "sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); "
             "sleep 0.1; done")
    agent.ok("run", "-d", "--name", "ends", ref, "sh", "-c", "sleep 1; echo bye; exit 7")
    pid = _inspect(agent, "keeps")["State"]["Pid"]
    agent.kill9()
    time.sleep(2)  # "ends" exits while the agent is down; "keeps" keeps logging
    assert Path(f"/proc/{pid}").exists()
    agent.start()
    keeps = _inspect(agent, "keeps")["State"]
    assert keeps["Running"] and keeps["Pid"] == pid
    ends = _inspect(agent, "ends")["State"]
    assert ends["Status"] == "exited" and ends["ExitCode"] == 7
    assert "bye" in agent.ok("logs", "ends")
    ticks = agent.ok("logs", "keeps").split("\n")
    assert len(ticks) > 15
    assert agent.ok("exec", "keeps", "echo", "still managed") == "still managed\n"
    agent.ok("stop", "-t", "1", "keeps")
    assert _inspect(agent, "keeps")["State"]["ExitCode"] == 137
    agent.remove_all_containers()
    agent.leftovers().assert_same_as(before)


def _pty(agent: AgentProcess, *args: str) -> PtyProcess:
    import os
    import sys

    return PtyProcess.spawn([str(Path(sys.executable).parent / "skiff"), *args],
                            env={**os.environ, "SKIFF_HOST": agent.host, "TERM": "xterm"}, rows=30, cols=100)


def test_exec_it_is_a_real_terminal(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "-d", "--name", "tty-target", image, "sleep", "1000")
    with _pty(agent, "exec", "-it", "tty-target", "sh") as term:
        term.expect(b"# ")
        term.send(b"stty size; tty\r")
        term.expect(re.compile(rb"30 100\r?\n/dev/pts/\d+"))
        term.resize(40, 120)
        term.send(b"stty size\r")
        term.expect(b"40 120")
        term.send(b"sleep 30\r")
        time.sleep(0.3)
        term.send(b"\x03")  # Ctrl-C reaches the foreground job inside, not the CLI
        term.expect(b"^C")
        term.expect(b"# ", timeout=5)
        term.send(b"echo rc=$?\r")
        term.expect(b"rc=130")
        term.send(b"exit 3\r")
        assert term.wait(10) == 3


def test_run_it_and_detach(agent: AgentProcess, image: str, clean: None) -> None:
    with _pty(agent, "run", "-it", "--name", "interactive", image, "sh") as term:
        term.expect(b"# ")
        term.send(b"echo $((6*7)); tty\r")
        term.expect(re.compile(rb"42\r\n/dev/pts/0"))
        term.send(b"\x10\x11")  # Ctrl-P Ctrl-Q
        assert term.wait(10) == 0
    assert _inspect(agent, "interactive")["State"]["Running"]
    with _pty(agent, "attach", "interactive") as term:
        term.send(b"echo again\r")
        term.expect(b"again")
        term.send(b"exit 5\r")
        assert term.wait(10) == 5
    assert _inspect(agent, "interactive")["State"]["ExitCode"] == 5


def test_top_lists_the_container_processes(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "-d", "--name", "topped", image, "sh", "-c", "sleep 1000 & sleep 999; true")
    deadline = time.monotonic() + 5
    out = ""
    while time.monotonic() < deadline and "sleep 1000" not in out:
        out = agent.ok("top", "topped")
        time.sleep(0.05)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["UID", "PID", "PPID"]
    commands = [line.split(None, 7)[-1] for line in lines[1:]]
    assert sorted(commands) == ["sh -c sleep 1000 & sleep 999; true", "sleep 1000", "sleep 999"]
    custom = agent.ok("top", "topped", "-o", "pid,comm").splitlines()
    assert custom[0].split() == ["PID", "COMMAND"] and len(custom) == 4


def test_an_image_in_use_is_kept(agent: AgentProcess, registry: Registry, clean: None) -> None:
    ref = f"{registry.host}/busybox:1"
    agent.ok("pull", "-q", ref)
    agent.ok("run", "-d", "--name", "user-running", ref, "sleep", "1000")
    agent.ok("create", "--name", "user-stopped", ref, "true")
    running = agent.cli("rmi", "-f", ref)
    assert running.code != 0 and "being used by running container" in running.err
    agent.ok("rm", "-f", "user-running")
    stopped = agent.cli("rmi", ref)
    assert stopped.code != 0 and "(must force)" in stopped.err
    assert agent.ok("images", "-q")
    assert "Untagged" in agent.ok("rmi", "-f", ref)
    assert agent.ok("images", "-q").strip(), "the image stays (dangling) while a container needs it"
    assert agent.ok("start", "-a", "user-stopped") == ""
    agent.ok("rm", "user-stopped")
    agent.ok("image", "prune", "-f")
    assert not agent.ok("images", "-aq").strip()
    agent.ok("pull", "-q", ref)  # leave the module's image in place for the other tests


def test_resource_flags_reach_the_cgroup(agent: AgentProcess, image: str, clean: None) -> None:
    """Read the limits from inside (the cgroup namespace shows the container's own cgroup)."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    files = (["cpu.max", "cpuset.cpus", "memory.max", "memory.low", "pids.max"] if v2 else
             ["cpu/cpu.cfs_quota_us", "cpuset/cpuset.cpus", "memory/memory.limit_in_bytes",
              "memory/memory.soft_limit_in_bytes", "pids/pids.max"])
    out = agent.ok("run", "--rm", "--cpus", "0.5", "--cpuset-cpus", "0", "--memory", "64m",
                   "--memory-reservation", "16m", "--pids-limit", "10", image,
                   "cat", *(f"/sys/fs/cgroup/{f}" for f in files))
    values = out.split("\n")
    if v2:
        assert values[:5] == ["50000 100000", "0", str(64 << 20), str(16 << 20), "10"]
    else:
        assert values[:5] == ["50000", "0", str(64 << 20), str(16 << 20), "10"]
    default = agent.ok("run", "--rm", image, "cat", "/sys/fs/cgroup/" + ("pids.max" if v2 else "pids/pids.max"))
    assert default.strip() == "4096"


def test_pid_host_and_privileged_nsenter(agent: AgentProcess, image: str, clean: None) -> None:
    import socket

    host_init = Path("/proc/1/comm").read_text()
    assert agent.ok("run", "--rm", "--pid", "host", image, "cat", "/proc/1/comm") == host_init
    assert agent.ok("run", "--rm", image, "cat", "/proc/1/comm") == "cat\n"
    # the cheatsheet's way into the host: nsenter into a host process's namespaces (PID 1 here is
    # a sandbox's init that even the host's root may not enter, so this test's own process)
    import os

    out = agent.ok("run", "--rm", "--privileged", "--pid=host", image, "busybox", "nsenter", "-t", str(os.getpid()),
                   "-m", "-u", "-n", "-i", "hostname")
    assert out.strip() == socket.gethostname()
    assert agent.ok("run", "--rm", "--uts", "host", image, "hostname").strip() == socket.gethostname()
    bad = agent.cli("run", "--rm", "--pid", "container:x", image, "true")
    assert bad.code == 125 and len(bad.err.strip().splitlines()) == 1


def test_restart_sweeps_what_a_crash_left(fresh_agent: AgentProcess, registry: Registry) -> None:
    agent = fresh_agent
    ref = f"{registry.host}/busybox:1"
    agent.ok("pull", "-q", ref)
    keep = agent.ok("create", "--name", "kept", ref, "true").strip()
    agent.kill9()
    orphan = "f" * 64
    for root in (agent.data_root / "containers", agent.exec_root / "containers"):
        (root / orphan).mkdir(parents=True, exist_ok=True)
        (root / orphan / "leftover").write_text("x")
    agent.start()
    assert not (agent.data_root / "containers" / orphan).exists()
    assert not (agent.exec_root / "containers" / orphan).exists()
    assert (agent.data_root / "containers" / keep).is_dir()
    assert agent.ok("start", "-a", "kept") == ""


def _shim_cmdline(agent: AgentProcess, container_id: str) -> str:
    pid = int((agent.exec_root / "containers" / container_id / "shim.pid").read_text())
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_a_long_running_container_gets_a_small_monitor(agent: AgentProcess, image: str, clean: None) -> None:
    """After a couple of seconds the shim execs itself into the small monitor; everything still works."""
    cid = agent.ok("run", "-d", "-i", "--name", "steady", image, "sh", "-c",
                   "while read line; do echo got $line; done").strip()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "agent.shim.monitor" not in _shim_cmdline(agent, cid):
        time.sleep(0.1)
    assert "agent.shim.monitor" in _shim_cmdline(agent, cid)
    assert agent.ok("exec", "steady", "echo", "exec ok") == "exec ok\n"
    with _pty(agent, "attach", "steady") as term:
        term.send(b"ping\r")
        term.expect(b"got ping")
        term.send(b"\x04")  # EOF: without StdinOnce the container's stdin stays open (docker's rule)
        term.send(b"")
    # leaving (the CLI killed) detaches; the container runs on
    assert _inspect(agent, "steady")["State"]["Running"]
    assert "got ping" in agent.ok("logs", "steady")
    agent.ok("stop", "-t", "1", "steady")
    assert _inspect(agent, "steady")["State"]["Status"] == "exited"
