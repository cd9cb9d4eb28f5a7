"""Five hosts, each its own network and mount namespace with a real skiffd and sshd, driven
through the real ``skiff`` CLI from the root side: the fleet as a user sees it.

Targets are ``-i INVENTORY --on lab`` once the CLI has inventories, ``-H tcp://ADDR:2376`` per
host until then (``Lab.target_args``); output is labelled with the inventory name or the URL, and
``LabHost.labels`` holds both.  Every test removes its containers (and the conftest restarts
agents and removes containers a failed test left).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.lab import BIN, MARKER, Lab, LabError, LabHost
from tests.support.agent import Result

IMAGE = "busybox:1"


def _fleet(lab: Lab, *args: str, cert: str | Path | None = "admin", timeout: float = 120) -> Result:
    """``skiff <every host> ARGS`` as ``cert``."""
    return lab.skiff(*lab.target_args(), *args, cert=cert, timeout=timeout)


def _is(line: str, host: LabHost) -> bool:
    """Whether an output line belongs to ``host`` (starts with one of its labels, then a separator)."""
    return any(line.startswith(label) and line[len(label):len(label) + 1] in (" ", "\t", ":", "|")
               for label in host.labels)


def _lines_of(text: str, host: LabHost) -> list[str]:
    return [line for line in text.splitlines() if _is(line, host)]


def _after_label(line: str, host: LabHost) -> str:
    label = next(lbl for lbl in host.labels if line.startswith(lbl))
    return line[len(label):].lstrip(" \t:|")


def _column(text: str, host: LabHost) -> list[str]:
    """What follows ``host``'s label on each of its lines."""
    return [_after_label(line, host) for line in _lines_of(text, host)]


def _status(err: str, host: LabHost) -> str:
    """The state the fan-out summary gave ``host`` (OK when it has no line of its own)."""
    for line in _lines_of(err, host):
        for state in ("FAILED", "UNREACHABLE", "TIMEOUT", "SKIPPED"):
            if _after_label(line, host).startswith(state):
                return state
    return "OK"


@pytest.fixture
def running(lab: Lab) -> Iterator[str]:
    """A container named ``fleet-sleeper`` running on every host."""
    ref = lab.registry_ref(IMAGE)
    pulled = _fleet(lab, "pull", "-q", ref)
    assert pulled.code == 0, pulled.err
    ran = _fleet(lab, "run", "-d", "--name", "fleet-sleeper", ref, "sleep", "1000")
    assert ran.code == 0, ran.err
    yield "fleet-sleeper"
    _fleet(lab, "rm", "-f", "fleet-sleeper")


def test_pull_run_ps_logs_stop_rm_on_every_host(lab: Lab) -> None:
    ref = lab.registry_ref(IMAGE)
    pulled = _fleet(lab, "pull", ref)
    assert pulled.code == 0, pulled.err
    assert "5 OK" in pulled.err
    for host in lab.hosts:
        assert len(_lines_of(pulled.out, host)) == 1, pulled.out
    try:
        ran = _fleet(lab, "run", "-d", "--name", "fleet-web", ref, "sh", "-c", "echo web up; exec sleep 1000")
        assert ran.code == 0, ran.err
        for host in lab.hosts:
            (line,) = _lines_of(ran.out, host)
            assert len(_after_label(line, host)) == 64, line  # the container's full id
        ps = _fleet(lab, "ps", "--filter", "name=fleet-web")
        assert ps.code == 0, ps.err
        lines = ps.out.splitlines()
        assert lines[0].split()[:3] == ["HOST", "CONTAINER", "ID"], ps.out
        for host in lab.hosts:
            (row,) = _lines_of(ps.out, host)
            assert row.split()[-1] == "fleet-web" and " Up " in row, ps.out
        logs = _fleet(lab, "logs", "fleet-web")
        assert logs.code == 0, logs.err
        for host in lab.hosts:
            assert _column(logs.out, host) == ["web up"], logs.out
        stopped = _fleet(lab, "stop", "-t", "0", "fleet-web")
        assert stopped.code == 0, stopped.err
        assert all(len(_lines_of(stopped.out, h)) == 1 for h in lab.hosts), stopped.out
        exited = _fleet(lab, "ps", "-a", "--filter", "name=fleet-web", "--format", "{{.Host}}\t{{.Status}}")
        assert exited.code == 0, exited.err
        for host in lab.hosts:
            (status,) = _column(exited.out, host)
            assert status.startswith("Exited ("), exited.out
        removed = _fleet(lab, "rm", "fleet-web")
        assert removed.code == 0, removed.err
        gone = _fleet(lab, "ps", "-aq", "--filter", "name=fleet-web")
        assert gone.code == 0 and gone.out.strip() == "", gone.out
    finally:
        _fleet(lab, "rm", "-f", "fleet-web")


