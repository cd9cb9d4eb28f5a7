"""Tests for agent.runtime.imageconfig (Docker's run/image rules) and agent.runtime.spec (config.json)."""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path
from typing import Any

import pytest

from agent.errors import InvalidArgument
from agent.runtime.imageconfig import (
    DEFAULT_PATH,
    merge_env,
    parse_env_file,
    parse_signal,
    read_file_in_root,
    resolve_command,
    resolve_user,
    stop_signal,
    working_dir,
)
from agent.runtime.spec import (
    CAPABILITIES,
    DEFAULT_CAPABILITIES,
    DEFAULT_MASKED_PATHS,
    DEFAULT_PIDS_LIMIT,
    DEFAULT_READONLY_PATHS,
    RLIM_INFINITY,
    ContainerSpecOptions,
    Mount,
    Resources,
    build_spec,
    capability_mask,
    tweak_capabilities,
)

# --- Entrypoint / Cmd -------------------------------------------------------------

EP = ["/entry", "--flag"]
CMD = ["serve", "--port", "80"]

COMMAND_CASES = [
    # image entrypoint, image cmd, --entrypoint, args after the image → argv (None: error)
    pytest.param(None, ["sh"], None, None, ["sh"], id="image-cmd-only"),
    pytest.param(None, ["sh"], None, ["echo", "hi"], ["echo", "hi"], id="args-replace-cmd"),
    pytest.param(EP, CMD, None, None, EP + CMD, id="entrypoint-plus-cmd"),
    pytest.param(EP, CMD, None, ["x"], EP + ["x"], id="args-replace-cmd-after-entrypoint"),
    pytest.param(EP, None, None, None, EP, id="entrypoint-only"),
    pytest.param(EP, [], None, [], EP, id="empty-args-are-no-args"),
    pytest.param(EP, CMD, "/other", None, ["/other"], id="entrypoint-override-drops-image-cmd"),
    pytest.param(EP, CMD, "/other", ["a", "b"], ["/other", "a", "b"], id="entrypoint-override-plus-args"),
    pytest.param(None, CMD, "/bin/my tool", None, ["/bin/my tool"], id="entrypoint-override-not-split"),
    pytest.param(EP, CMD, "", ["echo", "hi"], ["echo", "hi"], id="empty-entrypoint-clears"),
    pytest.param(EP, CMD, "", None, None, id="empty-entrypoint-no-args-error"),
    pytest.param(None, CMD, "", None, None, id="empty-entrypoint-drops-image-cmd"),
    pytest.param([""], CMD, None, None, CMD, id="image-empty-entrypoint-is-none"),
    pytest.param(None, None, None, None, None, id="nothing-error"),
    pytest.param([], [], None, [], None, id="all-empty-error"),
]


@pytest.mark.parametrize(("image_ep", "image_cmd", "ep_override", "args", "expected"), COMMAND_CASES)
def test_resolve_command(image_ep: list[str] | None, image_cmd: list[str] | None, ep_override: str | None,
                         args: list[str] | None, expected: list[str] | None) -> None:
    if expected is None:
        with pytest.raises(InvalidArgument, match="no command specified"):
            resolve_command(image_ep, image_cmd, ep_override, args)
    else:
        assert resolve_command(image_ep, image_cmd, ep_override, args) == expected


def test_resolve_command_does_not_alias_inputs() -> None:
    image_cmd = ["a"]
    argv = resolve_command(None, image_cmd, None, None)
    argv.append("b")
    assert image_cmd == ["a"]


# --- environment ------------------------------------------------------------------------


def _as_dict(env: list[str]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in env)


def test_merge_env_defaults() -> None:
    env = merge_env([], [], [], hostname="box")
    assert env == [f"PATH={DEFAULT_PATH}", "HOSTNAME=box"]
    assert "TERM=xterm" in merge_env([], [], [], terminal=True)
    assert not any(e.startswith("HOSTNAME=") for e in merge_env([], [], []))


