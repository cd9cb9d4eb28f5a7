"""The skiff_agent role's templates rendered with its defaults: daemon.toml is what skiffd's own
loader accepts (with no key twice), the systemd unit is containerd's shape, skiffd-service is valid
POSIX sh (dash) that starts, restarts and stops a stand-in skiffd one at a time, and every variable
the defaults set is declared in meta/argument_specs.yml.  The task files: nothing delegated to the
control node asks for become there, no run_once under a per-host condition, and the plays keep
handlers and the --tags verify fleet check."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from agent.config import _KEYS, load_config

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
ROLE = ANSIBLE / "roles" / "skiff_agent"


def _vars(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    values.update(ansible_managed="Ansible managed", skiff_agent_port=2376, skiff_agent_address="10.0.0.5",
                  inventory_hostname="web1")
    values.update(overrides)
    derived: dict[str, str] = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    env = _env()
    for _ in range(3):  # derived values refer to each other
        for key, template in derived.items():
            values[key] = env.from_string(template).render(values) if isinstance(template, str) else template
    return values


def _env() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["to_json"] = json.dumps
    env.filters["expanduser"] = lambda p: str(Path(p).expanduser())
    env.filters["bool"] = bool
    env.globals["lookup"] = lambda *a, **k: ""
    return env


def _render(name: str, **overrides: Any) -> str:
    return _env().from_string((ROLE / "templates" / name).read_text()).render(_vars(**overrides))


@pytest.mark.parametrize("tls", [True, False])
def test_daemon_toml_loads_in_skiffd(tmp_path: Path, tls: bool) -> None:
    (tmp_path / "tls").mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):  # the loader checks they exist
        (tmp_path / "tls" / name).write_text("")
    text = _render("daemon.toml.j2", skiff_agent_tls=tls, skiff_agent_config_dir=str(tmp_path), skiff_agent_insecure_registries=["10.0.0.9:5000"],
                   skiff_agent_cgroup_parent="/fleet", skiff_agent_config={"max-concurrent-downloads": 5})
    assert text.startswith("# Ansible managed\n")
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    config = load_config(path, {})
    assert config.data_root == Path("/var/lib/skiff")
    assert config.cgroup_parent == "/fleet" and config.max_concurrent_downloads == 5
    assert list(config.insecure_registries) == ["10.0.0.9:5000"]
    assert list(config.hosts) == (["unix:///run/skiff/skiffd.sock", "tcp://0.0.0.0:2376"] if tls
                                  else ["unix:///run/skiff/skiffd.sock"])
    assert config.tlsverify is tls


def test_an_unknown_extra_key_is_refused_by_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(_render("daemon.toml.j2", skiff_agent_config={"no-such-key": 1}))
    with pytest.raises(Exception, match="no-such-key"):
        load_config(path, {})


def test_systemd_unit_is_shaped_like_containerds() -> None:
    unit = _render("skiffd.service.j2")
    assert "ExecStart=/opt/skiff/venv/bin/skiffd --config-file /etc/skiff/daemon.toml\n" in unit
    for line in ("Delegate=yes", "KillMode=process", "Restart=on-failure", "TasksMax=infinity", "LimitNOFILE=1048576"):
        assert f"\n{line}\n" in unit
    assert "ProtectSystem" not in unit.replace("no ProtectSystem", "")


def test_skiffd_service_is_valid_sh(tmp_path: Path) -> None:
    script = tmp_path / "skiffd-service"
    script.write_text(_render("skiffd-service.j2"))
    for shell in ("sh", "dash"):  # Debian's /bin/sh is dash
        if shell == "dash" and not shutil.which("dash"):
            continue
        checked = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{shell} -n: {checked.stderr}"
    assert "ulimit -u" not in script.read_text()  # dash has no -u
    usage = subprocess.run(["sh", str(script), "bogus"], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop|restart|status" in usage.stderr
    status = subprocess.run(["sh", str(script), "status"], capture_output=True, text=True)
    assert status.returncode == 3 and status.stdout == "skiffd is not running\n"


def test_every_default_is_declared_in_the_argument_specs() -> None:
    defaults = set(yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()))
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    declared = set(specs["main"]["options"]) | set(specs["remove"]["options"])
    assert defaults - declared == set()
    assert declared - defaults == set()


@pytest.mark.parametrize("role_sets", ["all", "least"])
def test_daemon_toml_takes_no_key_twice_from_extra_config(tmp_path: Path, role_sets: str) -> None:
    """skiff_agent_config with every key skiffd knows: the keys the role writes from its own
    variables keep the role's values, the others come from skiff_agent_config, each once."""
    (tmp_path / "tls").mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / "tls" / name).write_text("")
    extra: dict[str, Any] = {
        "data-root": "/elsewhere", "exec-root": "/elsewhere/run", "hosts": ["unix:///elsewhere.sock"],
        "group": "ops", "insecure-registries": ["10.9.9.9:5000"], "certs-dir": "/etc/skiff/other-certs",
        "max-concurrent-downloads": 7, "log-level": "debug", "log-format": "json", "shutdown-timeout": 99,
        "cgroup-parent": "/other", "tlsverify": False, "tlscacert": str(tmp_path / "tls" / "ca.pem"),
        "tlscert": str(tmp_path / "tls" / "cert.pem"), "tlskey": str(tmp_path / "tls" / "key.pem"),
        "allow-insecure-tcp": False}
    assert set(extra) == set(_KEYS)
    own: dict[str, Any] = {"skiff_agent_tls": True, "skiff_agent_insecure_registries": ["10.0.0.9:5000"],
                           "skiff_agent_cgroup_parent": "/fleet"} if role_sets == "all" else {"skiff_agent_tls": False}
    text = _render("daemon.toml.j2", skiff_agent_config_dir=str(tmp_path), skiff_agent_run_dir="/run/skiff-test",
                   skiff_agent_config=extra, **own)
    keys = [line.split(" = ", 1)[0] for line in text.splitlines() if line and not line.startswith("#") and " = " in line]
    assert sorted(keys) == sorted(set(keys)) == sorted(_KEYS)  # every key once
    doc = tomllib.loads(text)
    written = {"hosts", "exec-root", "data-root", "log-level", "shutdown-timeout"}
    assert doc["exec-root"] == "/run/skiff-test"  # the run dir (socket and pidfile) is skiffd's exec-root
    assert doc["data-root"] == "/var/lib/skiff" and doc["log-level"] == "info" and doc["shutdown-timeout"] == 15
    if role_sets == "all":
        written |= {"tlsverify", "tlscacert", "tlscert", "tlskey", "insecure-registries", "cgroup-parent"}
        assert doc["tlsverify"] is True and doc["tlscert"] == str(tmp_path / "tls" / "cert.pem")
        assert doc["insecure-registries"] == ["10.0.0.9:5000"] and doc["cgroup-parent"] == "/fleet"
        assert doc["hosts"] == ["unix:///run/skiff-test/skiffd.sock", "tcp://0.0.0.0:2376"]
    else:
        assert doc["hosts"] == ["unix:///run/skiff-test/skiffd.sock"]
    assert {k: v for k, v in doc.items() if k not in written} == {k: v for k, v in extra.items() if k not in written}
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    config = load_config(path, {})
    assert config.exec_root == Path("/run/skiff-test") and config.group == "ops"