def test_logs_follow_ends_when_every_container_has(lab: Lab) -> None:
    ref = lab.registry_ref(IMAGE)
    try:
        ran = _fleet(lab, "run", "-d", "--name", "fleet-talker", ref, "sh", "-c",
                     "for i in 1 2 3; do echo line $i; sleep 0.2; done; echo oops >&2")
        assert ran.code == 0, ran.err
        started = time.monotonic()
        followed = _fleet(lab, "logs", "-f", "fleet-talker", timeout=60)
        assert followed.code == 0, followed.err
        assert time.monotonic() - started < 30
        for host in lab.hosts:
            assert _column(followed.out, host) == \
                ["line 1", "line 2", "line 3"], followed.out
            assert _column(followed.err, host) == ["oops"], followed.err
    finally:
        _fleet(lab, "rm", "-f", "fleet-talker")


def test_exec_on_every_host_prefixes_output(lab: Lab, running: str) -> None:
    result = _fleet(lab, "exec", running, "echo", "hi")
    assert result.code == 0, result.err
    for host in lab.hosts:
        assert _column(result.out, host) == ["hi"], result.out
    failing = _fleet(lab, "exec", running, "sh", "-c", "exit 3")
    assert failing.code == 2, failing.err
    assert all(_status(failing.err, h) == "FAILED" for h in lab.hosts), failing.err


def test_a_killed_agent_is_unreachable_and_the_others_answer(lab: Lab, running: str) -> None:
    dead = lab.hosts[2]
    dead.kill_agent()
    started = time.monotonic()
    result = _fleet(lab, "--connect-timeout", "2", "ps", "-q")
    took = time.monotonic() - started
    assert result.code == 4, result.err
    assert _status(result.err, dead) == "UNREACHABLE", result.err
    assert "4 OK" in result.err and "1 UNREACHABLE" in result.err
    assert not _lines_of(result.out, dead)
    assert all(len(_lines_of(result.out, h)) == 1 for h in lab.hosts if h is not dead), result.out
    assert took < 30
    dead.start_agent()  # live-restore: its container ran on without it
    again = _fleet(lab, "ps", "--filter", f"name={running}", "--format", "{{.Host}}\t{{.Status}}")
    assert again.code == 0, again.err
    for host in lab.hosts:
        (status,) = _column(again.out, host)
        assert status.startswith("Up"), again.out


def test_a_frozen_agent_never_stalls_the_others(lab: Lab, running: str) -> None:
    frozen = lab.hosts[1]
    frozen.freeze_agent()
    try:
        started = time.monotonic()
        result = _fleet(lab, "--connect-timeout", "1", "--timeout", "3", "ps", "-q")
        took = time.monotonic() - started
    finally:
        frozen.thaw_agent()
    assert result.code in (4, 8), result.err
    assert _status(result.err, frozen) in ("UNREACHABLE", "TIMEOUT"), result.err
    assert "4 OK" in result.err
    assert all(len(_lines_of(result.out, h)) == 1 for h in lab.hosts if h is not frozen), result.out
    assert took < 15, f"took {took:.1f}s"
    thawed = _fleet(lab, "ps", "-q")
    assert thawed.code == 0 and len(thawed.out.splitlines()) == len(lab.hosts), thawed.err


def test_a_frozen_agent_is_a_timeout_within_the_timeout(lab: Lab) -> None:
    frozen = lab.hosts[3]
    frozen.freeze_agent()
    try:
        started = time.monotonic()
        result = _fleet(lab, "--timeout", "3", "ps", "-q")
        took = time.monotonic() - started
    finally:
        frozen.thaw_agent()
    assert _status(result.err, frozen) == "TIMEOUT", result.err
    assert result.code == 8, result.err
    assert took < 15, f"took {took:.1f}s"


