"""Ansible inventories as targets: parsing by Ansible, patterns, transports, errors, the cache, retry files."""

from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller import inventory
from controller.errors import UsageError
from controller.inventory import default_sources, load_targets, write_retry_file
from controller.targets import DEFAULT_TLS_PORT, REMOTE_SOCKET, Target

ROOT = Path(__file__).resolve().parents[2]

INI = """\
[web]
web[01:03]

[db]
db1 ansible_host=10.0.1.1 skiff_port=3000
db2 ansible_host=10.0.1.2

[prod:children]
web
db1_group

[db1_group]
db1

[prod:vars]
skiff_port=2400

[web:vars]
ansible_host="{{ inventory_hostname }}.example.com"
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private cache and home; no inventory or cache switches from the caller's environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SKIFF_INVENTORY", raising=False)
    monkeypatch.delenv("SKIFF_INVENTORY_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "skiff" / "inventory").glob("*.json"))


_writes = itertools.count()


def write(path: Path, text: str, mode: int | None = None) -> str:
    """Writes ``path`` with an mtime in the past, a different one each time: settled files, which
    the cache keeps results of."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    if mode is not None:
        path.chmod(mode)
    mtime = time.time() - 3600 + next(_writes)
    os.utime(path, (mtime, mtime))
    return str(path)


def names(targets: list[Target]) -> list[str]:
    return [t.name for t in targets]


