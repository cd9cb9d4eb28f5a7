"""The skiff_agent role's templates rendered with its defaults: daemon.toml is what skiffd's own
loader accepts, the systemd unit is containerd's shape, skiffd-service is valid sh, and every
variable the defaults set is declared in meta/argument_specs.yml."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from agent.config import load_config

ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "skiff_agent"


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
    for line in ("Delegate=yes", "KillMode=process", "Restart=on-failure", "TasksMax=infinity"):
        assert f"\n{line}\n" in unit
    assert "ProtectSystem" not in unit.replace("no ProtectSystem", "")


def test_skiffd_service_is_valid_sh(tmp_path: Path) -> None:
    script = tmp_path / "skiffd-service"
    script.write_text(_render("skiffd-service.j2"))
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True).returncode == 0
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