def test_a_viewer_may_list_but_not_run_or_exec(lab: Lab, running: str) -> None:
    listed = _fleet(lab, "ps", "--format", "{{.Host}}\t{{.Names}}", cert="viewer")
    assert listed.code == 0, listed.err
    assert all(_column(listed.out, h) == [running] for h in lab.hosts), listed.out
    ran = _fleet(lab, "run", "-d", "--name", "fleet-viewer-run", lab.registry_ref(IMAGE), "true", cert="viewer")
    assert ran.code == 2, ran.err
    for host in lab.hosts:
        assert _status(ran.err, host) == "FAILED" and "may not call Containers/Create" in ran.err, ran.err
    assert _fleet(lab, "ps", "-aq", "--filter", "name=fleet-viewer-run").out.strip() == ""
    for host in lab.hosts[:2]:
        denied = lab.skiff("-H", host.grpc_url, "exec", running, "touch", "/tmp/viewer-was-here", cert="viewer")
        assert denied.code != 0 and len(denied.err.strip().splitlines()) == 1, denied.err
        assert "may not call Containers/Exec" in denied.err, denied.err
        looked = lab.skiff("-H", host.grpc_url, "exec", running, "ls", "/tmp")
        assert looked.code == 0 and "viewer-was-here" not in looked.out, looked.err


def test_a_denied_exec_always_says_why(lab: Lab, running: str) -> None:
    for _ in range(10):
        denied = lab.skiff("-H", lab.hosts[0].grpc_url, "exec", running, "true", cert="viewer")
        assert denied.code != 0 and "may not call Containers/Exec" in denied.err, denied.err