def ansible_order(sources: list[str], pattern: str) -> list[str]:
    """The hosts Ansible itself selects, in its order."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    return [h.name for h in InventoryManager(loader=DataLoader(), sources=sources).get_hosts(pattern)]


# -- formats ------------------------------------------------------------------------------------------


def test_ini_groups_children_vars_and_ranges(tmp_path: Path) -> None:
    path = write(tmp_path / "hosts.ini", INI)
    targets = {t.name: t for t in load_targets([path])}
    assert sorted(targets) == ["db1", "db2", "web01", "web02", "web03"]
    # group vars of a parent group (prod), a templated ansible_host from web's vars
    assert targets["web02"] == Target("tcp://web02.example.com:2400", name="web02")
    # the host's own var beats its groups'
    assert targets["db1"] == Target("tcp://10.0.1.1:3000", name="db1")
    # not in prod: the default port
    assert targets["db2"] == Target(f"tcp://10.0.1.2:{DEFAULT_TLS_PORT}", name="db2")


def test_group_vars_and_host_vars_next_to_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "hosts", "[web]\nw1\nw2\n")
    write(tmp_path / "group_vars" / "web.yml", "skiff_port: 2501\n")
    write(tmp_path / "host_vars" / "w2.yml", "skiff_transport: ssh\nansible_user: root\n")
    assert load_targets([path]) == [Target("tcp://w1:2501", name="w1"), Target("ssh://root@w2:22", name="w2")]


def test_yaml_inventory(tmp_path: Path) -> None:
    path = write(tmp_path / "hosts.yml", """\
        all:
          vars:
            skiff_transport: ssh
          children:
            web:
              hosts:
                w1: {ansible_host: 192.0.2.1, ansible_user: deploy, ansible_port: 2222}
                w2: {ansible_host: "2001:db8::2", ansible_ssh_private_key_file: ~/.ssh/fleet}
        """)
    assert load_targets([path]) == [
        Target("ssh://deploy@192.0.2.1:2222", name="w1"),
        Target("ssh://[2001:db8::2]:22", name="w2", ssh_key=str(tmp_path / "home" / ".ssh" / "fleet")),
    ]


def test_directory_with_group_vars_and_host_vars(tmp_path: Path) -> None:
    inv = tmp_path / "inv"
    write(inv / "10-hosts", "[web]\nw1\nw2\n[db]\nd1\n")
    write(inv / "20-more.yml", "all:\n  children:\n    db:\n      hosts:\n        d2: {}\n")
    write(inv / "group_vars" / "all.yml", "skiff_port: 2600\n")
    write(inv / "group_vars" / "db" / "main.yml", "skiff_port: 2700\n")
    write(inv / "host_vars" / "w2.yml", "ansible_host: 10.9.9.9\n")
    targets = {t.name: t for t in load_targets([str(inv)])}
    assert targets == {
        "w1": Target("tcp://w1:2600", name="w1"),
        "w2": Target("tcp://10.9.9.9:2600", name="w2"),
        "d1": Target("tcp://d1:2700", name="d1"),
        "d2": Target("tcp://d2:2700", name="d2"),
    }


def dynamic_script(tmp_path: Path) -> str:
    doc = {
        "web": {"hosts": ["dyn1", "dyn2"], "vars": {"skiff_port": 4000}},
        "_meta": {"hostvars": {"dyn1": {"ansible_host": "10.3.0.1"},
                               "dyn2": {"skiff_transport": "ssh", "ansible_user": "ops"}}},
    }
    return write(tmp_path / "dynamic.py", f"""\
        #!{sys.executable}
        import json, sys
        doc = {doc!r}
        print(json.dumps(doc if "--list" in sys.argv else {{}}))
        """, mode=0o755)


def test_dynamic_inventory_script(tmp_path: Path) -> None:
    assert load_targets([dynamic_script(tmp_path)]) == [
        Target("tcp://10.3.0.1:4000", name="dyn1"),
        Target("ssh://ops@dyn2:22", name="dyn2"),
    ]


def test_comma_host_list_and_several_sources(tmp_path: Path) -> None:
    assert load_targets(["a.example,b.example,"]) == [
        Target(f"tcp://a.example:{DEFAULT_TLS_PORT}", name="a.example"),
        Target(f"tcp://b.example:{DEFAULT_TLS_PORT}", name="b.example"),
    ]
    one = write(tmp_path / "one.ini", "[web]\nw1\n")
    two = write(tmp_path / "two.ini", "[web]\nw2\n")
    assert names(load_targets([one, two], "web")) == ["w1", "w2"]


# -- patterns -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "expected"), [
    ("web", ["web01", "web02", "web03"]),
    ("web:&prod", ["web01", "web02", "web03"]),
    ("prod:&db", ["db1"]),
    ("all:!db1", None),
    ("db:!db1", ["db2"]),
    ("web[0:1]", ["web01", "web02"]),
    ("web[-1]", ["web03"]),
    ("web0*", ["web01", "web02", "web03"]),
    ("db*", None),
    (r"~web0[13]", ["web01", "web03"]),
    (r"~db\d", ["db1", "db2"]),
    ("db2,web01", ["db2", "web01"]),
    ("db2:web01", ["db2", "web01"]),
])
def test_patterns_select_what_ansible_selects(tmp_path: Path, pattern: str, expected: list[str] | None) -> None:
    path = write(tmp_path / "hosts.ini", INI)
    got = names(load_targets([path], pattern))
    assert got == ansible_order([path], pattern)
    if expected is not None:
        assert got == expected


# -- transports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hostvars", "expected"), [
    ("", Target(f"tcp://h1:{DEFAULT_TLS_PORT}", name="h1")),
    ("ansible_host=10.1.1.1 skiff_port=3000", Target("tcp://10.1.1.1:3000", name="h1")),
    ("skiff_transport=grpc skiff_port='\"3001\"'", Target("tcp://h1:3001", name="h1")),
    ("ansible_host=fd00::7", Target(f"tcp://[fd00::7]:{DEFAULT_TLS_PORT}", name="h1")),
    ("ansible_host=[fd00::7] skiff_port=9", Target("tcp://[fd00::7]:9", name="h1")),
    ("ansible_connection=local", Target(f"unix://{REMOTE_SOCKET}", name="h1")),
    ("ansible_connection=local skiff_socket=/tmp/a.sock", Target("unix:///tmp/a.sock", name="h1")),
    ("skiff_transport=ssh", Target("ssh://h1:22", name="h1")),
    ("skiff_transport=ssh ansible_host=192.0.2.9 ansible_user=u ansible_port=2222",
     Target("ssh://u@192.0.2.9:2222", name="h1")),
    ("skiff_transport=ssh ansible_ssh_user=v ansible_ssh_port=2223", Target("ssh://v@h1:2223", name="h1")),
    ("skiff_transport=ssh ansible_host=::1", Target("ssh://[::1]:22", name="h1")),
    ("skiff_transport=ssh ansible_ssh_private_key_file=/keys/a skiff_socket=/run/other.sock",
     Target("ssh://h1:22", name="h1", ssh_key="/keys/a", socket="/run/other.sock")),
    ("skiff_transport=ssh ansible_private_key_file=~/k", Target("ssh://h1:22", name="h1", ssh_key="HOME/k")),
    ("skiff_transport=ssh ansible_connection=local", Target("ssh://h1:22", name="h1")),
    ("skiff_transport=ssh skiff_port=3000 ansible_port=2200", Target("ssh://h1:2200", name="h1")),
])
def test_transport_mapping(tmp_path: Path, hostvars: str, expected: Target) -> None:
    path = write(tmp_path / "hosts.ini", f"h1 {hostvars}\n")
    if expected.ssh_key and expected.ssh_key.startswith("HOME/"):
        expected = Target(expected.url, expected.name, str(tmp_path / "home" / expected.ssh_key[5:]))
    assert load_targets([path]) == [expected]


def test_implicit_localhost_is_the_local_agent(tmp_path: Path) -> None:
    path = write(tmp_path / "hosts.ini", "[web]\nw1\n")
    assert load_targets([path], "localhost") == [Target(f"unix://{REMOTE_SOCKET}", name="localhost")]


@pytest.mark.parametrize(("hostvars", "message"), [
    ("skiff_transport=telnet", "host h1: skiff_transport 'telnet' is not grpc or ssh"),
    ("skiff_port=http", "host h1: skiff_port 'http' is not a port number"),
    ("skiff_port=70000", "host h1: skiff_port '70000' is not a port number"),
    ("skiff_transport=ssh ansible_port=0", "host h1: ansible_port '0' is not a port number"),
    ("ansible_connection=local skiff_socket=run/x.sock", "host h1: skiff_socket 'run/x.sock' is not an absolute path"),
])
def test_bad_connection_vars(tmp_path: Path, hostvars: str, message: str) -> None:
    path = write(tmp_path / "hosts.ini", f"h1 {hostvars}\n")
    with pytest.raises(UsageError) as err:
        load_targets([path])
    assert str(err.value) == message


# -- errors -------------------------------------------------------------------------------------------


def one_line_error(capfd: pytest.CaptureFixture[str], sources: list[str], pattern: str = "all") -> str:
    """The UsageError's message, checking it is one line and that Ansible printed nothing."""
    with pytest.raises(UsageError) as err:
        load_targets(sources, pattern)
    message = str(err.value)
    assert "\n" not in message
    out, errout = capfd.readouterr()
    assert (out, errout) == ("", "")
    return message


