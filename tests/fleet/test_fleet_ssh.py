"""The SSH transport across the lab: gRPC through one SSH connection per host to each agent's
unix socket, host keys checked, rolling batches, and `exec -it` on one remote host."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from tests.fleet.lab import Lab
from tests.support.ptydriver import PtyProcess

BIN = Path(sys.executable).parent


def _ssh(lab: Lab) -> list[str]:
    return lab.target_args("ssh", via_inventory=True)


def test_the_fleet_over_ssh(lab: Lab) -> None:
    ref = lab.registry_ref("busybox:1")
    pulled = lab.skiff(*_ssh(lab), "pull", ref)
    assert pulled.code == 0, pulled.err
    assert sorted(line.split()[0] for line in pulled.out.splitlines()) == [h.name for h in lab.hosts]
    ran = lab.skiff(*_ssh(lab), "run", "-d", "--name", "web", ref, "sh", "-c", "echo hello from $(hostname); sleep 60")
    assert ran.code == 0, ran.err
    table = lab.ok(*_ssh(lab), "ps")
    assert table.splitlines()[0].split()[:3] == ["HOST", "CONTAINER", "ID"]
    assert sorted(line.split()[0] for line in table.splitlines()[1:]) == [h.name for h in lab.hosts]
    execd = lab.skiff(*_ssh(lab), "exec", "web", "cat", "/etc/hostname")
    assert execd.code == 0, execd.err
    for host in lab.hosts:
        assert re.search(rf"^{host.name}\s+\| \w+", execd.out, re.M), execd.out
        assert f"{host.name}: exit code 0" in execd.err
    logs = lab.skiff(*_ssh(lab), "logs", "web")
    assert logs.code == 0 and len(re.findall(r"\| hello from", logs.out)) == len(lab.hosts), logs.out
    assert lab.skiff(*_ssh(lab), "rm", "-f", "web").code == 0
    # nothing listens on TCP for this: the agents' sockets are reached through sshd
    assert all(h.ssh_url.startswith("ssh://") for h in lab.hosts)


def test_unknown_and_changed_host_keys_are_refused(lab: Lab, tmp_path: Path) -> None:
    host = lab.hosts[0]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    refused = lab.skiff("-H", host.ssh_url, "--ssh-key", str(lab.ssh_key), "--known-hosts", str(empty), "ps")
    assert refused.code != 0
    assert "host key" in refused.err and "unknown" in refused.err, refused.err
    assert len(refused.err.strip().splitlines()) == 1, refused.err
    assert empty.read_text() == ""  # nothing accepted silently
    accepted = lab.skiff("-H", host.ssh_url, "--ssh-key", str(lab.ssh_key), "--known-hosts", str(empty),
                         "--ssh-accept-new", "ps")
    assert accepted.code == 0, accepted.err
    assert empty.read_text().startswith(f"{host.address} ssh-ed25519 ")
    again = lab.skiff("-H", host.ssh_url, "--ssh-key", str(lab.ssh_key), "--known-hosts", str(empty), "ps")
    assert again.code == 0, again.err
    # a changed key: another host's key on file for this address is refused, even with accept-new
    other = lab.hosts[1]
    forged = tmp_path / "forged"
    line = next(ln for ln in lab.known_hosts.read_text().splitlines() if ln.split()[0] == other.address)
    forged.write_text(line.replace(other.address, host.address, 1) + "\n")
    changed = lab.skiff("-H", host.ssh_url, "--ssh-key", str(lab.ssh_key), "--known-hosts", str(forged),
                        "--ssh-accept-new", "ps")
    assert changed.code != 0 and "does not match" in changed.err, changed.err


def test_a_host_whose_agent_is_down_is_reported_over_ssh(lab: Lab) -> None:
    lab.hosts[2].stop_agent()
    result = lab.skiff(*_ssh(lab), "--retries", "0", "ps")
    assert result.code == 4, result.err
    assert f"{lab.hosts[2].name}: UNREACHABLE: no skiff agent answers at /run/skiff/skiffd.sock" in result.err
    assert "4 OK" in result.err


def test_serial_stops_after_the_failure_budget(lab: Lab) -> None:
    lab.hosts[0].stop_agent()  # first batch of two: one of two fails, 50% > 20%
    started = time.monotonic()
    result = lab.skiff(*_ssh(lab), "--retries", "0", "--serial", "2", "--max-fail-percentage", "20",
                       "--format", "json", "ps")
    assert time.monotonic() - started < 30
    assert result.code == 4 | 16, result.err
    states = {d["host"]: d["status"] for d in json.loads(result.out)}
    assert states == {"host1": "UNREACHABLE", "host2": "OK", "host3": "SKIPPED", "host4": "SKIPPED",
                      "host5": "SKIPPED"}
    within = lab.skiff(*_ssh(lab), "--retries", "0", "--serial", "40%", "--max-fail-percentage", "60", "ps")
    assert within.code == 4, within.err  # every batch ran
    assert "4 OK" in within.err


def test_exec_it_on_one_remote_host_is_interactive(lab: Lab) -> None:
    host = lab.hosts[3]
    target = ["-H", host.ssh_url, "--ssh-key", str(lab.ssh_key), "--known-hosts", str(lab.known_hosts)]
    lab.ok(*target, "run", "-d", "--name", "tty", lab.registry_ref("busybox:1"), "sleep", "600")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKIFF_") or k == "SKIFF_CLIENT_DIR"}
    with PtyProcess.spawn([str(BIN / "skiff"), *target, "exec", "-it", "tty", "sh"], env={**env, "TERM": "xterm"},
                          rows=30, cols=100) as term:
        term.expect(b"# ", timeout=20)
        term.send(b"stty size; hostname\r")
        term.expect(re.compile(rb"30 100\r?\n\w+"))
        term.resize(40, 120)
        term.send(b"stty size\r")
        term.expect(b"40 120")
        term.send(b"sleep 30\r")
        time.sleep(0.5)
        term.send(b"\x03")  # Ctrl-C reaches the job inside, over SSH
        term.expect(b"# ", timeout=10)
        term.send(b"echo rc=$?\r")
        term.expect(b"rc=130")
        term.send(b"exit 4\r")
        assert term.wait(15) == 4


def test_a_retry_file_names_the_hosts_to_try_again(lab: Lab, tmp_path: Path) -> None:
    lab.hosts[4].stop_agent()
    retry = tmp_path / "retry.ini"
    failed = lab.skiff(*_ssh(lab), "--retries", "0", "--retry-file", str(retry), "ps")
    assert failed.code == 4
    lab.hosts[4].start_agent()
    again = lab.skiff("-i", str(retry), "--known-hosts", str(lab.known_hosts), "ps")
    assert again.code == 0, again.err
    assert again.out.splitlines()[0].startswith("CONTAINER ID")  # one host: the one-host output
