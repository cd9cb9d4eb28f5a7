"""The Ansible rollout (ansible/): the real ansible-playbook over SSH against lab hosts that start
without skiffd.  deploy.yml brings up healthy agents with mutual TLS (and ends with `skiff -i
INVENTORY --on HOSTS info`); a second run changes nothing, nor does --check, and --tags verify
runs the health and fleet checks alone; --check on a new host (and a CA still to make) passes and
leaves nothing behind; upgrade.yml with a newer build keeps every running container running and
manageable; a host that fails preflight is reported while the others finish; remove.yml takes the
agent away; ansible-lint passes.

Its own lab of four hosts without agents.  Inside each host a private directory is mounted over
/var/log, so skiffd-service's log stays in the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.lab import BIN, Lab, LabHost

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
#: what each run took, printed at the end of the module (pytest -s)
TIMINGS: dict[str, float] = {}
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


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


def _stop_agent(host: LabHost, timeout: float = 30.0) -> None:
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


class Rollout:
    """The lab, an inventory of its hosts for ansible-playbook and skiff, and a CA of its own."""

    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.ca = work / "ca"
        shutil.copytree(lab.ca_dir, self.ca)  # the lab's CA (its agent certificates too)
        self.inventory = work / "hosts.ini"
        lines = ["[fleet]"]
        for h in lab.hosts:
            lines.append(" ".join([
                h.name, f"ansible_host={h.address}", "ansible_user=root",
                f"ansible_ssh_private_key_file={lab.ssh_key}",
                f"ansible_ssh_common_args='-o UserKnownHostsFile={lab.known_hosts} -o StrictHostKeyChecking=yes'",
                "skiff_port=2376", f"skiff_agent_cgroup_parent={h.cgroup_parent}"]))
        self.inventory.write_text("\n".join(lines) + "\n")
        assert lab.registry is not None
        self.extra = work / "vars.json"
        self.extra.write_text(json.dumps({"skiff_agent_ca_dir": str(self.ca),
                                          "skiff_agent_insecure_registries": [lab.registry.host]}))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SKIFF_", "ANSIBLE_")) or k == "SKIFF_CLIENT_DIR"}
        env.update(ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_HOME=str(self.work / "ansible-home"),
                   ANSIBLE_LOCAL_TEMP=str(self.work / "ansible-tmp"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_FORCE_COLOR="0", PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}")
        return env

    def playbook(self, name: str, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str],
                                                                               dict[str, dict[str, int]]]:
        began = time.monotonic()
        proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(self.inventory), "-e", f"@{self.extra}",
                               str(ANSIBLE / "playbooks" / name), *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env(), stdin=subprocess.DEVNULL, check=False)
        TIMINGS[f"{name} #{sum(1 for k in TIMINGS if k.startswith(name)) + 1}"] = time.monotonic() - began
        recap = {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]), "failed": int(m[4])}
                 for m in RECAP.findall(proc.stdout)}
        return proc, recap

    def skiff(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKIFF_") or k == "SKIFF_CLIENT_DIR"}
        env["SKIFF_CERT_PATH"] = str(self.ca / "clients" / "ansible")
        return subprocess.run([str(BIN / "skiff"), "-i", str(self.inventory), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False)


def _why(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stdout[-6000:] + "\n" + proc.stderr[-2000:]).strip()


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rollout]:
    lab = Lab(4, tmp_path_factory.mktemp("ansible-lab"), agents=False)
    with lab:
        for host in lab.hosts:
            logs = host.dir / "var-log"
            logs.mkdir()
            mounted = host.run("mount", "--bind", str(logs), "/var/log")
            assert mounted.returncode == 0, mounted.stderr
        try:
            yield Rollout(lab, tmp_path_factory.mktemp("ansible-work"))
        finally:
            for host in lab.hosts:
                host.remove_containers()
                _stop_agent(host)
    left = lab.leftovers()
    assert not left, "the lab left behind:\n" + "\n".join(left)
    if TIMINGS:
        print("\nansible timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


def test_check_mode_on_a_new_host_passes_and_changes_nothing(rollout: Rollout) -> None:
    host = rollout.lab.hosts[3]  # fresh (the preflight test uses it later)
    ca = rollout.work / "check-ca"  # a CA the run would make
    proc, recap = rollout.playbook("deploy.yml", "--check", "--limit", host.name, "-e", f"skiff_agent_ca_dir={ca}")
    assert proc.returncode == 0, _why(proc)
    assert recap[host.name]["failed"] == 0 and recap[host.name]["changed"] > 0, recap
    assert not ca.exists()
    assert not host.private("/opt/skiff/venv").exists() and not host.private("/etc/skiff/daemon.toml").exists()
    assert _agent_pid(host) is None


def test_deploy_brings_up_verified_agents_and_a_second_run_changes_nothing(rollout: Rollout) -> None:
    lab = rollout.lab
    hosts = lab.hosts[:3]
    limit = ",".join(h.name for h in hosts)
    first, recap = rollout.playbook("deploy.yml", "--limit", limit)
    assert first.returncode == 0, _why(first)
    assert set(recap) >= {h.name for h in hosts} and all(recap[h.name]["changed"] > 0 for h in hosts), recap
    assert "skiffd 0.1.0, 0 containers" in first.stdout, _why(first)
    for h in hosts:
        pid = _agent_pid(h)
        assert pid is not None, h.name
        assert os.readlink(f"/proc/{pid}/ns/mnt") in h.namespaces  # it runs inside the host
        assert h.private("/etc/skiff/tls/key.pem").stat().st_mode & 0o777 == 0o600
        assert "Ansible managed" in h.private("/etc/skiff/daemon.toml").read_text()
        assert h.private("/opt/skiff/bin/skiffd-service").is_file()  # no systemd here: the fallback
    assert "BEGIN" not in first.stdout  # no key material in the log

    again, recap = rollout.playbook("deploy.yml", "--limit", limit)
    assert again.returncode == 0, _why(again)
    assert all(recap[h.name]["changed"] == 0 for h in hosts), _why(again)
    pids = {h.name: _agent_pid(h) for h in hosts}

    checked, recap = rollout.playbook("deploy.yml", "--limit", limit, "--check")
    assert checked.returncode == 0, _why(checked)
    assert all(recap[h.name]["changed"] == 0 and recap[h.name]["failed"] == 0 for h in hosts), _why(checked)

    verified, recap = rollout.playbook("deploy.yml", "--limit", limit, "--tags", "verify")
    assert verified.returncode == 0, _why(verified)
    assert "Wait until skiffd answers gRPC health over mutual TLS" in verified.stdout, _why(verified)
    assert "TASK [skiff_agent : Install" not in verified.stdout, _why(verified)  # verify alone
    assert "skiffd 0.1.0, 0 containers" in verified.stdout, _why(verified)  # the fleet check ran too
    assert all(recap[h.name]["changed"] == 0 for h in hosts), _why(verified)
    assert {h.name: _agent_pid(h) for h in hosts} == pids  # nothing restarted

    ran = rollout.skiff("--on", limit, "run", "-d", "--name", "web", lab.registry_ref("busybox:1"), "sleep", "600")
    assert ran.returncode == 0, ran.stderr
    listed = rollout.skiff("--on", limit, "ps", "--format", "{{.Names}} {{.Status}}")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [["web", "Up"]] * 3, listed.stdout


def _newer_checkout(work: Path, version: str) -> Path:
    """A copy of this checkout's sources with another version number: "a newer build"."""
    src = work / f"skiff-{version}"
    if src.exists():
        return src
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for top in ("agent", "controller", "protos"):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for rel in ("pyproject.toml", "agent/__init__.py", "controller/__init__.py"):
        path = src / rel
        text = path.read_text()
        assert '"0.1.0"' in text, rel
        path.write_text(text.replace('"0.1.0"', f'"{version}"', 1))
    return src