def test_missing_inventory(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert one_line_error(capfd, ["nope.ini"]) == "inventory nope.ini: no such file"
    assert one_line_error(capfd, []) == "no inventory given: -i PATH or $SKIFF_INVENTORY"


def test_unparsable_ini(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "broken.ini", "[web\nw1 a b c\n")
    message = one_line_error(capfd, [path])
    assert message.startswith(f"inventory {path}: cannot parse as ini: ")


def test_unparsable_yaml(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "hosts.yml", "all:\n  hosts:\n    a: [\n")
    message = one_line_error(capfd, [path])
    assert message.startswith(f"inventory {path}:") and "YAML parsing failed" in message


def test_unparsable_file_in_a_directory_is_named_as_given(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "inv" / "good", "[web]\nw1\n")
    write(tmp_path / "inv" / "bad", "[web\nw2 x y\n")
    message = one_line_error(capfd, ["inv"])
    assert message.startswith("inventory inv/bad: cannot parse as ini: ")


def test_broken_script(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "inv.sh", "#!/bin/sh\necho not-json\n", mode=0o755)
    message = one_line_error(capfd, [path])
    assert message.startswith(f"inventory {path}: cannot parse as script: ")


def test_directory_without_inventory(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "inv" / "group_vars" / "all.yml", "a: 1\n")
    assert one_line_error(capfd, ["inv"]) == "inventory inv: no inventory file in this directory"


def test_broken_group_vars_name_their_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "hosts", "[web]\nw1\n")
    vars_file = write(tmp_path / "group_vars" / "web.yml", "a: [\n")
    message = one_line_error(capfd, [path])
    assert message.startswith(f"inventory {vars_file}:") and "YAML parsing failed" in message