# --- the task files ----------------------------------------------------------------------


def _tasks(items: list[dict[str, Any]] | None, blocks: tuple[dict[str, Any], ...] = ()) -> Iterator[
        tuple[dict[str, Any], tuple[dict[str, Any], ...]]]:
    """Every task in ``items`` with the blocks around it, blocks themselves included."""
    for item in items or []:
        yield item, blocks
        for key in ("block", "rescue", "always"):
            if key in item:
                yield from _tasks(item[key], (*blocks, item))


def _all_tasks() -> Iterator[tuple[str, dict[str, Any], tuple[dict[str, Any], ...]]]:
    for path in [*sorted((ROLE / "tasks").glob("*.yml")), ROLE / "handlers" / "main.yml"]:
        for task, blocks in _tasks(yaml.safe_load(path.read_text())):
            yield path.name, task, blocks
    for path in sorted((ANSIBLE / "playbooks").glob("*.yml")):
        for play in yaml.safe_load(path.read_text()):
            for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                for task, blocks in _tasks(play.get(section)):
                    yield path.name, task, blocks


def test_tasks_delegated_to_the_control_node_do_not_become_root_there() -> None:
    delegated = [(name, task) for name, task, _ in _all_tasks() if task.get("delegate_to") in ("localhost", "127.0.0.1")]
    assert len(delegated) >= 8  # preflight, install, configure (4), verify, fleet
    assert [f"{name}: {task['name']}" for name, task in delegated if task.get("become") is not False] == []


def test_no_run_once_under_a_per_host_condition() -> None:
    """run_once decides for every host by the first one's condition (the CA steps: throttle)."""
    wrong = [f"{name}: {task['name']}" for name, task, blocks in _all_tasks()
             if task.get("run_once") and any("when" in b for b in blocks)]
    assert wrong == []