def test_upgrade_keeps_containers_running_and_managed(rollout: Rollout) -> None:
    lab = rollout.lab
    hosts = lab.hosts[:3]
    limit = ",".join(h.name for h in hosts)
    if any(_agent_pid(h) is None for h in hosts):
        deployed, _ = rollout.playbook("deploy.yml", "--limit", limit)
        assert deployed.returncode == 0, _why(deployed)
    ran = rollout.skiff("--on", limit, "run", "-d", "--name", "keeper", lab.registry_ref("busybox:1"), "sleep", "900")
    assert ran.returncode == 0, ran.stderr
    before = {h.name: _agent_pid(h) for h in hosts}
    inspected = rollout.skiff("--on", limit, "inspect", "-f", "{{.State.Pid}}", "keeper")
    assert inspected.returncode == 0, inspected.stderr
    shims = sorted(line.split()[-1] for line in inspected.stdout.splitlines())

    newer = _newer_checkout(rollout.work, "0.1.1")
    upgraded, recap = rollout.playbook("upgrade.yml", "--limit", limit, "-e", f"skiff_agent_source_dir={newer}",
                                       "-e", "skiff_upgrade_serial=2")
    assert upgraded.returncode == 0, _why(upgraded)
    assert upgraded.stdout.count("PLAY [Upgrade skiffd a batch at a time]") == 2  # batches of 2: 2 + 1
    assert "skiffd 0.1.1" in upgraded.stdout, _why(upgraded)
    for h in hosts:
        assert _agent_pid(h) not in (None, before[h.name]), h.name  # a new agent
    versions = rollout.skiff("--on", limit, "version", "-f", "{{.Server.Version}}")
    assert versions.returncode == 0, versions.stderr
    assert [line.split()[-1] for line in versions.stdout.splitlines()] == ["0.1.1"] * 3, versions.stdout

    # the containers never stopped (same processes), and the new agents manage them
    again = rollout.skiff("--on", limit, "inspect", "-f", "{{.State.Pid}} {{.State.Status}}", "keeper")
    assert again.returncode == 0, again.stderr
    assert sorted(line.split()[-2] for line in again.stdout.splitlines()) == shims, again.stdout
    assert all(line.endswith("running") for line in again.stdout.splitlines()), again.stdout
    stopped = rollout.skiff("--on", limit, "stop", "-t", "1", "keeper")
    assert stopped.returncode == 0, stopped.stderr
    removed = rollout.skiff("--on", limit, "rm", "keeper")
    assert removed.returncode == 0, removed.stderr