def test_no_host_matches(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "hosts.ini", INI)
    assert one_line_error(capfd, [path], "cache") == "no hosts in inventory match cache"
    assert one_line_error(capfd, [path], "web:&db") == "no hosts in inventory match web:&db"
    empty = write(tmp_path / "empty.ini", "# nothing yet\n")
    assert one_line_error(capfd, [empty]) == "no hosts in inventory match all"


@pytest.mark.parametrize("pattern", ["~web(", "web[9]"])
def test_malformed_pattern(tmp_path: Path, capfd: pytest.CaptureFixture[str], pattern: str) -> None:
    path = write(tmp_path / "hosts.ini", INI)
    assert one_line_error(capfd, [path], pattern).startswith(f"invalid host pattern {pattern!r}: ")


def test_pattern_part_matching_nothing_is_one_warning(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "hosts.ini", INI)
    for _ in range(2):  # the second time from the cache, with the same warning
        assert names(load_targets([path], "db:nope")) == ["db1", "db2"]
        out, errout = capfd.readouterr()
        assert (out, errout) == ("", "WARNING: inventory: Could not match supplied host pattern, ignoring: nope\n")
    assert len(cache_files(tmp_path)) == 1


def test_ansible_display_is_left_as_found(tmp_path: Path) -> None:
    from ansible.utils.display import Display

    path = write(tmp_path / "broken.ini", "[web\n")
    with pytest.raises(UsageError):
        load_targets([path])
    assert not {"warning", "error_as_warning", "deprecated"} & set(vars(Display()))


def test_template_errors(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "hosts.ini", 'h1 ansible_host="{{ nope }}"\n')
    assert one_line_error(capfd, [path]) == "host h1: ansible_host: 'nope' is undefined"


