"""`skiff bootstrap` without root or network: daemon.toml and the unit file, the wheel cache, the
plan a host's facts lead to (uploads, venv, install, files, start/restart), the helper run locally
against a layout in tmp_path, and the command line."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller import bootstrap as bs
from controller.bootstrap import FileSpec, HostFacts, Layout, Wheel, WheelSet
from controller.wheels import WheelBuildError

LAYOUT = Layout()


def _wheelset(tmp: Path, skiff_sha: str = "s" * 64, version: str = "0.1.0") -> WheelSet:
    skiff = Wheel(f"skiff-{version}-py3-none-any.whl", 100, skiff_sha)
    grpc = Wheel("grpcio-1.85.3-cp311-cp311-manylinux2014_x86_64.whl", 2000, "g" * 64)
    return WheelSet(tmp, (grpc, skiff), version, skiff)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(tls: bool = False, systemd: bool = False, extra: dict[str, object] | None = None) -> dict[str, FileSpec]:
    files = {LAYOUT.config: FileSpec(bs.render_config(bs.daemon_config(LAYOUT, tls, extra or {})).encode(), 0o644)}
    if systemd:
        files[LAYOUT.unit] = FileSpec(bs.render_unit(LAYOUT).encode(), 0o644)
    return files


def _settled(wheels: WheelSet, files: dict[str, FileSpec], **changes: object) -> HostFacts:
    """The facts of a host where everything is as bootstrap leaves it, with ``changes``."""
    facts = HostFacts(python=(3, 11, 2), venv_python=(3, 11), installed=bs.install_state(wheels),
                      wheels={w.name: (w.size, w.sha256) for w in wheels.wheels},
                      files={p: (_sha(s.content), s.mode) for p, s in files.items()}, pid=4242, socket_live=True)
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


# --- daemon.toml and the unit ------------------------------------------------------------


def test_daemon_keys_are_the_agents() -> None:
    from agent.config import _KEYS, DaemonConfig

    kinds = {f.name: str(f.type) for f in dataclasses.fields(DaemonConfig)}
    assert set(bs.DAEMON_KEYS) == set(_KEYS)
    for key, kind in bs.DAEMON_KEYS.items():
        agent_kind = kinds[_KEYS[key]]
        expected = {"path": "Path", "list": "list", "bool": "bool", "int": "int", "float": "float", "str": "str"}[kind]
        assert expected in agent_kind, (key, kind, agent_kind)


def test_config_is_the_unix_socket_by_default_and_loads_in_the_agent(tmp_path: Path) -> None:
    from agent.config import load_config

    text = bs.render_config(bs.daemon_config(LAYOUT, False, {}))
    assert tomllib.loads(text) == {"hosts": ["unix:///run/skiff/skiffd.sock"]}
    assert text.startswith("# Written by `skiff bootstrap`")
    extra = bs.parse_config_args(["cgroup-parent=/lab-1", "insecure-registries=10.0.0.1:5000,10.0.0.2:5000",
                                  "insecure-registries=reg.local", "max-concurrent-downloads=5",
                                  "shutdown-timeout=7.5", "log-format=json", "data-root=/srv/skiff"])
    path = tmp_path / "daemon.toml"
    path.write_text(bs.render_config(bs.daemon_config(LAYOUT, False, extra)))
    config = load_config(path, {})
    assert config.hosts == ["unix:///run/skiff/skiffd.sock"] and config.cgroup_parent == "/lab-1"
    assert config.insecure_registries == ["10.0.0.1:5000", "10.0.0.2:5000", "reg.local"]
    assert (config.max_concurrent_downloads, config.shutdown_timeout, config.log_format) == (5, 7.5, "json")
    assert config.data_root == Path("/srv/skiff")


def test_tls_adds_the_tcp_listener_and_certificates(tmp_path: Path) -> None:
    doc = bs.daemon_config(LAYOUT, True, {})
    assert doc == {"hosts": ["unix:///run/skiff/skiffd.sock", "tcp://0.0.0.0:2376"], "tlsverify": True,
                   "tlscacert": "/etc/skiff/tls/ca.pem", "tlscert": "/etc/skiff/tls/cert.pem",
                   "tlskey": "/etc/skiff/tls/key.pem"}
    assert tomllib.loads(bs.render_config(doc)) == doc
    # given hosts replace the tcp listener; the unix socket stays, once
    mine = bs.daemon_config(LAYOUT, True, bs.parse_config_args(
        ["hosts=tcp://10.1.2.3:2376,unix:///run/skiff/skiffd.sock"]))
    assert mine["hosts"] == ["unix:///run/skiff/skiffd.sock", "tcp://10.1.2.3:2376"]
    with pytest.raises(bs.UsageError, match="http://x"):
        bs.daemon_config(LAYOUT, False, {"hosts": ["http://x"]})


@pytest.mark.parametrize("item, message", [
    ("cgroup-parent", "use KEY=VALUE"), ("=x", "use KEY=VALUE"), ("colour=blue", "unknown key 'colour'"),
    ("tlsverify=maybe", "true or false"), ("max-concurrent-downloads=many", "a number"),
    ("shutdown-timeout=-1", "negative"), ("data-root=var/lib", "absolute path"),
])
def test_bad_config_args_are_refused(item: str, message: str) -> None:
    with pytest.raises(bs.UsageError, match=message):
        bs.parse_config_args([item])


def test_config_arg_values_are_typed() -> None:
    assert bs.parse_config_args(["tlsverify=yes", "allow-insecure-tcp=false", "log-level=debug", "group=ops"]) == {
        "tlsverify": True, "allow-insecure-tcp": False, "log-level": "debug", "group": "ops"}


def test_unit_is_modelled_on_containerds() -> None:
    unit = bs.render_unit(LAYOUT)
    service = unit.split("[Service]")[1].split("[Install]")[0]
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in service.strip().splitlines()}
    assert lines["ExecStart"] == "/opt/skiff/venv/bin/skiffd --config-file /etc/skiff/daemon.toml"
    assert (lines["Delegate"], lines["KillMode"], lines["Restart"]) == ("yes", "process", "on-failure")
    assert lines["LimitNOFILE"] == "1048576"  # a fixed limit, not infinity
    assert "ProtectSystem" not in unit and "WantedBy=multi-user.target" in unit


# --- wheels ------------------------------------------------------------------------------


def _project(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (root / "other").mkdir()
    (root / "other" / "big.bin").write_bytes(b"\0" * 10)
    (root / "README.md").write_text("hi\n")
    (root / "pyproject.toml").write_text('[project]\nname = "skiff"\nversion = "9.8.7"\n'
                                         '[tool.setuptools.packages.find]\nwhere = ["."]\ninclude = ["pkg*"]\n')
    return root


FAKE_PIP = """#!/bin/sh
# python -m pip wheel -q --disable-pip-version-check --wheel-dir OUT SRC: one wheel per call, counted
echo "$@" >> "{log}"
while [ "$1" != "--wheel-dir" ]; do shift; done
mkdir -p "$2" && test -f "$3/pkg/sub/mod.py" && echo skiff > "$2/skiff-9.8.7-py3-none-any.whl" \\
  && echo dep > "$2/dep-1.0-py3-none-any.whl"
