"""Tests for the container CLI helpers (run/create flags, ps rows) and the agent's config_dict."""

from __future__ import annotations

import json
import time
from typing import Any

import click
import pytest
from skiff.v1 import containers_pb2 as pb

from agent.api.containers import config_dict
from agent.errors import InvalidArgument
from controller.commands.containers import container_rows, status_text
from controller.commands.run import build_config, container_options, parse_bytes, parse_ulimit
from controller.errors import UsageError


@click.command(context_settings={"allow_interspersed_args": False})
@container_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def _capture(image: str, command: tuple[str, ...], **o: Any) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    return image, command, o


def parsed(*args: str) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """What click hands ``run``/``create`` for ``skiff run ARGS``."""
    result = _capture.main(list(args), standalone_mode=False)
    assert isinstance(result, tuple)
    return result


def config(*args: str) -> pb.ContainerConfig:
    image, command, o = parsed(*args)
    return build_config(image, command, o)


# --- parse_bytes ------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("32m", 32 << 20), ("1g", 1 << 30), ("512k", 512 << 10), ("1024", 1024), ("1.5g", 3 << 29),
    ("32M", 32 << 20), ("32mb", 32 << 20), ("32MiB", 32 << 20), ("100b", 100), ("2t", 2 << 40), ("0", 0),
    (" 64m ", 64 << 20),
])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text, "--memory") == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "1x", "m", "1.2.3", "1gg", "0x10"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_bytes(text, "--shm-size")
    assert "--shm-size" in str(info.value)
    assert "invalid size" in str(info.value)
    assert info.value.exit_code == 125


# --- parse_ulimit -----------------------------------------------------------


def test_parse_ulimit_soft_only_sets_both() -> None:
    u = parse_ulimit("nofile=1024")
    assert (u.name, u.soft, u.hard) == ("nofile", 1024, 1024)


def test_parse_ulimit_soft_and_hard() -> None:
    u = parse_ulimit("nofile=1024:2048")
    assert (u.name, u.soft, u.hard) == ("nofile", 1024, 2048)
    assert (parse_ulimit("core=-1:-1").soft, parse_ulimit("core=-1:-1").hard) == (-1, -1)


def test_parse_ulimit_soft_above_hard() -> None:
    with pytest.raises(UsageError, match="ulimit soft limit must be less than or equal to hard limit: 2048 > 1024"):
        parse_ulimit("nofile=2048:1024")


@pytest.mark.parametrize("value", ["bogus=1", "nofile", "=1", "NOFILE=1"])
def test_parse_ulimit_unknown_type(value: str) -> None:
    with pytest.raises(UsageError, match="invalid ulimit type"):
        parse_ulimit(value)


@pytest.mark.parametrize("value", ["nofile=abc", "nofile=", "nofile=1:x", "nofile=1.5"])
def test_parse_ulimit_not_a_number(value: str) -> None:
    with pytest.raises(UsageError, match="invalid ulimit argument"):
        parse_ulimit(value)


# --- build_config -----------------------------------------------------------


def test_build_config_defaults() -> None:
    c = config("busybox")
    assert c.image == "busybox"
    assert list(c.cmd) == []
    assert c.network_mode == "none"
    assert not c.entrypoint_set and list(c.entrypoint) == []
    assert not c.stop_timeout_set and not c.pids_limit_set
    assert (c.memory, c.memory_swap, c.memory_reservation, c.shm_size, c.cpus) == (0, 0, 0, 0, 0.0)
    assert list(c.env) == [] and dict(c.labels) == {} and dict(c.log_opts) == {}


def test_build_config_command_after_the_image_is_kept_verbatim() -> None:
    c = config("--name", "web", "busybox", "sh", "-c", "echo --rm")
    assert c.name == "web"
    assert list(c.cmd) == ["sh", "-c", "echo --rm"]
    assert not c.auto_remove


def test_build_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIFF_TEST_FROM_CLIENT", "client value")
    monkeypatch.delenv("SKIFF_TEST_UNSET", raising=False)
    c = config("-e", "A=1", "-e", "B=", "-e", "SKIFF_TEST_FROM_CLIENT", "-e", "SKIFF_TEST_UNSET",
               "-e", "C=x=y", "busybox")
    assert list(c.env) == ["A=1", "B=", "SKIFF_TEST_FROM_CLIENT=client value", "C=x=y"]


