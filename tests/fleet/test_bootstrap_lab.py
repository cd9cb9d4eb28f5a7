"""`skiff bootstrap` onto lab hosts that have sshd and python3 but no skiffd: the agent installed
from wheels copied over SSH, configured, started detached (no systemd here) and answering; a
second run changes nothing; a configuration change restarts it and containers live on, one the
agent would refuse changes nothing; an unknown host key or a missing python3-venv stops it
before anything is installed.

Its own lab of two hosts without agents (not the shared five-host ``lab`` fixture).  Inside each
host a private directory is mounted over /var/log, so the agent's log stays in the host.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.lab import Lab, LabHost

#: what each run took, printed at the end of the module (pytest -s)
TIMINGS: dict[str, float] = {}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _agent_pid(host: LabHost) -> int | None:
    try:
        pid = int(host.private("/run/skiff/skiffd.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _stop_bootstrapped_agent(host: LabHost, timeout: float = 30.0) -> None:
    """SIGTERM the agent bootstrap started in the host (by its pidfile), and wait for it to end."""
    pid = _agent_pid(host)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += 5
        time.sleep(0.05)


@pytest.fixture(scope="module")
def bare_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(2, tmp_path_factory.mktemp("bootstrap-lab"), agents=False)
    with lab:
        for host in lab.hosts:
            logs = host.dir / "var-log"
            logs.mkdir()
            mounted = host.run("mount", "--bind", str(logs), "/var/log")
            assert mounted.returncode == 0, mounted.stderr
        try:
            yield lab
        finally:
            for host in lab.hosts:
                host.remove_containers()
                _stop_bootstrapped_agent(host)
    left = lab.leftovers()
    assert not left, "the lab left behind:\n" + "\n".join(left)
    if TIMINGS:
        print("\nbootstrap timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in TIMINGS.items()))


def _ssh_args(lab: Lab, host: LabHost, known_hosts: Path | None = None) -> list[str]:
    return ["-H", host.ssh_url, "--ssh-key", str(lab.ssh_key), "--known-hosts", str(known_hosts or lab.known_hosts)]


def _config(lab: Lab, host: LabHost) -> list[str]:
    """What the lab needs of an agent: its cgroups where teardown looks, and the lab registry."""
    assert lab.registry is not None
    return ["--config", f"cgroup-parent={host.cgroup_parent}", "--config", f"insecure-registries={lab.registry.host}"]


def _nothing_installed(host: LabHost) -> None:
    assert list(host.private("/opt/skiff").iterdir()) == []
    assert [p.name for p in host.private("/etc/skiff").iterdir()] == ["lab-host"]
    assert _agent_pid(host) is None


def test_bootstrap_installs_and_starts_the_agent_and_a_second_run_changes_nothing(bare_lab: Lab) -> None:
    lab, host = bare_lab, bare_lab.hosts[0]
    assert not host.private("/etc/skiff/daemon.toml").exists() and _agent_pid(host) is None
    began = time.monotonic()
    first = lab.skiff(*_ssh_args(lab, host), "bootstrap", *_config(lab, host), cert=None, timeout=300)
    TIMINGS["cold bootstrap (wheels cached or built)"] = time.monotonic() - began
    assert first.code == 0, first.err
    assert first.out == f"{host.ssh_url}\tchanged\n"
    assert first.err.strip().splitlines()[-1].startswith("1 OK, 0 FAILED")
    pid = _agent_pid(host)
    assert pid is not None
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"/opt/skiff/venv/bin/skiffd" in argv
    assert os.readlink(f"/proc/{pid}/ns/mnt") in host.namespaces  # it runs in the host, not here
    assert host.private("/opt/skiff/wheels/manifest.json").is_file()
    assert "skiffd started" in host.run("cat", "/var/log/skiff/skiffd.log").stdout

    listed = lab.skiff(*_ssh_args(lab, host), "ps", cert=None)
    assert listed.code == 0, listed.err
    assert listed.out.startswith("CONTAINER ID")

    began = time.monotonic()  # through the inventory this time: the host's inventory name labels it
    again = lab.skiff("-i", str(lab.inventory("ssh")), "--on", host.name, "--known-hosts", str(lab.known_hosts),
                      "bootstrap", *_config(lab, host), cert=None)
    TIMINGS["second bootstrap"] = time.monotonic() - began
    assert again.code == 0, again.err
    assert again.out == f"{host.name}\tok\n"
    assert _agent_pid(host) == pid


def test_a_config_change_restarts_the_agent_and_its_containers_live_on(bare_lab: Lab) -> None:
    lab, host = bare_lab, bare_lab.hosts[0]
    base = lab.skiff(*_ssh_args(lab, host), "bootstrap", *_config(lab, host), cert=None, timeout=300)
    assert base.code == 0, base.err
    before = _agent_pid(host)
    ssh = _ssh_args(lab, host)
    ran = lab.skiff(*ssh, "run", "-d", "--name", "survivor", lab.registry_ref("busybox:1"), "sleep", "600", cert=None)
    assert ran.code == 0, ran.err

    began = time.monotonic()
    tls = lab.skiff(*ssh, "bootstrap", *_config(lab, host), "--tls", "--ca-dir", str(lab.ca_dir), cert=None)
    TIMINGS["bootstrap --tls (restart)"] = time.monotonic() - began
    assert tls.code == 0, tls.err
    assert tls.out == f"{host.ssh_url}\tchanged\n"
    after = _agent_pid(host)
    assert after is not None and after != before
    key = host.private("/etc/skiff/tls/key.pem")
    assert key.stat().st_mode & 0o777 == 0o600
    assert host.private("/etc/skiff/tls/ca.pem").read_bytes() == (lab.ca_dir / "ca.pem").read_bytes()
    # mutual TLS on tcp://ADDR:2376 with the lab's admin certificate, and the container lived on
    table = lab.skiff("-H", host.grpc_url, "ps", "--format", "{{.Names}} {{.Status}}", cert="admin")
    assert table.code == 0, table.err
    assert table.out.startswith("survivor Up"), table.out

    again = lab.skiff(*ssh, "--format", "json", "bootstrap", *_config(lab, host), "--tls", "--ca-dir",
                      str(lab.ca_dir), cert=None)
    assert again.code == 0, again.err
    assert '"changed": false' in again.out and _agent_pid(host) == after

    config = host.private("/etc/skiff/daemon.toml").read_text()  # one skiffd would refuse: nothing changes
    refused = lab.skiff(*ssh, "bootstrap", *_config(lab, host), "--tls", "--ca-dir", str(lab.ca_dir), "--config",
                        "tlsverify=false", cert=None)
    assert refused.code == 2, refused.err
    assert refused.err.splitlines()[0].startswith(f"{host.ssh_url}: FAILED: skiffd on {host.ssh_url} refuses the new "
                                                  "/etc/skiff/daemon.toml (the old one stays): refusing to listen on "
                                                  "tcp://0.0.0.0:2376 without mutual TLS"), refused.err
    assert host.private("/etc/skiff/daemon.toml").read_text() == config and _agent_pid(host) == after
    assert lab.skiff(*ssh, "rm", "-f", "survivor", cert=None).code == 0


def test_an_unknown_host_key_is_refused_and_nothing_is_installed(bare_lab: Lab, tmp_path: Path) -> None:
    lab, host = bare_lab, bare_lab.hosts[1]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    refused = lab.skiff(*_ssh_args(lab, host, empty), "bootstrap", *_config(lab, host), cert=None)
    assert refused.code == 4, refused.err
    assert refused.out == ""
    lines = refused.err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("0 OK, 0 FAILED, 1 UNREACHABLE"), refused.err
    assert lines[0].startswith(f"{host.ssh_url}: UNREACHABLE: SSH host key of root@{host.address}:22 is unknown")
    assert empty.read_text() == ""
    _nothing_installed(host)


def test_a_host_without_python3_venv_is_told_what_to_install(bare_lab: Lab) -> None:
    lab, host = bare_lab, bare_lab.hosts[1]
    hidden = host.dir / "no-ensurepip"
    hidden.mkdir()
    assert host.run("mount", "--bind", str(hidden), "/usr/lib/python3.11/ensurepip").returncode == 0
    try:
        failed = lab.skiff(*_ssh_args(lab, host), "bootstrap", *_config(lab, host), cert=None)
    finally:
        host.run("umount", "/usr/lib/python3.11/ensurepip")
    assert failed.code == 2, failed.err
    assert failed.err.strip().splitlines()[0] == (
        f"{host.ssh_url}: FAILED: python3-venv missing on {host.ssh_url}: apt-get install python3-venv")
    _nothing_installed(host)


def test_the_ssh_transport_installs_a_missing_agent_with_bootstrap(bare_lab: Lab) -> None:
    lab, host = bare_lab, bare_lab.hosts[1]
    _nothing_installed(host)
    ssh = _ssh_args(lab, host)
    without = lab.skiff(*ssh, "--retries", "0", "ps", cert=None)
    assert without.code != 0
    assert f"no skiff agent answers at /run/skiff/skiffd.sock on {host.ssh_url}" in without.err, without.err
    assert "--bootstrap installs it" in without.err
    _nothing_installed(host)

    began = time.monotonic()
    listed = lab.skiff(*ssh, "--bootstrap", "ps", "--format", "{{.Names}}", cert=None, timeout=300)
    TIMINGS["ps --bootstrap onto a bare host"] = time.monotonic() - began
    assert listed.code == 0, listed.err
    assert listed.out == ""
    pid = _agent_pid(host)
    assert pid is not None
    assert os.readlink(f"/proc/{pid}/ns/mnt") in host.namespaces

    again = lab.skiff(*ssh, "--bootstrap", "ps", cert=None)  # an agent answers: nothing is installed again
    assert again.code == 0, again.err
    assert again.out.startswith("CONTAINER ID") and _agent_pid(host) == pid