def test_vaulted_connection_vars(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from ansible.parsing.vault import VaultLib, VaultSecret

    sealed = VaultLib([("default", VaultSecret(b"pw"))]).encrypt("10.0.0.1").decode()
    path = write(tmp_path / "hosts", "h1\n")
    write(tmp_path / "host_vars" / "h1.yml", "ansible_host: !vault |\n" + textwrap.indent(sealed, "  "))
    assert one_line_error(capfd, [path]).startswith("host h1: ansible_host is vault-encrypted; ")


@pytest.mark.parametrize("strict", [False, True])
def test_cli_user_sees_one_line_and_no_traceback(tmp_path: Path, strict: bool) -> None:
    """Also with Ansible told to fail on unparsed sources (its own error would not name the reason)."""
    path = write(tmp_path / "broken.ini", "[web\nw1 a b c\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if strict:
        env |= {"ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "1", "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"}
    code = ("import sys\nfrom controller.inventory import load_targets\nfrom controller.errors import UsageError\n"
            "try:\n    load_targets(sys.argv[1:])\nexcept UsageError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, capture_output=True, text=True, env=env,
                          check=True)
    assert proc.stderr == ""
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(f"inventory {path}: cannot parse as ini: ")


# -- the cache ----------------------------------------------------------------------------------------


def count_resolves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = inventory._resolve

    def counting(sources: list[str], given: list[str], pattern: str) -> inventory._Resolved:
        calls[0] += 1
        return real(sources, given, pattern)

    monkeypatch.setattr(inventory, "_resolve", counting)
    return calls


def test_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "hosts.ini", INI)
    calls = count_resolves(monkeypatch)
    first = load_targets([path], "prod")
    assert load_targets([path], "prod") == first
    assert calls == [1]
    [entry] = cache_files(tmp_path)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    load_targets([path], "db")  # another pattern, another entry
    assert calls == [2] and len(cache_files(tmp_path)) == 2


def test_cache_hit_does_not_import_ansible(tmp_path: Path) -> None:
    path = write(tmp_path / "hosts.ini", INI)
    code = ("import sys, json\nfrom controller.inventory import load_targets\n"
            "targets = load_targets([sys.argv[1]])\n"
            "print(json.dumps([[t.url, t.name] for t in targets]), 'ansible' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cold = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env, check=True)
    warm = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env, check=True)
    assert cold.stdout.endswith(" True\n") and warm.stdout.endswith(" False\n")
    assert cold.stdout.split()[:-1] == warm.stdout.split()[:-1]
    assert warm.stderr == ""


def test_cache_invalidated_when_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "hosts", "[web]\nw1\n")
    calls = count_resolves(monkeypatch)
    assert load_targets([path]) == [Target(f"tcp://w1:{DEFAULT_TLS_PORT}", name="w1")]
    write(tmp_path / "hosts", "[web]\nw1\nw2\n")
    assert names(load_targets([path])) == ["w1", "w2"]
    # a group_vars file appearing next to the inventory, then changing
    write(tmp_path / "group_vars" / "web.yml", "skiff_port: 2800\n")
    assert load_targets([path])[0].url == "tcp://w1:2800"
    write(tmp_path / "group_vars" / "web.yml", "skiff_port: 2900\n")  # same size, another mtime
    assert load_targets([path])[0].url == "tcp://w1:2900"
    assert calls == [4]
    assert load_targets([path])[0].url == "tcp://w1:2900"
    assert calls == [4]


def test_cache_invalidated_by_ansible_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "hosts", "[web]\nw1\n")
    calls = count_resolves(monkeypatch)
    load_targets([path])
    monkeypatch.setenv("ANSIBLE_INVENTORY_IGNORE", "~")
    load_targets([path])
    assert calls == [2]


def test_directory_cache_invalidated_by_a_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "inv" / "a", "[web]\nw1\n")
    calls = count_resolves(monkeypatch)
    assert names(load_targets(["inv"])) == ["w1"]
    write(tmp_path / "inv" / "b", "[web]\nw2\n")
    assert names(load_targets(["inv"])) == ["w1", "w2"]
    write(tmp_path / "inv" / "host_vars" / "w2.yml", "skiff_port: 1\n")
    assert load_targets(["inv"])[1].url == "tcp://w2:1"
    assert calls == [3]


def test_no_cache_for_scripts_host_lists_or_plugin_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = dynamic_script(tmp_path)
    calls = count_resolves(monkeypatch)
    load_targets([script])
    load_targets([script])
    load_targets(["x.example,"])
    write(tmp_path / "inv" / "hosts", "[web]\nw1\n")
    Path(script).rename(tmp_path / "inv" / "dynamic.py")
    load_targets(["inv"])  # a directory holding a script
    assert calls == [4]
    assert cache_files(tmp_path) == []
    with pytest.raises(UsageError):  # unknown plugin; the point is that nothing was cached
        load_targets([write(tmp_path / "aws.yml", "plugin: example.nope.cloud\n")])
    assert inventory._source_files(str(tmp_path / "aws.yml")) is None