"""


def test_wheels_are_built_once_per_source_state_from_a_copy(tmp_path: Path) -> None:
    project = _project(tmp_path / "project")
    log = tmp_path / "pip.log"
    python = tmp_path / "python"
    python.write_text(FAKE_PIP.format(log=log))
    python.chmod(0o755)
    cache = tmp_path / "cache"
    said: list[str] = []
    first = bs.cached_wheels(project, cache, str(python), said.append)
    assert [w.name for w in first.wheels] == ["dep-1.0-py3-none-any.whl", "skiff-9.8.7-py3-none-any.whl"]
    assert first.version == "9.8.7" and first.skiff.sha256 == _sha(b"skiff\n")
    assert first.dir.parent == cache and first.dir.name.startswith("9.8.7-") and len(said) == 1
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "other", "pkg", "pyproject.toml"]
    assert bs.cached_wheels(project, cache, str(python), said.append) == first  # cached: no build
    (project / "other" / "big.bin").write_bytes(b"\1" * 10)  # not in the wheel: still cached
    assert bs.cached_wheels(project, cache, str(python), said.append) == first
    assert len(log.read_text().splitlines()) == 1
    mod = project / "pkg" / "sub" / "mod.py"
    os.utime(mod, ns=(mod.stat().st_atime_ns, mod.stat().st_mtime_ns + 1_000_000))
    second = bs.cached_wheels(project, cache, str(python), said.append)
    assert second.dir != first.dir and len(log.read_text().splitlines()) == 2
    assert not list(cache.glob(".build-*"))


def test_a_failed_build_says_why_and_caches_nothing(tmp_path: Path) -> None:
    project = _project(tmp_path / "project")
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'ERROR: Could not find a version that satisfies grpcio>=99' >&2\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(WheelBuildError, match="exited 1: ERROR: Could not find a version that satisfies"):
        bs.cached_wheels(project, tmp_path / "cache", str(python))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]


def test_prepared_wheels_need_exactly_one_skiff(tmp_path: Path) -> None:
    (tmp_path / "dep-1.0-py3-none-any.whl").write_bytes(b"dep")
    with pytest.raises(bs.UsageError, match="exactly one skiff wheel .found none"):
        bs.read_wheels(tmp_path)
    (tmp_path / "skiff-1.2.3-py3-none-any.whl").write_bytes(b"skiff")
    found = bs.read_wheels(tmp_path)
    assert found.version == "1.2.3" and found.skiff == Wheel("skiff-1.2.3-py3-none-any.whl", 5, _sha(b"skiff"))
    (tmp_path / "skiff-1.2.4-py3-none-any.whl").write_bytes(b"skiff")
    with pytest.raises(bs.UsageError, match="found skiff-1.2.3.*, skiff-1.2.4"):
        bs.read_wheels(tmp_path)


def test_the_wheel_set_digest_covers_names_and_hashes(tmp_path: Path) -> None:
    a = _wheelset(tmp_path)
    assert a.digest == _wheelset(tmp_path).digest
    assert a.digest != _wheelset(tmp_path, skiff_sha="t" * 64).digest


# --- the plan ------------------------------------------------------------------------------


def test_needs_upload_compares_size_and_sha256(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    grpc, skiff = wheels.wheels
    assert bs.needs_upload(wheels.wheels, {}) == [grpc, skiff]
    assert bs.needs_upload(wheels.wheels, {grpc.name: (grpc.size, grpc.sha256), skiff.name: (100, "x" * 64)}) == [skiff]
    assert bs.needs_upload(wheels.wheels, {grpc.name: (1, grpc.sha256), skiff.name: (100, skiff.sha256)}) == [grpc]


def test_a_fresh_host_gets_everything(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    files = _files()
    plan = bs.plan_host("h1", HostFacts(python=(3, 11, 2)), wheels, files, {}, LAYOUT)
    assert plan.upload == list(wheels.wheels) and plan.keep == sorted(w.name for w in wheels.wheels)
    assert (plan.venv, plan.install, plan.reinstall_skiff) == ("create", True, False)
    assert list(plan.write) == [LAYOUT.config] and plan.service == "start" and not plan.systemd
    assert plan.changed and plan.actions == ["uploaded 2 wheels", "created /opt/skiff/venv", "installed skiff 0.1.0",
                                             "wrote /etc/skiff/daemon.toml", "started skiffd"]


def test_a_settled_host_gets_nothing(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    files = _files()
    plan = bs.plan_host("h1", _settled(wheels, files), wheels, files, {}, LAYOUT)
    assert not plan.changed and plan.actions == []
    assert (plan.upload, plan.keep, plan.venv, plan.install, plan.write, plan.service) == ([], None, "", False, {}, "")


def test_a_dead_agent_is_started_again(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    plan = bs.plan_host("h1", _settled(wheels, _files(), pid=None, socket_live=False), wheels, _files(), {}, LAYOUT)
    assert plan.service == "start" and plan.actions == ["started skiffd"]


def test_a_new_skiff_wheel_of_the_same_version_is_reinstalled_and_restarts(tmp_path: Path) -> None:
    old, new = _wheelset(tmp_path), _wheelset(tmp_path, skiff_sha="t" * 64)
    facts = _settled(old, _files())
    plan = bs.plan_host("h1", facts, new, _files(), {}, LAYOUT)
    assert plan.upload == [new.skiff] and plan.keep is not None
    assert (plan.venv, plan.install, plan.reinstall_skiff, plan.service) == ("", True, True, "restart")
    assert plan.write == {}
    # another version: pip's upgrade installs it; no forced reinstall
    plan = bs.plan_host("h1", facts, _wheelset(tmp_path, version="0.2.0"), _files(), {}, LAYOUT)
    assert plan.install and not plan.reinstall_skiff and plan.service == "restart"


def test_only_deps_changed_installs_without_reinstalling_skiff(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    facts = _settled(wheels, _files(), installed={**bs.install_state(wheels), "wheels": "old"})
    plan = bs.plan_host("h1", facts, wheels, _files(), {}, LAYOUT)
    assert plan.install and not plan.reinstall_skiff and plan.service == "restart"


def test_a_config_change_rewrites_and_restarts_without_installing(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    wanted = _files(extra={"cgroup-parent": "/x"})
    plan = bs.plan_host("h1", _settled(wheels, _files()), wheels, wanted, {}, LAYOUT)
    assert list(plan.write) == [LAYOUT.config] and not plan.install and plan.service == "restart"
    assert plan.actions == ["wrote /etc/skiff/daemon.toml", "restarted skiffd"]


def test_a_mode_change_is_fixed_without_a_restart(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    key = {"/etc/skiff/tls/key.pem": FileSpec(b"KEY", 0o600)}
    settled = _settled(wheels, _files())
    facts = dataclasses.replace(settled, files={**settled.files, "/etc/skiff/tls/key.pem": (_sha(b"KEY"), 0o644)})
    plan = bs.plan_host("h1", facts, wheels, {**_files(), **key}, {"/etc/skiff/tls": 0o700}, LAYOUT)
    assert list(plan.write) == ["/etc/skiff/tls/key.pem"] and plan.service == "" and plan.changed


def test_old_wheels_go_and_a_stale_manifest_is_rewritten(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    facts = _settled(wheels, _files())
    plan = bs.plan_host("h1", dataclasses.replace(facts, wheels={**facts.wheels, "old-1-py3-none-any.whl": (1, "o")}),
                        wheels, _files(), {}, LAYOUT)
    assert plan.keep == sorted(w.name for w in wheels.wheels) and plan.actions == ["removed 1 old wheels"]
    plan = bs.plan_host("h1", dataclasses.replace(facts, manifest_stale=True), wheels, _files(), {}, LAYOUT)
    assert plan.keep is not None and not plan.changed  # bookkeeping only


def test_a_venv_of_another_python_is_recreated(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    facts = _settled(wheels, _files(), python=(3, 12, 1))
    plan = bs.plan_host("h1", facts, wheels, _files(), {}, LAYOUT)
    assert (plan.venv, plan.install, plan.reinstall_skiff, plan.service) == ("recreate", True, False, "restart")


@pytest.mark.parametrize("changes, message", [
    ({"python": (3, 9, 2)}, "python3 on h1 is 3.9.2; skiffd needs 3.11 or later"),
    ({"venv_python": None, "ensurepip": False}, "^python3-venv missing on h1: apt-get install python3-venv$"),
    ({"uid": 1000}, "logs in as root: the SSH user on h1 has uid 1000"),
    ({"pid": None}, "a skiffd that skiff bootstrap did not start already serves /run/skiff/skiffd.sock on h1"),
])
def test_hosts_that_cannot_be_bootstrapped_say_why(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    wheels = _wheelset(tmp_path)
    with pytest.raises(bs.BootstrapError, match=message):
        bs.plan_host("h1", _settled(wheels, _files(), **changes), wheels, _files(), {}, LAYOUT)


def test_no_ensurepip_is_fine_when_the_venv_exists(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    assert not bs.plan_host("h1", _settled(wheels, _files(), ensurepip=False), wheels, _files(), {}, LAYOUT).changed


def test_systemd_hosts_get_the_unit_enabled_and_started(tmp_path: Path) -> None:
    wheels = _wheelset(tmp_path)
    files = _files(systemd=True)
    fresh = bs.plan_host("h1", HostFacts(python=(3, 11, 2), systemd=True), wheels, files, {}, LAYOUT)
    assert fresh.systemd and fresh.daemon_reload and fresh.enable and fresh.service == "start"
    assert set(fresh.write) == {LAYOUT.config, LAYOUT.unit}
    settled = _settled(wheels, files, systemd=True, unit_active="active", unit_enabled=True, pid=None)
    assert not bs.plan_host("h1", settled, wheels, files, {}, LAYOUT).changed
    stopped = bs.plan_host("h1", dataclasses.replace(settled, unit_active="failed"), wheels, files, {}, LAYOUT)
    assert stopped.service == "start" and not stopped.daemon_reload
    changed = bs.plan_host("h1", settled, wheels, _files(systemd=True, extra={"log-level": "debug"}), {}, LAYOUT)
    assert changed.service == "restart" and not changed.daemon_reload and not changed.enable


# --- the helper, run here against a layout in tmp_path ---------------------------------------


class LocalRemote:
    """:class:`controller.bootstrap.Remote` on this machine, recording the commands."""

    label = "local"

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def run(self, command: str, input: bytes = b"") -> tuple[int, str, str]:
        self.commands.append(command)
        proc = await asyncio.create_subprocess_shell(command, stdin=asyncio.subprocess.PIPE,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(input)
        return proc.returncode or 0, out.decode(), err.decode()

    async def upload(self, files: Sequence[tuple[Path, str]]) -> None:
        for local, remote in files:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, remote)

    async def agent_version(self, socket: str, timeout: float) -> str | None:
        return None


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    root = tmp_path / "host"
    chosen = Layout(root=f"{root}/opt/skiff", etc=f"{root}/etc/skiff", run=f"{root}/run/skiff",
                    log=f"{root}/var/log/skiff/skiffd.log", unit=f"{root}/etc/systemd/system/skiffd.service",
                    systemd_marker=f"{root}/run/systemd/system")
    yield chosen
    pidfile = Path(chosen.pidfile)
    if pidfile.exists():  # a fake agent a failed test left running
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_helper_facts_of_an_empty_host(layout: Layout) -> None:
    facts = HostFacts.from_json(_run(bs.helper(LocalRemote(), layout, "facts", files=[layout.config])))  # type: ignore
    assert facts.python[:2] >= (3, 11) and facts.uid == os.geteuid() and facts.venv_python is None
    assert (facts.installed, dict(facts.wheels), facts.manifest_stale) == (None, {}, False)
    assert dict(facts.files) == {layout.config: None}
    assert (facts.systemd, facts.pid, facts.socket_live) == (False, None, False)


def test_helper_puts_files_with_modes_and_keeps_a_wheel_manifest(layout: Layout, tmp_path: Path) -> None:
    remote = LocalRemote()
    tls = f"{layout.tls}"
    data = [(layout.config, 0o644, b"hosts = []\n"), (f"{tls}/key.pem", 0o600, b"KEY")]
    _run(bs.helper(remote, layout, "put", {"dirs": [[tls, 0o700]], "files": [[p, m, len(d)] for p, m, d in data]},
                   input=b"".join(d for _, _, d in data)))
    assert Path(layout.config).read_bytes() == b"hosts = []\n" and Path(f"{tls}/key.pem").read_bytes() == b"KEY"
    assert (Path(tls).stat().st_mode & 0o777, Path(f"{tls}/key.pem").stat().st_mode & 0o777) == (0o700, 0o600)
    facts = HostFacts.from_json(_run(bs.helper(remote, layout, "facts", files=[layout.config, f"{tls}/key.pem"])))  # type: ignore
    assert facts.files == {layout.config: (_sha(b"hosts = []\n"), 0o644), f"{tls}/key.pem": (_sha(b"KEY"), 0o600)}

    wheels_dir = Path(layout.wheels)
    wheels_dir.mkdir(parents=True)
    for name, body in (("a-1-py3-none-any.whl", b"a"), ("old-1-py3-none-any.whl", b"o")):
        (wheels_dir / name).write_bytes(body)
    (wheels_dir / ".a-2-py3-none-any.whl.part").write_bytes(b"half")
    facts = HostFacts.from_json(_run(bs.helper(remote, layout, "facts")))  # type: ignore
    assert facts.manifest_stale and facts.wheels["a-1-py3-none-any.whl"] == (1, _sha(b"a"))
    kept = _run(bs.helper(remote, layout, "manifest", ["a-1-py3-none-any.whl"]))
    assert kept == {"a-1-py3-none-any.whl": [1, _sha(b"a")]}
    assert sorted(p.name for p in wheels_dir.iterdir()) == ["a-1-py3-none-any.whl", "manifest.json"]
    facts = HostFacts.from_json(_run(bs.helper(remote, layout, "facts")))  # type: ignore
    assert not facts.manifest_stale
    (wheels_dir / "a-1-py3-none-any.whl").write_bytes(b"b")  # same size, new content, new mtime: hashed again
    facts = HostFacts.from_json(_run(bs.helper(remote, layout, "facts")))  # type: ignore
    assert facts.manifest_stale and facts.wheels["a-1-py3-none-any.whl"] == (1, _sha(b"b"))


def test_helper_starts_and_stops_a_detached_agent(layout: Layout) -> None:
    skiffd = Path(layout.skiffd)
    skiffd.parent.mkdir(parents=True)
    skiffd.write_text(f"#!{sys.executable}\nimport sys, time\nprint('fake skiffd', sys.argv[1:], flush=True)\n"
                      "time.sleep(120)\n")
    skiffd.chmod(0o755)
    remote = LocalRemote()
    pid = _run(bs.helper(remote, layout, "start"))
    assert isinstance(pid, int) and Path(layout.pidfile).read_text() == f"{pid}\n"
    deadline = time.monotonic() + 10
    while "fake skiffd" not in Path(layout.log).read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _run(bs.helper(remote, layout, "status")) == {
        "pid": pid, "tail": [f"fake skiffd ['--config-file', '{layout.config}']"]}
    assert os.getsid(pid) == pid  # its own session: not ended with the SSH session
    assert HostFacts.from_json(_run(bs.helper(remote, layout, "facts"))).pid == pid  # type: ignore
    assert _run(bs.helper(remote, layout, "stop", 5)) == pid
    assert not Path(layout.pidfile).exists()
    assert _run(bs.helper(remote, layout, "status"))["pid"] is None  # type: ignore[index]
    Path(layout.pidfile).write_text(f"{os.getpid()}\n")  # a live process that is not skiffd is not the agent
    assert HostFacts.from_json(_run(bs.helper(remote, layout, "facts"))).pid is None  # type: ignore
    Path(layout.pidfile).unlink()


def test_helper_put_of_directories_only_does_not_wait_for_stdin(layout: Layout) -> None:
    class OpenStdin(LocalRemote):  # as an SSH channel whose stdin never sees EOF
        async def run(self, command: str, input: bytes = b"") -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_shell(command, stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            assert proc.stdout is not None and proc.stderr is not None
            out, err = await asyncio.wait_for(asyncio.gather(proc.stdout.read(), proc.stderr.read()), 10)
            code = await proc.wait()
            return code, out.decode(), err.decode()

    assert _run(bs.helper(OpenStdin(), layout, "put", {"dirs": [[layout.tls, 0o700]], "files": []})) == 0
    assert Path(layout.tls).stat().st_mode & 0o777 == 0o700


def test_helper_does_not_count_a_half_made_venv(layout: Layout) -> None:
    venv = Path(layout.venv)
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    os.symlink(sys.executable, venv / "bin" / "python")
    facts = HostFacts.from_json(_run(bs.helper(LocalRemote(), layout, "facts")))  # type: ignore
    assert facts.venv_python is None  # no pip in it: venv creation stopped half-way
    (venv / "lib" / "python3.11" / "site-packages" / "pip").mkdir(parents=True)
    facts = HostFacts.from_json(_run(bs.helper(LocalRemote(), layout, "facts")))  # type: ignore
    assert facts.venv_python == (3, 11)


def test_helper_without_python3_says_so(layout: Layout) -> None:
    class NoPython(LocalRemote):
        async def run(self, command: str, input: bytes = b"") -> tuple[int, str, str]:
            return 127, "", "bash: line 1: python3: command not found\n"

    with pytest.raises(bs.BootstrapError, match="^python3 missing on local: apt-get install python3$"):
        _run(bs.helper(NoPython(), layout, "facts"))


def test_apply_runs_pip_from_the_wheels_only(layout: Layout, tmp_path: Path) -> None:
    class Recorder(LocalRemote):
        async def run(self, command: str, input: bytes = b"") -> tuple[int, str, str]:
            if command.startswith("python3 -c"):
                return await super().run(command, input)
            self.commands.append(command)
            return 0, "", ""

    wheels = _wheelset(tmp_path)
    facts = _settled(wheels, _files(), installed={**bs.install_state(wheels), "skiff_sha256": "old"})
    plan = bs.plan_host("h1", facts, wheels, {}, {}, layout)
    plan.service = ""
    remote = Recorder()
    _run(bs.apply(remote, plan, wheels, layout, 15.0))
    pip = [c for c in remote.commands if " -m pip " in c]
    assert len(pip) == 2 and all("PIP_CONFIG_FILE=/dev/null" in c and "--no-index" in c for c in pip)
    assert pip[0].endswith("--upgrade --upgrade-strategy eager skiff==0.1.0")
    assert pip[1].endswith(f"--force-reinstall --no-deps {layout.wheels}/skiff-0.1.0-py3-none-any.whl")
    assert json.loads(Path(layout.state).read_text()) == bs.install_state(wheels)


def test_a_config_the_agent_refuses_never_replaces_the_old_one(layout: Layout, tmp_path: Path) -> None:
    venv_python = Path(layout.venv) / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    os.symlink(sys.executable, venv_python)  # this venv's python: the agent's own config loader
    Path(layout.config).parent.mkdir(parents=True)
    Path(layout.config).write_text("# the old one\n")
    wheels = _wheelset(tmp_path)
    settled = _settled(wheels, {})

    def plan_for(extra: dict[str, object]) -> bs.Plan:
        text = bs.render_config(bs.daemon_config(layout, False, extra)).encode()
        plan = bs.plan_host("h1", settled, wheels, {layout.config: FileSpec(text, 0o644)}, {}, layout)
        assert plan.service == "restart"
        plan.service = ""
        return plan

    bad = plan_for({"hosts": ["tcp://0.0.0.0:2376"]})  # tcp without TLS: skiffd would not start
    with pytest.raises(bs.BootstrapError, match=r"refuses the new .*daemon.toml \(the old one stays\): refusing to "
                                                r"listen on tcp://0.0.0.0:2376 without mutual TLS"):
        _run(bs.apply(LocalRemote(), bad, wheels, layout, 15.0))
    assert Path(layout.config).read_text() == "# the old one\n" and not Path(layout.config + ".new").exists()
    good = plan_for({"log-level": "debug"})
    _run(bs.apply(LocalRemote(), good, wheels, layout, 15.0))
    assert tomllib.loads(Path(layout.config).read_text())["log-level"] == "debug"


def test_agent_tls_files_are_reused_while_current(tmp_path: Path) -> None:
    from controller import ca as pki

    root = pki.init_ca(tmp_path / "ca")
    first = bs.agent_tls_files(root, "10.0.0.5")
    assert set(first) == {"ca.pem", "cert.pem", "key.pem"} and first["ca.pem"] == (root / "ca.pem").read_bytes()
    assert bs.agent_tls_files(root, "10.0.0.5") == first
    named = bs.agent_tls_files(root, "10.0.0.5", ["web1"])  # a name the certificate lacks: a new one
    assert named["cert.pem"] != first["cert.pem"]
    assert pki.describe(root / "agents" / "10.0.0.5").sans == ("DNS:web1", "IP:10.0.0.5")
    pki.init_ca(root, force=True)  # another CA: its certificate, not the old one
    assert bs.agent_tls_files(root, "10.0.0.5", ["web1"])["ca.pem"] == (root / "ca.pem").read_bytes()


# --- the command line ----------------------------------------------------------------------


def _skiff(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    from controller.main import cli

    result = CliRunner().invoke(cli, list(args), env={"SKIFF_CA_DIR": None, "SKIFF_INVENTORY": None, **(env or {})})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def wheel_dir(tmp_path: Path) -> Path:
    d = tmp_path / "wheels"
    d.mkdir()
    (d / "skiff-0.1.0-py3-none-any.whl").write_bytes(b"skiff")
    return d


def test_cli_refuses_bad_config_before_anything(wheel_dir: Path) -> None:
    code, out, err = _skiff("-H", "ssh://root@h1", "bootstrap", "--wheels", str(wheel_dir), "--config", "colour=red")
    assert code == 125 and out == "" and err.strip().startswith("Error: invalid --config 'colour=red': unknown key")


def test_cli_tls_needs_the_ca(wheel_dir: Path, tmp_path: Path) -> None:
    code, _, err = _skiff("-H", "ssh://root@h1", "bootstrap", "--wheels", str(wheel_dir), "--tls",
                          "--ca-dir", str(tmp_path / "none"))
    assert code == 1 and "--tls needs the fleet CA" in err and len(err.strip().splitlines()) == 1


def test_cli_hosts_not_over_ssh_fail_each(wheel_dir: Path) -> None:
    code, out, _ = _skiff("-H", "unix:///run/x.sock", "-H", "tcp://10.0.0.9:2376", "--format", "json",
                            "bootstrap", "--wheels", str(wheel_dir))
    assert code == 2
    results = json.loads(out)
    assert [(r["host"], r["status"]) for r in results] == [("unix:///run/x.sock", "FAILED"),
                                                          ("tcp://10.0.0.9:2376", "FAILED")]
    assert "goes over SSH" in results[0]["error"]


def test_cli_help_lists_bootstrap() -> None:
    code, out, _ = _skiff("--help")
    assert code == 0 and "bootstrap" in out
    code, out, _ = _skiff("bootstrap", "--help")
    assert code == 0 and "--wheels DIR" in out and "--config KEY=VALUE" in out and "--tls" in out


def test_summary_lines() -> None:
    from controller.fanout import OK, HostResult

    assert bs.summary_line(HostResult("h1", OK, {"changed": True, "actions": ["x"]})) == "h1\tchanged"
    assert bs.summary_line(HostResult("h2", OK, {"changed": False, "actions": []})) == "h2\tok"