@pytest.fixture(scope="module")
def bad_certs(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Client certificate dirs that must be refused: another CA's, an expired one, none at all."""
    root = tmp_path_factory.mktemp("bad-certs")
    lab.ok("ca", "init", "--dir", str(root / "other-ca"), cert=None)
    lab.ok("ca", "client-cert", "mallory", "--role", "admin", "--dir", str(root / "other-ca"), cert=None)
    foreign = root / "foreign"
    foreign.mkdir()
    shutil.copy(lab.ca_dir / "ca.pem", foreign / "ca.pem")  # trusts the lab's agents; its own cert is not theirs
    for name in ("cert.pem", "key.pem"):
        shutil.copy(root / "other-ca" / "clients" / "mallory" / name, foreign / name)
    lab.ok("ca", "client-cert", "expired", "--role", "admin", "--days", "0", "--dir", str(lab.ca_dir), cert=None)
    (root / "none").mkdir()
    return {"foreign": foreign, "expired": lab.ca_dir / "clients" / "expired", "none": root / "none"}


@pytest.mark.parametrize("kind", ["foreign", "expired", "none"])
def test_bad_client_certificates_are_refused_with_one_clear_line(lab: Lab, bad_certs: dict[str, Path],
                                                                 kind: str) -> None:
    host = lab.hosts[0]
    result = lab.skiff("-H", host.grpc_url, "ps", cert=bad_certs[kind], env={"HOME": str(bad_certs["none"])},
                       timeout=60)
    assert result.code != 0 and result.out == "", result
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "TLS" in result.err, result.err
    if kind != "none":
        assert "refused the client certificate" in result.err, result.err
    # a short --connect-timeout: how long a refusal takes in fan-out is test_a_refused_certificate_is_named_...
    fleet = _fleet(lab, "--connect-timeout", "1", "ps", "-q", cert=bad_certs[kind], timeout=90)
    assert fleet.code != 0 and fleet.out.strip() == "", fleet
    assert all(_status(fleet.err, h) != "OK" for h in lab.hosts), fleet.err


def test_a_refused_certificate_is_named_as_such_on_every_host(lab: Lab, bad_certs: dict[str, Path]) -> None:
    started = time.monotonic()
    fleet = _fleet(lab, "ps", "-q", cert=bad_certs["expired"], timeout=90)
    took = time.monotonic() - started
    assert all(len(_lines_of(fleet.err, h)) == 1 for h in lab.hosts), fleet.err
    assert fleet.err.count("refused the client certificate") == len(lab.hosts), fleet.err
    assert took < 10, f"took {took:.1f}s"


def test_each_host_has_its_own_sshd_and_private_files(lab: Lab, tmp_path: Path) -> None:
    for host in lab.hosts:
        seen = lab.ssh(host, "cat", MARKER, "&&", "hostname", "&&", "ls", "/run/skiff")
        assert seen.returncode == 0, seen.stderr
        marker, hostname, *run_skiff = seen.stdout.split()
        assert (marker, hostname) == (host.name, host.name)
        assert "skiffd.sock" in run_skiff
    empty = tmp_path / "known_hosts"
    empty.touch()
    refused = lab.ssh(lab.hosts[0], "true", known_hosts=empty)
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr, refused.stderr
    swapped = tmp_path / "swapped"  # host1's address with host2's key
    kind_blob = lab.known_hosts.read_text().splitlines()[1].split(maxsplit=1)[1]
    swapped.write_text(f"{lab.hosts[0].address} {kind_blob}\n")
    changed = lab.ssh(lab.hosts[0], "true", known_hosts=swapped)
    assert changed.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in changed.stderr, changed.stderr


def test_each_host_keeps_its_agent_state_mounts_and_cgroups_to_itself(lab: Lab, running: str) -> None:
    ids = {}
    for host in lab.hosts:
        out = lab.skiff("-H", host.unix_url, "ps", "-q", "--no-trunc", cert=None)
        assert out.code == 0, out.err
        (ids[host.name],) = out.out.split()
    assert len(set(ids.values())) == len(lab.hosts)  # five agents, five containers
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        root_mounts = f.read()
    for host in lab.hosts:
        cid = ids[host.name]
        inside = host.run("cat", "/proc/self/mountinfo")
        assert inside.returncode == 0, inside.stderr
        assert cid in inside.stdout and " /var/lib/skiff " in inside.stdout
        assert cid not in root_mounts  # the overlays live in the host's mount namespace only
        assert any(Path("/sys/fs/cgroup").glob(f"*{host.cgroup_parent}/*{cid}*")), host.cgroup_parent
        own_socket = host.run("stat", "-c", "%i", "/run/skiff/skiffd.sock")
        assert int(own_socket.stdout) == host.private("/run/skiff/skiffd.sock").stat().st_ino
    assert not Path("/run/skiff/skiffd.sock").exists() or all(
        Path("/run/skiff/skiffd.sock").stat().st_ino != h.private("/run/skiff/skiffd.sock").stat().st_ino
        for h in lab.hosts)


@pytest.mark.parametrize("via_inventory", [True, False], ids=["inventory", "urls"])
def test_the_ssh_transport_reaches_every_agent(lab: Lab, running: str, via_inventory: bool) -> None:
    listed = lab.skiff(*lab.target_args("ssh", via_inventory=via_inventory), "ps", "--format",
                       "{{.Host}}\t{{.Names}}")
    assert listed.code == 0, listed.err
    assert all(_column(listed.out, h) == [running] for h in lab.hosts), listed.out


def test_the_inventories_name_every_host_for_ansible(lab: Lab) -> None:
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    for transport in ("grpc", "ssh"):
        inventory = InventoryManager(loader=DataLoader(), sources=[str(lab.inventory(transport))])
        hosts = inventory.get_groups_dict()["lab"]
        assert hosts == [h.name for h in lab.hosts]
        for host in lab.hosts:
            found = inventory.get_host(host.name).get_vars()
            assert found["ansible_host"] == host.address and found["ansible_user"] == "root"
            assert found["ansible_ssh_private_key_file"] == str(lab.ssh_key)
            assert int(found["skiff_port"]) == 2376
            assert found.get("skiff_transport", "grpc") == transport


def test_a_lab_that_fails_half_way_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = LabHost.start_agent

    def start_agent(self: LabHost, timeout: float = 30.0) -> None:
        real_start(self, timeout)
        if self.index == 2:
            raise LabError("injected: host2's agent start fails")

    monkeypatch.setattr(LabHost, "start_agent", start_agent)
    broken = Lab(2, tmp_path)
    with pytest.raises(LabError, match="injected"):
        broken.start()
    assert broken.teardown_errors == []
    assert broken.leftovers() == []


def test_a_bare_host_has_sshd_and_no_agent_until_one_is_installed(tmp_path: Path) -> None:
    with Lab(2, tmp_path, agents=[True, False]) as small:
        bare = small.hosts[1]
        assert bare.agent_pid is None and not bare.private("/etc/skiff/daemon.toml").exists()
        missing = small.skiff("-H", bare.grpc_url, "--connect-timeout", "1", "--retries", "0", "ps")
        assert missing.code != 0, missing
        # what a bootstrap would do: config and certificates in place, skiffd started over ssh
        bare.write_agent_config()
        started = small.ssh(bare, f"setsid -f {BIN / 'skiffd'} --log-format json </dev/null "
                                  ">>/var/lib/skiff/skiffd.out 2>&1")
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 30
        while small.skiff("-H", bare.grpc_url, "version").code != 0:
            assert time.monotonic() < deadline, bare.private("/var/lib/skiff/skiffd.out").read_text()
            time.sleep(0.2)
        ran = small.skiff("-H", bare.grpc_url, "run", "-d", small.registry_ref(IMAGE), "sleep", "1000")
        assert ran.code == 0, ran.err
        assert small.ok("-H", bare.grpc_url, "ps", "-q").split() == [ran.out.strip()[:12]]
    assert small.teardown_errors == []
    assert small.leftovers() == []  # the agent it did not start, and its container, are gone too