def test_no_cache_for_lookups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_ADDR", "10.7.7.7")
    path = write(tmp_path / "hosts.ini", "h1 ansible_host=\"{{ lookup('env', 'AGENT_ADDR') }}\"\n")
    assert load_targets([path]) == [Target(f"tcp://10.7.7.7:{DEFAULT_TLS_PORT}", name="h1")]
    assert cache_files(tmp_path) == []


def test_cache_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIFF_INVENTORY_CACHE", "0")
    path = write(tmp_path / "hosts.ini", INI)
    calls = count_resolves(monkeypatch)
    load_targets([path])
    load_targets([path])
    assert calls == [2] and cache_files(tmp_path) == []


def test_cache_problems_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "hosts.ini", INI)
    expected = load_targets([path])
    [entry] = cache_files(tmp_path)
    entry.write_text("{not json")
    assert load_targets([path]) == expected
    entry.write_text(json.dumps({"format": inventory.CACHE_FORMAT, "targets": [{"url": 1}]}))
    assert load_targets([path]) == expected
    monkeypatch.setenv("XDG_CACHE_HOME", write(tmp_path / "a-file", ""))  # cannot be a directory
    assert load_targets([path]) == expected


# -- retry files --------------------------------------------------------------------------------------


def test_retry_file_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path / "hosts.yml", """\
        all:
          hosts:
            g1: {ansible_host: 10.0.0.1, skiff_port: 2400}
            g6: {ansible_host: "fd00::6"}
            local: {ansible_connection: local, skiff_socket: /run/alt skiff.sock}
            s1: {skiff_transport: ssh, ansible_host: Box.example, ansible_user: ops, ansible_port: 2222,
                 ansible_ssh_private_key_file: "/keys/my key", skiff_socket: /run/s.sock}
            s2: {skiff_transport: ssh, ansible_host: "1e3"}
            "True": {ansible_host: None}
        """)
    targets = load_targets([path])
    retry = tmp_path / "retry.ini"
    write_retry_file(retry, targets)
    assert load_targets([str(retry)]) == targets
    assert ansible_order([str(retry)], "all") == names(targets)


def test_retry_file_for_unnamed_hosts(tmp_path: Path) -> None:
    given = [
        Target("tcp://10.0.0.5:2376"),
        Target("tcp://10.0.0.5:2377"),
        Target("tcp://[fd00::1]:2376"),
        Target("ssh://admin@Host-A.example:2201", ssh_key="/k"),
        Target(f"unix://{REMOTE_SOCKET}"),
        Target("/tmp/agent.sock"),
    ]
    retry = tmp_path / "retry.ini"
    write_retry_file(retry, given)
    got = load_targets([str(retry)])
    assert [t.url for t in got] == [t.url if "://" in t.url else f"unix://{t.url}" for t in given]
    assert [t.ssh_key for t in got] == [t.ssh_key for t in given]
    assert names(got) == ["10.0.0.5", "10.0.0.5-2", "fd00-1", "Host-A.example", "localhost", "localhost-2"]


def test_retry_file_without_ports_keeps_the_defaults(tmp_path: Path) -> None:
    retry = tmp_path / "retry.ini"
    write_retry_file(retry, [Target("ssh://h2"), Target("tcp://h3:9", name="web 3")])
    assert load_targets([str(retry)]) == [Target("ssh://h2:22", name="h2"), Target("tcp://h3:9", name="web-3")]


# -- the rest -----------------------------------------------------------------------------------------


def test_default_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_sources() == []
    monkeypatch.setenv("SKIFF_INVENTORY", "prod.ini, staging/ ,")
    assert default_sources() == ["prod.ini", "staging/"]
    odd = write(tmp_path / "a,b.ini", "h1\n")
    monkeypatch.setenv("SKIFF_INVENTORY", odd)
    assert default_sources() == [odd]


def test_import_does_not_import_ansible() -> None:
    code = ("import sys\nimport controller.inventory\n"
            "print(sorted(m for m in sys.modules if m == 'ansible' or m.startswith('ansible.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout == "[]\n"
