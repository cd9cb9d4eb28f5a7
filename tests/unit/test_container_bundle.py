"""Tests for agent.containers.bundle: the container's /etc files, hostname, resources and spec options."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.containers import bundle as bundlemod
from agent.containers.bundle import default_hostname, resources, spec_options, write_etc_files
from agent.errors import InvalidArgument
from agent.runtime.spec import DEFAULT_PIDS_LIMIT, DEFAULT_SHM_SIZE, Mount

ID = "0123456789abcdef" * 4
DEFAULT_DNS = ["nameserver 8.8.8.8", "nameserver 8.8.4.4"]


def host_etc(tmp_path: Path, resolv: str | None = None, hosts: str | None = None) -> Path:
    etc = tmp_path / "host-etc"
    etc.mkdir()
    if resolv is not None:
        (etc / "resolv.conf").write_text(resolv)
    if hosts is not None:
        (etc / "hosts").write_text(hosts)
    return etc


def nameservers(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("nameserver")]


# --- /etc files -------------------------------------------------------------


def test_writes_the_three_files_0644_with_the_hostname(tmp_path: Path) -> None:
    etc = host_etc(tmp_path, resolv="nameserver 10.0.0.2\n")
    bundle = tmp_path / "bundle"
    paths = write_etc_files(bundle, "myhost", "none", host_etc=etc)
    assert paths == (bundle / "hostname", bundle / "hosts", bundle / "resolv.conf")
    assert (bundle / "hostname").read_text() == "myhost\n"
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_rewrite_over_existing_files_keeps_0644(tmp_path: Path) -> None:
    etc = host_etc(tmp_path, resolv="nameserver 10.0.0.2\n")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "hostname").write_text("old\n")
    (bundle / "hostname").chmod(0o600)
    write_etc_files(bundle, "new", "none", host_etc=etc)
    assert (bundle / "hostname").read_text() == "new\n"
    assert stat.S_IMODE((bundle / "hostname").stat().st_mode) == 0o644


def test_private_network_gets_localhost_hosts_not_the_hosts(tmp_path: Path) -> None:
    etc = host_etc(tmp_path, resolv="nameserver 10.0.0.2\n", hosts="10.1.1.1 secret-host\n")
    _, hosts, _ = write_etc_files(tmp_path / "b", "h", "none", host_etc=etc)
    text = hosts.read_text()
    assert "secret-host" not in text
    assert "127.0.0.1\tlocalhost" in text
    assert "::1\tlocalhost ip6-localhost ip6-loopback" in text


def test_private_network_drops_loopback_nameservers(tmp_path: Path) -> None:
    etc = host_etc(tmp_path, resolv="# generated\nsearch example.com\nnameserver 127.0.0.53\n"
                                    "nameserver ::1\nnameserver 10.0.0.2\noptions edns0\n")
    _, _, resolv = write_etc_files(tmp_path / "b", "h", "none", host_etc=etc)
    text = resolv.read_text()
    assert nameservers(text) == ["nameserver 10.0.0.2"]
    assert "search example.com" in text.splitlines()
    assert "options edns0" in text.splitlines()
    assert "127.0.0.53" not in text
    assert text.endswith("\n")


def test_private_network_falls_back_to_public_dns_when_only_loopback(tmp_path: Path) -> None:
    etc = host_etc(tmp_path, resolv="search lan\nnameserver 127.0.0.53\nnameserver 127.0.0.1\n")
    _, _, resolv = write_etc_files(tmp_path / "b", "h", "none", host_etc=etc)
    text = resolv.read_text()
    assert nameservers(text) == DEFAULT_DNS
    assert "search lan" in text.splitlines()


@pytest.mark.parametrize("resolv", [None, ""])
def test_private_network_without_host_resolv_conf_uses_public_dns(tmp_path: Path, resolv: str | None) -> None:
    etc = host_etc(tmp_path, resolv=resolv)
    _, _, path = write_etc_files(tmp_path / "b", "h", "none", host_etc=etc)
    assert nameservers(path.read_text()) == DEFAULT_DNS


def test_host_network_copies_the_hosts_files(tmp_path: Path) -> None:
    resolv = "nameserver 127.0.0.53\nsearch corp\n"
    hosts = "127.0.0.1 localhost\n10.1.1.1 db.corp\n"
    etc = host_etc(tmp_path, resolv=resolv, hosts=hosts)
    hostname, hosts_path, resolv_path = write_etc_files(tmp_path / "b", "box", "host", host_etc=etc)
    assert resolv_path.read_text() == resolv  # loopback resolvers are reachable from the host's netns
    assert hosts_path.read_text() == hosts
    assert hostname.read_text() == "box\n"


def test_host_network_without_host_files_uses_defaults(tmp_path: Path) -> None:
    etc = host_etc(tmp_path)
    _, hosts_path, resolv_path = write_etc_files(tmp_path / "b", "box", "host", host_etc=etc)
    assert nameservers(resolv_path.read_text()) == DEFAULT_DNS
    assert "127.0.0.1\tlocalhost" in hosts_path.read_text()


# --- hostname ---------------------------------------------------------------


def test_default_hostname_requested_wins() -> None:
    assert default_hostname(ID, "none", "web") == "web"
    assert default_hostname(ID, "host", "web") == "web"


def test_default_hostname_is_short_id() -> None:
    assert default_hostname(ID, "none", "") == ID[:12]


def test_default_hostname_host_modes_use_the_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "the-host")
    assert default_hostname(ID, "host", "") == "the-host"
    assert default_hostname(ID, "none", "", uts_mode="host") == "the-host"


# --- resources --------------------------------------------------------------


def test_resources_defaults() -> None:
    r = resources({})
    assert r.pids_limit == DEFAULT_PIDS_LIMIT == 4096
    assert (r.memory, r.memory_reservation, r.memory_swap, r.cpus, r.cpuset_cpus) == (None,) * 5
    assert resources({"resources": {}}).pids_limit == 4096


def test_resources_explicit_values_kept() -> None:
    r = resources({"resources": {"memory": 1 << 26, "memory_reservation": 1 << 25, "memory_swap": -1,
                                 "cpus": 0.5, "cpuset_cpus": "0,2", "pids_limit": 10}})
    assert (r.memory, r.memory_reservation, r.memory_swap, r.cpus, r.cpuset_cpus, r.pids_limit) == (
        1 << 26, 1 << 25, -1, 0.5, "0,2", 10)


@pytest.mark.parametrize("limit", [0, -1])
def test_resources_unlimited_pids_kept(limit: int) -> None:
    assert resources({"resources": {"pids_limit": limit}}).pids_limit == limit


# --- spec options -----------------------------------------------------------


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    root = tmp_path / "layer"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "app:x:1000:1001:app:/home/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1001:\nstaff:x:50:app\nwheel:x:10:root,app\n"
                                        "other:x:60:root\n")
    return root


def config(**overrides: Any) -> dict[str, Any]:
    return {"args": ["/bin/app", "--serve"], "hostname": "box", "network_mode": "none"} | overrides


def options(tmp_path: Path, layer: Path, **overrides: Any) -> Any:
    return spec_options(ID, config(**overrides), tmp_path / "bundle", [layer], "/skiff/" + ID)


def test_spec_options_basics(tmp_path: Path, layer: Path) -> None:
    o = options(tmp_path, layer, env=["A=1"], working_dir="/srv", tty=True, read_only=True,
                ulimits={"nofile": [1024, 2048]}, resources={"memory": 1 << 26})
    assert o.args == ["/bin/app", "--serve"]
    assert o.rootfs == tmp_path / "bundle" / "rootfs"
    assert (o.uid, o.gid) == (0, 0)
    assert sorted(o.additional_gids) == [10, 60]  # root's groups in the image's /etc/group, as runc does
    assert o.env == ["A=1"]
    assert o.cwd == "/srv"
    assert o.hostname == "box"
    assert o.terminal and o.readonly_rootfs
    assert o.ulimits == {"nofile": (1024, 2048)}
    assert o.resources.memory == 1 << 26 and o.resources.pids_limit == 4096
    assert o.cgroups_path == "/skiff/" + ID
    assert o.annotations == {"org.skiff.container": ID}
    assert o.shm_size == DEFAULT_SHM_SIZE
    assert o.mounts == []
    assert o.hostname_path == tmp_path / "bundle" / "hostname"
    assert o.hostname_path.read_text() == "box\n"
    assert o.hosts_path == tmp_path / "bundle" / "hosts" and o.hosts_path.exists()
    assert o.resolv_conf_path == tmp_path / "bundle" / "resolv.conf" and o.resolv_conf_path.exists()


def test_spec_options_user_by_name(tmp_path: Path, layer: Path) -> None:
    o = options(tmp_path, layer, user="app")
    assert (o.uid, o.gid) == (1000, 1001)
    assert sorted(o.additional_gids) == [10, 50]


def test_spec_options_user_with_group(tmp_path: Path, layer: Path) -> None:
    o = options(tmp_path, layer, user="app:staff")
    assert (o.uid, o.gid, o.additional_gids) == (1000, 50, [])


def test_spec_options_numeric_user_without_entry(tmp_path: Path, layer: Path) -> None:
    o = options(tmp_path, layer, user="4242")
    assert (o.uid, o.gid, o.additional_gids) == (4242, 0, [])


def test_spec_options_unknown_user(tmp_path: Path, layer: Path) -> None:
    with pytest.raises(InvalidArgument, match="unable to find user nobody-here"):
        options(tmp_path, layer, user="nobody-here")


def test_spec_options_init_without_tini(tmp_path: Path, layer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundlemod, "TINI", tmp_path / "no-such-tini")
    with pytest.raises(InvalidArgument, match="--init needs"):
        options(tmp_path, layer, init=True)


def test_spec_options_init_mounts_tini(tmp_path: Path, layer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if Path("/usr/bin/tini-static").exists():
        tini = Path("/usr/bin/tini-static")
    else:  # the mount is described, not made: any file stands in for tini
        tini = tmp_path / "tini-static"
        tini.write_bytes(b"\x7fELF")
    monkeypatch.setattr(bundlemod, "TINI", tini)
    o = options(tmp_path, layer, init=True)
    assert o.args == ["/sbin/docker-init", "--", "/bin/app", "--serve"]
    assert o.mounts == [Mount("/sbin/docker-init", "bind", str(tini), ["rbind", "ro"])]


def test_spec_options_host_network_and_namespaces(tmp_path: Path, layer: Path) -> None:
    o = options(tmp_path, layer, network_mode="host", pid_mode="host", ipc_mode="host", uts_mode="host")
    assert (o.network_mode, o.pid_mode, o.ipc_mode, o.uts_mode) == ("host", "host", "host", "host")


def test_spec_options_default_network_is_none(tmp_path: Path, layer: Path) -> None:
    cfg = config()
    del cfg["network_mode"]
    o = spec_options(ID, cfg, tmp_path / "bundle", [layer], "/skiff/x")
    assert o.network_mode == "none"
    assert o.cwd == "/"