def test_a_host_that_fails_preflight_is_reported_and_the_others_finish(rollout: Rollout) -> None:
    lab = rollout.lab
    bad, good = lab.hosts[3], lab.hosts[:3]
    fake = bad.dir / "filesystems"
    fake.write_text("".join(line for line in Path("/proc/filesystems").read_text().splitlines(keepends=True)
                            if "overlay" not in line))
    assert bad.run("mount", "--bind", str(fake), "/proc/filesystems").returncode == 0
    newer = _newer_checkout(rollout.work, "0.1.1")  # what the others run after the upgrade test: no change there
    try:
        proc, recap = rollout.playbook("deploy.yml", "-e", f"skiff_agent_source_dir={newer}")
    finally:
        bad.run("umount", "/proc/filesystems")
    assert proc.returncode == 2, _why(proc)
    assert recap[bad.name]["failed"] == 1, recap
    assert all(recap[h.name]["failed"] == 0 and recap[h.name]["unreachable"] == 0 for h in good), recap
    assert f"{bad.name}: the kernel cannot run skiff's containers: no overlay filesystem" in proc.stdout
    assert _agent_pid(bad) is None and not bad.private("/opt/skiff/venv").exists()  # nothing installed there
    # the fleet check ran for the hosts still standing
    assert proc.stdout.count("skiffd 0.1.1, ") == 3, _why(proc)


def test_remove_takes_the_agent_away(rollout: Rollout) -> None:
    lab = rollout.lab
    host = lab.hosts[2]
    assert _agent_pid(host) is not None or rollout.playbook("deploy.yml", "--limit", host.name)[0].returncode == 0
    proc, recap = rollout.playbook("remove.yml", "--limit", host.name, "-e", "skiff_agent_remove_data=true")
    assert proc.returncode == 0, _why(proc)
    assert recap[host.name]["changed"] > 0
    assert _agent_pid(host) is None
    assert list(host.private("/opt/skiff").iterdir()) == []
    assert not host.private("/etc/skiff/daemon.toml").exists()
    again, recap = rollout.playbook("remove.yml", "--limit", host.name)
    assert again.returncode == 0 and recap[host.name]["changed"] == 0, _why(again)


def test_ansible_lint_passes() -> None:
    lint = BIN / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed (scripts/setup.sh installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["ANSIBLE_CONFIG"] = str(ANSIBLE / "ansible.cfg")
    proc = subprocess.run([str(lint), "--offline", "--profile", "production", "--nocolor"], cwd=ANSIBLE,
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