@pytest.mark.parametrize("bad", ["=x", ""])
def test_build_config_env_refuses_empty_names(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid environment variable"):
        config("-e", bad, "busybox")


def test_build_config_empty_entrypoint_is_set_without_value() -> None:
    c = config("--entrypoint", "", "busybox")
    assert c.entrypoint_set
    assert list(c.entrypoint) == []


def test_build_config_entrypoint() -> None:
    c = config("--entrypoint", "/bin/echo", "busybox", "hi")
    assert c.entrypoint_set
    assert list(c.entrypoint) == ["/bin/echo"]
    assert list(c.cmd) == ["hi"]


@pytest.mark.parametrize("driver", ["syslog", "none", "journald", "local"])
def test_build_config_refuses_other_log_drivers(driver: str) -> None:
    with pytest.raises(UsageError, match=f"log driver '{driver}' is not supported"):
        config("--log-driver", driver, "busybox")


def test_build_config_log_opts() -> None:
    assert dict(config("--log-opt", "max-size=10m", "--log-opt", "max-file=3", "busybox").log_opts) == {
        "max-size": "10m", "max-file": "3"}
    with pytest.raises(UsageError, match="--log-opt"):
        config("--log-opt", "max-size", "busybox")


@pytest.mark.parametrize("network", ["none", "host"])
def test_build_config_networks_accepted(network: str) -> None:
    assert config("--network", network, "busybox").network_mode == network
    assert config("--net", network, "busybox").network_mode == network


@pytest.mark.parametrize("network", ["bridge", "default", "container:web", "mynet"])
def test_build_config_refuses_other_networks(network: str) -> None:
    with pytest.raises(UsageError, match=f"network '{network}' not found"):
        config("--network", network, "busybox")


@pytest.mark.parametrize("flag", ["--pid", "--ipc", "--uts"])
def test_build_config_namespace_modes(flag: str) -> None:
    c = config(flag, "host", "busybox")
    assert getattr(c, flag[2:] + "_mode") == "host"
    with pytest.raises(UsageError, match=f"invalid {flag}"):
        config(flag, "container:web", "busybox")


@pytest.mark.parametrize("value", ["0", "30", "-1"])
def test_build_config_stop_timeout_set(value: str) -> None:
    c = config("--stop-timeout", value, "busybox")
    assert c.stop_timeout_set
    assert c.stop_timeout == int(value)


@pytest.mark.parametrize("value", ["0", "100", "-1"])
def test_build_config_pids_limit_set(value: str) -> None:
    c = config("--pids-limit", value, "busybox")
    assert c.pids_limit_set
    assert c.pids_limit == int(value)


def test_build_config_memory_flags() -> None:
    c = config("-m", "64m", "--memory-reservation", "32m", "--memory-swap", "128m", "--shm-size", "1g",
               "busybox")
    assert (c.memory, c.memory_reservation, c.memory_swap, c.shm_size) == (64 << 20, 32 << 20, 128 << 20, 1 << 30)


def test_build_config_memory_swap_unlimited() -> None:
    assert config("-m", "64m", "--memory-swap", "-1", "busybox").memory_swap == -1


@pytest.mark.parametrize("flag,name", [("-m", "--memory"), ("--memory", "--memory"),
                                       ("--memory-reservation", "--memory-reservation"),
                                       ("--memory-swap", "--memory-swap"), ("--shm-size", "--shm-size")])
def test_build_config_bad_size_names_the_flag(flag: str, name: str) -> None:
    with pytest.raises(UsageError) as info:
        config(flag, "lots", "busybox")
    assert f"for {name} flag" in str(info.value)


def test_build_config_cpus() -> None:
    c = config("--cpus", "1.5", "--cpuset-cpus", "0-1", "busybox")
    assert (c.cpus, c.cpuset_cpus) == (1.5, "0-1")
    with pytest.raises(UsageError, match="--cpus"):
        config("--cpus", "-1", "busybox")


def test_build_config_ulimits_and_labels() -> None:
    c = config("--ulimit", "nofile=1024:2048", "--ulimit", "nproc=64", "-l", "tier=front", "--label", "flag",
               "busybox")
    assert [(u.name, u.soft, u.hard) for u in c.ulimits] == [("nofile", 1024, 2048), ("nproc", 64, 64)]
    assert dict(c.labels) == {"tier": "front", "flag": ""}


def test_build_config_flags() -> None:
    c = config("-it", "--rm", "--init", "--read-only", "--privileged", "-u", "app", "-w", "/srv", "-h", "box",
               "--stop-signal", "SIGINT", "--cap-add", "NET_ADMIN", "--cap-drop", "ALL", "busybox")
    assert (c.tty, c.open_stdin, c.auto_remove, c.init, c.read_only, c.privileged) == (True,) * 6
    assert (c.user, c.working_dir, c.hostname, c.stop_signal) == ("app", "/srv", "box", "SIGINT")
    assert (list(c.cap_add), list(c.cap_drop)) == (["NET_ADMIN"], ["ALL"])


def test_build_config_seccomp_profile_is_read_by_the_cli(tmp_path: Any) -> None:
    profile = tmp_path / "p.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    c = config("--security-opt", f"seccomp={profile}", "--security-opt", "no-new-privileges", "busybox")
    assert list(c.security_opt) == ['seccomp={"defaultAction": "SCMP_ACT_ALLOW"}', "no-new-privileges"]
    assert list(config("--security-opt", "seccomp=unconfined", "busybox").security_opt) == ["seccomp=unconfined"]
    with pytest.raises(UsageError, match="--security-opt seccomp"):
        config("--security-opt", f"seccomp={tmp_path / 'missing.json'}", "busybox")


def test_build_config_env_file_contents_are_sent(tmp_path: Any) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("A=1\n")
    assert list(config("--env-file", str(env_file), "busybox").env_files) == ["A=1\n"]
    with pytest.raises(UsageError, match="--env-file"):
        config("--env-file", str(tmp_path / "missing"), "busybox")


# --- ps: status_text and container_rows --------------------------------------

NOW = 1_700_000_000 * 10**9
SEC = 10**9


def summary(**kw: Any) -> pb.ContainerSummary:
    base: dict[str, Any] = {"id": "f" * 64, "names": ["/web"], "image": "busybox", "command": "sh",
                            "created_ns": time.time_ns() - 60 * SEC, "state": "created"}
    return pb.ContainerSummary(**(base | kw))


def test_status_running() -> None:
    assert status_text(summary(state="running", started_ns=NOW - 5 * SEC), NOW) == "Up 5 seconds"
    assert status_text(summary(state="running", started_ns=NOW - 3 * 3600 * SEC), NOW) == "Up 3 hours"
    assert status_text(summary(state="running", started_ns=NOW), NOW) == "Up Less than a second"


def test_status_exited() -> None:
    s = summary(state="exited", exit_code=3, finished_ns=NOW - 120 * SEC)
    assert status_text(s, NOW) == "Exited (3) 2 minutes ago"
    s = summary(state="exited", exit_code=0, finished_ns=NOW - 1 * SEC)
    assert status_text(s, NOW) == "Exited (0) 1 second ago"
    assert status_text(summary(state="exited", exit_code=137, finished_ns=NOW - 90 * SEC), NOW) == \
        "Exited (137) About a minute ago"


def test_status_created_and_others() -> None:
    assert status_text(summary(state="created"), NOW) == "Created"
    assert status_text(summary(state="dead"), NOW) == "Dead"


def test_rows_truncate_the_id_unless_no_trunc() -> None:
    s = summary(id="0123456789abcdef" * 4)
    assert container_rows([s], no_trunc=False)[0]["ID"] == "0123456789ab"
    assert container_rows([s], no_trunc=True)[0]["ID"] == "0123456789abcdef" * 4


def test_rows_command_is_quoted() -> None:
    row = container_rows([summary(command='sh -c "echo hi"')], no_trunc=False)[0]
    assert row["Command"] == '"sh -c \\"echo hi\\""'
    assert json.loads(row["Command"]) == 'sh -c "echo hi"'


def test_rows_command_truncated_to_20_with_ellipsis() -> None:
    command = "/usr/local/bin/server --port 8080"
    row = container_rows([summary(command=command)], no_trunc=False)[0]
    text = json.loads(row["Command"])
    assert len(text) == 20
    assert text == command[:19] + "…"
    assert row["Command"] == '"' + command[:19] + '…"'
    assert json.loads(container_rows([summary(command=command)], no_trunc=True)[0]["Command"]) == command


def test_rows_command_of_exactly_20_is_not_truncated() -> None:
    command = "x" * 20
    assert json.loads(container_rows([summary(command=command)], no_trunc=False)[0]["Command"]) == command


def test_rows_names_and_other_columns() -> None:
    s = summary(names=["/web", "/alias"], state="running", started_ns=time.time_ns() - 10 * SEC,
                labels={"b": "2", "a": "1"}, networks="host")
    row = container_rows([s], no_trunc=False)[0]
    assert row["Names"] == "web,alias"
    assert row["Image"] == "busybox"
    assert row["State"] == "running"
    assert row["Status"].startswith("Up ")
    assert row["RunningFor"] == "About a minute ago"
    assert row["Labels"] == "a=1,b=2"
    assert row["Networks"] == "host"
    assert row["Size"] == "0B"
    assert row["Ports"] == ""


def test_rows_keep_the_order() -> None:
    rows = container_rows([summary(id="1" * 64), summary(id="2" * 64)], no_trunc=False)
    assert [r["ID"] for r in rows] == ["1" * 12, "2" * 12]


# --- config_dict ------------------------------------------------------------


def test_config_dict_resources_only_what_was_set() -> None:
    assert config_dict(pb.ContainerConfig(image="busybox"))["resources"] == {}
    d = config_dict(pb.ContainerConfig(image="busybox", memory=1 << 26, cpus=0.5))
    assert d["resources"] == {"memory": 1 << 26, "cpus": 0.5}


def test_config_dict_all_resources() -> None:
    d = config_dict(pb.ContainerConfig(image="busybox", memory=1 << 26, memory_reservation=1 << 25, memory_swap=-1,
                                       cpus=2.0, cpuset_cpus="0-3", pids_limit=0, pids_limit_set=True))
    assert d["resources"] == {"memory": 1 << 26, "memory_reservation": 1 << 25, "memory_swap": -1, "cpus": 2.0,
                              "cpuset_cpus": "0-3", "pids_limit": 0}


def test_config_dict_pids_limit_needs_the_set_flag() -> None:
    assert "pids_limit" not in config_dict(pb.ContainerConfig(pids_limit=100))["resources"]


@pytest.mark.parametrize("field,flag", [("memory", "--memory"), ("memory_reservation", "--memory-reservation")])
def test_config_dict_refuses_negative_memory(field: str, flag: str) -> None:
    with pytest.raises(InvalidArgument, match=f"invalid {flag}: must not be negative"):
        kwargs: dict[str, Any] = {field: -5}
        config_dict(pb.ContainerConfig(image="busybox", **kwargs))


def test_config_dict_refuses_negative_cpus() -> None:
    with pytest.raises(InvalidArgument, match="--cpus"):
        config_dict(pb.ContainerConfig(image="busybox", cpus=-0.5))


def test_config_dict_fields() -> None:
    c = pb.ContainerConfig(image="busybox", name="web", cmd=["sh"], entrypoint_set=True, env=["A=1"],
                           stop_timeout=0, stop_timeout_set=True, labels={"k": "v"}, log_opts={"max-size": "1m"},
                           ulimits=[pb.Ulimit(name="nofile", soft=1, hard=2)], network_mode="host")
    d = config_dict(c)
    assert (d["image"], d["name"], d["cmd"], d["entrypoint"], d["entrypoint_set"]) == (
        "busybox", "web", ["sh"], [], True)
    assert d["stop_timeout"] == 0
    assert config_dict(pb.ContainerConfig(stop_timeout=30))["stop_timeout"] is None
    assert d["labels"] == {"k": "v"} and d["log_opts"] == {"max-size": "1m"}
    assert d["ulimits"] == [{"name": "nofile", "soft": 1, "hard": 2}]
    assert d["network_mode"] == "host"


def test_cli_config_survives_config_dict() -> None:
    d = config_dict(config("-m", "64m", "--memory-swap", "-1", "--pids-limit", "-1", "--stop-timeout", "5",
                           "--entrypoint", "", "busybox"))
    assert d["resources"] == {"memory": 64 << 20, "memory_swap": -1, "pids_limit": -1}
    assert d["stop_timeout"] == 5
    assert d["entrypoint_set"] is True and d["entrypoint"] == []