def test_merge_env_precedence_later_wins() -> None:
    env = merge_env(
        ["PATH=/image/bin", "A=image", "B=image", "C=image"],
        ["C=flag", "D=flag", "C=flag2"],
        ["B=file1\nC=file1\n", "B=file2\n"],
        hostname="box",
    )
    d = _as_dict(env)
    assert d == {"PATH": "/image/bin", "HOSTNAME": "box", "A": "image", "B": "file2", "C": "flag2", "D": "flag"}
    assert len(env) == len(d)
    assert env[0] == "PATH=/image/bin"  # a key keeps its first position


def test_merge_env_bare_names_come_from_callers_environment() -> None:
    caller = {"TOKEN": "s3cret", "EMPTY": ""}
    env = _as_dict(merge_env(["TOKEN=image"], ["TOKEN", "EMPTY"], [], caller))
    assert env["TOKEN"] == "s3cret"
    assert env["EMPTY"] == ""


def test_merge_env_bare_name_missing_from_caller_unsets() -> None:
    env = _as_dict(merge_env(["GONE=image", "KEEP=1"], ["GONE", "PATH", "NEVER"], [], {}))
    assert "GONE" not in env and "PATH" not in env and "NEVER" not in env
    assert env["KEEP"] == "1"


def test_merge_env_never_reads_agents_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIFF_AGENT_SECRET", "agent-only")
    assert not any("agent-only" in e for e in merge_env([], ["SKIFF_AGENT_SECRET"], ["SKIFF_AGENT_SECRET\n"]))


def test_merge_env_rejects_empty_name() -> None:
    with pytest.raises(InvalidArgument, match="invalid environment variable"):
        merge_env([], ["=value"], [])


def test_env_file_parsing_as_docker_cli() -> None:
    text = (
        "\ufeffFIRST=1\r\n"
        "# a comment\n"
        "\n"
        "   \t\n"
        "  INDENTED=yes\n"
        "SPACES=  kept as is  \n"
        "QUOTED=\"not unquoted\"\n"
        "EQUALS=a=b=c\n"
        "EMPTY=\n"
        "FROM_CALLER\n"
        "NOT_IN_CALLER\n"
        "  # indented comment\n"
    )
    assert parse_env_file(text, {"FROM_CALLER": "v"}) == [
        "FIRST=1", "INDENTED=yes", "SPACES=  kept as is  ", 'QUOTED="not unquoted"', "EQUALS=a=b=c",
        "EMPTY=", "FROM_CALLER=v",
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("BAD KEY=1\n", "contains whitespaces"),
    ("KEY =1\n", "contains whitespaces"),
    ("=value\n", "no variable name"),
])
def test_env_file_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_env_file(text)
    with pytest.raises(InvalidArgument, match="env file #2 line 1"):
        merge_env([], [], ["OK=1\n", text])


# --- users -------------------------------------------------------------------------------

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "# a comment\n"
    "\n"
    "broken:x:notanumber:1\n"
    "lonely:x:1001:1001::/:/bin/sh\n"
)
GROUP = (
    "root:x:0:\n"
    "daemon:x:1:\n"
    "app:x:1000:\n"
    "docker:x:999:app,daemon\n"
    "video:x:44: app \n"
    "staff:x:50:\n"
)


def _rootfs(tmp_path: Path, passwd: str | None = PASSWD, group: str | None = GROUP) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    if passwd is not None:
        (root / "etc/passwd").write_text(passwd)
    if group is not None:
        (root / "etc/group").write_text(group)
    return root