def test_the_checks_that_need_a_running_agent_are_skipped_in_check_mode() -> None:
    for name in ("verify.yml", "fleet.yml"):
        for task, _ in _tasks(yaml.safe_load((ROLE / "tasks" / name).read_text())):
            when = task.get("when", [])
            assert "not ansible_check_mode" in ([when] if isinstance(when, str) else when), f"{name}: {task['name']}"


def test_the_run_dir_gets_the_mode_skiffd_gives_it() -> None:
    tasks = yaml.safe_load((ROLE / "tasks" / "configure.yml").read_text())
    loop = next(t["loop"] for t in tasks if t["name"] == "Make the agent's directories")
    assert {"path": "{{ skiff_agent_run_dir }}", "mode": "0711"} in loop


@pytest.mark.parametrize("name", ["deploy.yml", "upgrade.yml"])
def test_plays_force_handlers_and_tag_the_fleet_check(name: str) -> None:
    rollout, fleet = yaml.safe_load((ANSIBLE / "playbooks" / name).read_text())
    assert rollout["force_handlers"] is True
    [include] = fleet["tasks"]
    assert include["ansible.builtin.include_role"]["tasks_from"] == "fleet.yml"
    assert "verify" in include["tags"] and "verify" in include["ansible.builtin.include_role"]["apply"]["tags"]


# --- skiffd-service with a stand-in skiffd -----------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _running(fake: Path) -> list[int]:
    """The live processes running ``fake`` (a zombie is not one)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(fake).encode() in argv and _alive(int(entry)):
            found.append(int(entry))
    return found


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """skiffd-service rendered for paths in tmp_path, whose skiffd is a stand-in shell script
    (written by the test); every stand-in still running at the end is killed."""
    for tool in ("start-stop-daemon", "flock"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            pytest.skip(f"{tool} is not installed")
    fake = tmp_path / "opt" / "venv" / "bin" / "skiffd"
    fake.parent.mkdir(parents=True)
    script = tmp_path / "skiffd-service"
    try:
        yield script, fake
    finally:
        for pid in _running(fake):
            os.kill(pid, signal.SIGKILL)


def _write_service(tmp_path: Path, script: Path, fake: Path, body: str, **overrides: Any) -> None:
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    script.write_text(_render("skiffd-service.j2", skiff_agent_root=str(tmp_path / "opt"),
                              skiff_agent_run_dir=str(tmp_path / "run"), skiff_agent_log_dir=str(tmp_path / "log"),
                              skiff_agent_config_dir=str(tmp_path / "etc"), **overrides))


def _call(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def test_skiffd_service_starts_restarts_and_stops_one_at_a_time(tmp_path: Path, service: tuple[Path, Path]) -> None:
    script, fake = service
    _write_service(tmp_path, script, fake, "trap 'exit 0' TERM\nwhile :; do sleep 0.05; done\n")
    started = _call(script, "start")
    assert started.returncode == 0 and started.stdout.startswith("skiffd started (pid "), started
    [first] = _running(fake)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o711
    # two restarts at once: the lock has them take turns, and one skiffd runs after them
    both = [subprocess.Popen(["sh", str(script), "restart"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL) for _ in range(2)]
    for proc in both:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out, err)
    [now] = _running(fake)
    assert now != first and not _alive(first)
    assert _call(script, "status").stdout == f"skiffd is running (pid {now})\n"
    stopped = _call(script, "stop")
    assert stopped.returncode == 0 and stopped.stdout == f"skiffd stopped (pid {now})\n", stopped
    assert _running(fake) == [] and not (tmp_path / "run" / "skiffd.pid").exists()
    assert _call(script, "status").returncode == 3
    again = _call(script, "stop")
    assert again.returncode == 0 and again.stdout == "skiffd is not running\n"


def test_skiffd_service_kills_a_skiffd_that_ignores_sigterm(tmp_path: Path, service: tuple[Path, Path]) -> None:
    script, fake = service
    # shutdown-timeout -9: SIGKILL after 1 s (the script waits shutdown-timeout + 10 s)
    _write_service(tmp_path, script, fake, "trap '' TERM\nwhile :; do sleep 0.05; done\n",
                   skiff_agent_shutdown_timeout=-9)
    assert _call(script, "start").returncode == 0
    [pid] = _running(fake)
    began = time.monotonic()
    stopped = _call(script, "stop")
    assert stopped.returncode == 0, stopped
    assert "did not stop within 1s: SIGKILL" in stopped.stderr and stopped.stdout == f"skiffd stopped (pid {pid})\n"
    assert not _alive(pid) and time.monotonic() - began < 10