@pytest.mark.parametrize(("spec", "expected"), [
    ("", (0, 0, [])),
    ("root", (0, 0, [])),
    ("0", (0, 0, [])),
    ("app", (1000, 1000, [999, 44])),
    ("1000", (1000, 1000, [999, 44])),
    ("lonely", (1001, 1001, [])),
    ("4242", (4242, 0, [])),
    ("app:staff", (1000, 50, [])),
    ("app:50", (1000, 50, [])),
    ("app:7777", (1000, 7777, [])),
    ("1000:1000", (1000, 1000, [])),
    ("4242:4343", (4242, 4343, [])),
    ("daemon:docker", (1, 999, [])),
    (":staff", (0, 50, [])),
])
def test_resolve_user(tmp_path: Path, spec: str, expected: tuple[int, int, list[int]]) -> None:
    assert resolve_user(_rootfs(tmp_path), spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("nobody", "unable to find user nobody: no matching entries in passwd file"),
    ("broken", "unable to find user broken"),
    ("app:nogroup", "unable to find group nogroup: no matching entries in group file"),
    ("3000000000", "out of range"),
    ("app:", "empty group"),
])
def test_resolve_user_errors(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        resolve_user(_rootfs(tmp_path), spec)


def test_resolve_user_without_account_files(tmp_path: Path) -> None:
    root = _rootfs(tmp_path, passwd=None, group=None)
    assert resolve_user(root, "") == (0, 0, [])
    assert resolve_user(root, "123:456") == (123, 456, [])
    with pytest.raises(InvalidArgument, match="unable to find user app"):
        resolve_user(root, "app")
    with pytest.raises(InvalidArgument, match="unable to find group staff"):
        resolve_user(root, "1:staff")


def _host_passwd(tmp_path: Path) -> Path:
    """A passwd file outside the rootfs with a user the rootfs must never see."""
    outside = tmp_path / "host" / "etc"
    outside.mkdir(parents=True)
    (outside / "passwd").write_text("hostuser:x:4242:4242::/:/bin/sh\n")
    (outside / "group").write_text("hostgroup:x:4343:\n")
    return outside / "passwd"


def test_symlinked_passwd_to_absolute_host_path_stays_inside(tmp_path: Path) -> None:
    host_passwd = _host_passwd(tmp_path)
    root = _rootfs(tmp_path, passwd=None, group=None)
    (root / "etc/passwd").symlink_to(host_passwd)  # absolute: re-rooted at the rootfs
    (root / "etc/group").symlink_to(host_passwd.parent / "group")
    with pytest.raises(InvalidArgument, match="unable to find user hostuser"):
        resolve_user(root, "hostuser")
    with pytest.raises(InvalidArgument, match="unable to find group hostgroup"):
        resolve_user(root, "0:hostgroup")
    assert read_file_in_root(root, "/etc/passwd") is None


def test_symlinked_passwd_with_dotdot_stays_inside(tmp_path: Path) -> None:
    host_passwd = _host_passwd(tmp_path)
    root = _rootfs(tmp_path, passwd=None, group=None)
    ups = "../" * (len(root.parts) + 3)
    (root / "etc/passwd").symlink_to(ups + str(host_passwd).lstrip("/"))
    with pytest.raises(InvalidArgument, match="unable to find user hostuser"):
        resolve_user(root, "hostuser")
    assert read_file_in_root(root, "etc/passwd") is None


def test_symlinked_etc_directory_stays_inside(tmp_path: Path) -> None:
    host_passwd = _host_passwd(tmp_path)
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").symlink_to(host_passwd.parent)
    with pytest.raises(InvalidArgument, match="unable to find user hostuser"):
        resolve_user(root, "hostuser")


def test_symlinks_inside_the_rootfs_are_followed_in_scope(tmp_path: Path) -> None:
    root = _rootfs(tmp_path, passwd=None, group=None)
    (root / "usr/share/base").mkdir(parents=True)
    (root / "usr/share/base/passwd").write_text(PASSWD)
    (root / "usr/share/base/group").write_text(GROUP)
    (root / "etc/passwd").symlink_to("/usr/share/base/passwd")  # absolute, meant inside the image
    (root / "etc/group").symlink_to("../usr/./share/base/../base/group")
    assert resolve_user(root, "app") == (1000, 1000, [999, 44])


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    root = _rootfs(tmp_path, passwd=None, group=None)
    (root / "etc/passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidArgument, match="too many levels of symbolic links"):
        resolve_user(root, "app")


def test_passwd_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    root = _rootfs(tmp_path, passwd=None)
    os.mkfifo(root / "etc/passwd")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        resolve_user(root, "app")


def test_passwd_that_is_a_directory_counts_as_missing(tmp_path: Path) -> None:
    root = _rootfs(tmp_path, passwd=None)
    (root / "etc/passwd").mkdir()
    assert resolve_user(root, "7") == (7, 0, [])


# --- working dir and stop signal -----------------------------------------------------------


def test_working_dir() -> None:
    assert working_dir(None, None) == "/"
    assert working_dir("", None) == "/"
    assert working_dir("/app", None) == "/app"
    assert working_dir("/app", "/srv/./x/../y/") == "/srv/y"
    assert working_dir(None, "//double") == "/double"
    with pytest.raises(InvalidArgument, match="needs to be an absolute path"):
        working_dir(None, "relative")
    with pytest.raises(InvalidArgument, match="needs to be an absolute path"):
        working_dir("relative/from/image", None)


@pytest.mark.parametrize(("text", "number"), [
    ("SIGTERM", 15), ("TERM", 15), ("term", 15), ("sigkill", 9), ("15", 15), ("SIGUSR1", 10),
    ("SIGRTMIN", 34), ("RTMIN+3", 37), ("SIGRTMAX-2", 62), ("SIGRTMAX", 64), ("IOT", int(signal.SIGABRT)),
])
def test_parse_signal(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["", "SIGNOPE", "0", "65", "-9", "1.5", "RTMIN+16"])
def test_parse_signal_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid signal"):
        parse_signal(text)


def test_stop_signal_precedence() -> None:
    assert stop_signal(None, None) == 15
    assert stop_signal("SIGQUIT", None) == 3
    assert stop_signal("SIGQUIT", "SIGINT") == 2
    assert stop_signal("", "") == 15


# --- capabilities ------------------------------------------------------------------------------


def test_default_capability_mask_is_dockers() -> None:
    assert len(DEFAULT_CAPABILITIES) == 14
    assert capability_mask(DEFAULT_CAPABILITIES) == 0x00000000A80425FB


def _spec(**kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("args", ["sh"])
    kwargs.setdefault("rootfs", Path("/var/lib/skiff/rootfs/x"))
    return build_spec(ContainerSpecOptions(**kwargs))


def test_spec_default_capabilities() -> None:
    caps = _spec()["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        assert capability_mask(caps[kind]) == 0xA80425FB
    assert caps["inheritable"] == []
    assert caps["ambient"] == []


def test_spec_non_root_keeps_only_bounding_set() -> None:
    caps = _spec(uid=1000, gid=1000)["process"]["capabilities"]
    assert capability_mask(caps["bounding"]) == 0xA80425FB
    assert caps["effective"] == caps["permitted"] == caps["inheritable"] == caps["ambient"] == []


@pytest.mark.parametrize(("add", "drop", "expected"), [
    (["NET_ADMIN"], [], capability_mask(DEFAULT_CAPABILITIES) | 1 << 12),
    (["cap_sys_ptrace"], ["chown", "CAP_KILL"], (0xA80425FB | 1 << 19) & ~1 & ~(1 << 5)),
    ([], ["ALL"], 0),
    (["NET_BIND_SERVICE"], ["all"], 1 << 10),
    (["ALL"], ["SYS_ADMIN"], (1 << 41) - 1 - (1 << 21)),
    (["CHOWN"], [], 0xA80425FB),  # adding a default one changes nothing
])
def test_cap_add_drop(add: list[str], drop: list[str], expected: int) -> None:
    caps = tweak_capabilities(add, drop, cap_last_cap=40)
    assert len(caps) == len(set(caps))
    assert capability_mask(caps) == expected


def test_cap_all_follows_the_kernels_last_cap() -> None:
    assert capability_mask(tweak_capabilities(["ALL"], [], cap_last_cap=37)) == (1 << 38) - 1
    assert capability_mask(tweak_capabilities([], [], privileged=True, cap_last_cap=40)) == (1 << 41) - 1


@pytest.mark.parametrize("bad", ["CAP_NOPE", "sys_admn", "", "CAP_"])
def test_unknown_capability_is_invalid(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="unknown capability"):
        tweak_capabilities([bad], [])
    with pytest.raises(InvalidArgument, match="unknown capability"):
        _spec(cap_drop=[bad])


def test_capability_table_is_complete() -> None:
    assert sorted(CAPABILITIES.values()) == list(range(41))


# --- the spec document -------------------------------------------------------------------------


def _check_oci_shape(spec: dict[str, Any]) -> None:
    """The parts of the OCI config schema (1.0.2) runtimes rely on: types and required keys."""
    json.dumps(spec)  # plain JSON types only
    assert spec["ociVersion"] == "1.0.2"
    proc = spec["process"]
    assert isinstance(proc["args"], list) and proc["args"] and all(isinstance(a, str) for a in proc["args"])
    assert proc["cwd"].startswith("/")
    assert isinstance(proc["terminal"], bool) and isinstance(proc["noNewPrivileges"], bool)
    assert isinstance(proc["user"]["uid"], int) and isinstance(proc["user"]["gid"], int)
    assert all("=" in e for e in proc["env"])
    for rl in proc["rlimits"]:
        assert set(rl) == {"type", "soft", "hard"} and rl["type"].startswith("RLIMIT_")
        assert 0 <= rl["soft"] <= rl["hard"] <= RLIM_INFINITY
    for kind in ("bounding", "effective", "permitted", "inheritable", "ambient"):
        assert all(c.startswith("CAP_") for c in proc["capabilities"][kind])
    assert isinstance(spec["root"]["path"], str) and isinstance(spec["root"]["readonly"], bool)
    for m in spec["mounts"]:
        assert m["destination"].startswith("/")
        assert isinstance(m["type"], str) and isinstance(m["source"], str)
        assert all(isinstance(o, str) for o in m["options"])
    linux = spec["linux"]
    kinds = [ns["type"] for ns in linux["namespaces"]]
    assert len(kinds) == len(set(kinds))
    assert set(kinds) <= {"pid", "network", "mount", "ipc", "uts", "user", "cgroup"}
    for rule in linux["resources"]["devices"]:
        assert isinstance(rule["allow"], bool) and set(rule["access"]) <= set("rwm")
        assert rule.get("type", "a") in ("a", "b", "c")


def test_spec_shape_defaults() -> None:
    spec = _spec(hostname="box", env=["PATH=/bin"])
    _check_oci_shape(spec)
    assert spec["hostname"] == "box"
    assert spec["process"]["oomScoreAdj"] == 0
    assert "apparmorProfile" not in spec["process"]
    assert "seccomp" not in spec["linux"]
    assert "devices" not in spec["linux"]  # runc's default nodes


def test_masked_and_readonly_paths_are_dockers() -> None:
    linux = _spec()["linux"]
    assert linux["maskedPaths"] == list(DEFAULT_MASKED_PATHS)
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/sys/firmware",
                 "/proc/acpi", "/proc/asound", "/proc/latency_stats", "/proc/timer_stats", "/proc/scsi"):
        assert path in linux["maskedPaths"]
    assert linux["readonlyPaths"] == ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
    assert list(DEFAULT_READONLY_PATHS) == linux["readonlyPaths"]
    privileged = _spec(privileged=True)["linux"]
    assert privileged["maskedPaths"] == [] and privileged["readonlyPaths"] == []


def test_namespaces_network_none_host_and_path() -> None:
    def kinds(mode: str) -> list[dict[str, str]]:
        return list(_spec(network_mode=mode)["linux"]["namespaces"])

    none = kinds("none")
    assert {ns["type"] for ns in none} == {"pid", "ipc", "uts", "mount", "cgroup", "network"}
    assert {"type": "network"} in none
    host = kinds("host")
    assert {ns["type"] for ns in host} == {"pid", "ipc", "uts", "mount", "cgroup"}
    assert {"type": "network", "path": "/run/netns/c1"} in kinds("/run/netns/c1")
    with pytest.raises(InvalidArgument, match="network mode 'bridge' is not supported"):
        kinds("bridge")


def test_resources_translated() -> None:
    res = _spec(resources=Resources(memory=256 << 20, memory_reservation=128 << 20, cpus=1.5,
                                    cpuset_cpus="0-1,3", pids_limit=100))["linux"]["resources"]
    assert res["memory"] == {"limit": 268435456, "reservation": 134217728, "swap": 536870912}
    assert res["cpu"] == {"quota": 150000, "period": 100000, "cpus": "0-1,3"}
    assert res["pids"] == {"limit": 100}


def test_resources_defaults_and_unlimited() -> None:
    res = _spec()["linux"]["resources"]
    assert res["pids"] == {"limit": DEFAULT_PIDS_LIMIT}
    assert "memory" not in res and "cpu" not in res
    assert "pids" not in _spec(resources=Resources(pids_limit=-1))["linux"]["resources"]
    assert "pids" not in _spec(resources=Resources(pids_limit=0))["linux"]["resources"]
    assert _spec(resources=Resources(cpus=0.01))["linux"]["resources"]["cpu"]["quota"] == 1000


def test_memory_swap_rules() -> None:
    def memory(**kw: Any) -> dict[str, Any]:
        swap_ok = kw.pop("swap_ok", True)
        res = _spec(resources=Resources(**kw), swap_limit_supported=swap_ok)["linux"]["resources"]
        return dict(res["memory"])

    assert memory(memory=32 << 20) == {"limit": 32 << 20, "swap": 64 << 20}
    assert memory(memory=32 << 20, memory_swap=-1) == {"limit": 32 << 20, "swap": -1}
    assert memory(memory=32 << 20, memory_swap=32 << 20) == {"limit": 32 << 20, "swap": 32 << 20}
    assert memory(memory=32 << 20, swap_ok=False) == {"limit": 32 << 20}


@pytest.mark.parametrize(("res", "message"), [
    (Resources(memory=1 << 20), "minimum memory limit allowed is 6MB"),
    (Resources(memory_reservation=1 << 20), "minimum memory reservation"),
    (Resources(memory=64 << 20, memory_reservation=128 << 20), "at least the reservation"),
    (Resources(memory_swap=64 << 20), "needs --memory"),
    (Resources(memory=64 << 20, memory_swap=32 << 20), "must be at least --memory"),
    (Resources(cpus=0.001), "starts at 0.01"),
    (Resources(cpuset_cpus="0-"), "cpuset-cpus"),
    (Resources(cpuset_cpus="3-1"), "reversed"),
    (Resources(cpuset_cpus="a"), "cpuset-cpus"),
])
def test_resource_validation(res: Resources, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _spec(resources=res)


def test_rlimits_default_to_the_agents_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    rl = _spec()["process"]["rlimits"]
    assert rl == [{"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard}]


def test_ulimit_overrides() -> None:
    rl = _spec(ulimits={"nofile": (1024, 2048), "nproc": (100, 200), "core": (-1, -1),
                        "MEMLOCK": (0, 65536), "stack": (8 << 20, -1)})["process"]["rlimits"]
    by_type = {r["type"]: (r["soft"], r["hard"]) for r in rl}
    assert by_type == {
        "RLIMIT_NOFILE": (1024, 2048),
        "RLIMIT_NPROC": (100, 200),
        "RLIMIT_CORE": (RLIM_INFINITY, RLIM_INFINITY),
        "RLIMIT_MEMLOCK": (0, 65536),
        "RLIMIT_STACK": (8 << 20, RLIM_INFINITY),
    }


@pytest.mark.parametrize(("ulimits", "message"), [
    ({"nofile": (2048, 1024)}, "soft limit must be less than or equal to hard limit"),
    ({"core": (-1, 10)}, "soft limit must be less than or equal to hard limit"),
    ({"nofiles": (1, 1)}, "invalid ulimit type"),
    ({"nproc": (-5, 10)}, "invalid value"),
])
def test_ulimit_validation(ulimits: dict[str, tuple[int, int]], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _spec(ulimits=ulimits)


def test_default_mounts_and_etc_files() -> None:
    spec = _spec(hostname_path=Path("/run/skiff/c1/hostname"), hosts_path=Path("/run/skiff/c1/hosts"),
                 resolv_conf_path=Path("/run/skiff/c1/resolv.conf"))
    mounts = {m["destination"]: m for m in spec["mounts"]}
    order = [m["destination"] for m in spec["mounts"]]
    assert order == ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
                     "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]
    assert mounts["/proc"]["type"] == "proc"
    assert mounts["/dev"]["options"] == ["nosuid", "strictatime", "mode=755", "size=65536k"]
    assert mounts["/dev/pts"]["options"] == ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
    assert mounts["/dev/shm"]["type"] == "tmpfs"
    assert {"nosuid", "noexec", "nodev", f"size={64 << 20}"} <= set(mounts["/dev/shm"]["options"])
    assert mounts["/dev/mqueue"]["type"] == "mqueue"
    assert "ro" in mounts["/sys"]["options"] and "ro" in mounts["/sys/fs/cgroup"]["options"]
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup"
    assert mounts["/etc/hosts"] == {"destination": "/etc/hosts", "type": "bind", "source": "/run/skiff/c1/hosts",
                                    "options": ["rbind", "rprivate"]}


def test_readonly_rootfs_makes_etc_files_readonly() -> None:
    spec = _spec(readonly_rootfs=True, hosts_path=Path("/run/skiff/c1/hosts"))
    assert spec["root"]["readonly"] is True
    hosts = next(m for m in spec["mounts"] if m["destination"] == "/etc/hosts")
    assert "ro" in hosts["options"]


def test_extra_mounts_come_last_parents_first_and_override_defaults() -> None:
    extra = [
        Mount("/data/sub", "bind", "/srv/sub", ["rbind"]),
        Mount("/data", "bind", "/srv/data", ["rbind", "ro"]),
        Mount("/dev/shm", "tmpfs", "shm", ["size=1g"]),
        Mount("/etc/hosts", "bind", "/custom/hosts", ["rbind"]),
    ]
    spec = _spec(mounts=extra, hosts_path=Path("/run/skiff/c1/hosts"))
    dests = [m["destination"] for m in spec["mounts"]]
    assert dests.count("/dev/shm") == 1 and dests.count("/etc/hosts") == 1
    assert dests.index("/data") < dests.index("/data/sub")
    assert dests[-4:] == ["/data", "/data/sub", "/dev/shm", "/etc/hosts"]  # by depth, stable
    assert next(m for m in spec["mounts"] if m["destination"] == "/etc/hosts")["source"] == "/custom/hosts"

    dev = _spec(mounts=[Mount("/dev", "bind", "/dev", ["rbind"])])
    assert not [m for m in dev["mounts"] if m["destination"].startswith("/dev/")]


def test_bad_mount_destination() -> None:
    with pytest.raises(InvalidArgument, match="invalid mount destination"):
        _spec(mounts=[Mount("relative", "bind", "/x")])
    with pytest.raises(InvalidArgument, match="invalid mount destination"):
        _spec(mounts=[Mount("/a/../../etc", "bind", "/x")])


def test_device_cgroup_rules() -> None:
    rules = _spec()["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    allowed = {(r.get("type"), r.get("major"), r.get("minor")) for r in rules[1:] if r["allow"]}
    assert {("c", None, None), ("b", None, None)} <= allowed  # mknod of anything: c *:* m, b *:* m
    for dev in ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)):
        assert ("c", *dev) in allowed
    assert ("c", 136, None) in allowed  # /dev/pts/*
    assert _spec(privileged=True)["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]


def test_process_fields() -> None:
    spec = _spec(args=["/app", "--x"], env=["A=1"], cwd="/srv", uid=1000, gid=1000, additional_gids=[44, 999],
                 terminal=True, no_new_privileges=True, oom_score_adj=500)
    proc = spec["process"]
    assert proc["args"] == ["/app", "--x"] and proc["env"] == ["A=1"] and proc["cwd"] == "/srv"
    assert proc["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [44, 999]}
    assert proc["terminal"] is True and proc["noNewPrivileges"] is True
    assert proc["oomScoreAdj"] == 500
    assert "oomScoreAdj" not in _spec(oom_score_adj=None)["process"]


def test_seccomp_annotations_and_cgroups_path_pass_through() -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    spec = _spec(seccomp=profile, annotations={"org.skiff.id": "c1"}, cgroups_path="/skiff/c1")
    assert spec["linux"]["seccomp"] == profile
    assert spec["annotations"] == {"org.skiff.id": "c1"}
    assert spec["linux"]["cgroupsPath"] == "/skiff/c1"
    assert "seccomp" not in _spec(seccomp=profile, privileged=True)["linux"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"args": []}, "no command specified"),
    ({"cwd": "srv"}, "absolute path"),
    ({"hostname": "h" * 65}, "invalid hostname"),
    ({"uid": -1}, "out of range"),
    ({"additional_gids": [2**31]}, "out of range"),
    ({"oom_score_adj": 1001}, "oom-score-adj"),
    ({"cgroups_path": "relative/path"}, "invalid cgroups path"),
    ({"cgroups_path": "/skiff/../escape"}, "invalid cgroups path"),
    ({"shm_size": 0}, "shm-size"),
])
def test_spec_option_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _spec(**kwargs)
