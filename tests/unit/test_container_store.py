"""Tests for agent.containers.store (records, name resolution) and agent.containers.inspect (Docker views)."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.containers.inspect import inspect_document, matches, parse_filters, rfc3339
from agent.containers.store import ContainerRecord, ContainerStore, check_name, new_state
from agent.errors import Conflict, ContainerNotFound, InvalidArgument, NotFound
from agent.metadata import Database

ID_A = "a" * 8 + "1" * 56
ID_B = "a" * 8 + "2" * 56
ID_C = "c" * 64


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ContainerStore]:
    db = Database(tmp_path / "meta.db")
    yield ContainerStore(db)
    db.close()


def record(cid: str, name: str, *, created: int = 1, image_id: str = "sha256:" + "e" * 64,
           config: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> ContainerRecord:
    return ContainerRecord(cid, name, "busybox", image_id, created, config if config is not None else {"args": ["sh"]},
                           state if state is not None else new_state())


def conflict_message(name: str, holder: str) -> str:
    return (f'Conflict. The container name "/{name}" is already in use by container "{holder}". '
            "You have to remove (or rename) that container to be able to reuse that name.")


# --- store ------------------------------------------------------------------


def test_add_then_get_round_trips_every_field(store: ContainerStore) -> None:
    rec = record(ID_A, "web", created=42, config={"args": ["sh", "-c", "x"], "labels": {"a": "b"}})
    store.add(rec)
    got = store.get(ID_A)
    assert got == rec
    assert got is not None and got.status == "created" and not got.running


def test_get_unknown_is_none(store: ContainerStore) -> None:
    assert store.get(ID_A) is None


def test_all_lists_newest_first(store: ContainerStore) -> None:
    store.add(record(ID_A, "old", created=1))
    store.add(record(ID_C, "newest", created=3))
    store.add(record(ID_B, "middle", created=2))
    assert [r.name for r in store.all()] == ["newest", "middle", "old"]


def test_resolve_by_full_id_name_and_slash_name(store: ContainerStore) -> None:
    store.add(record(ID_A, "web"))
    assert store.resolve(ID_A).id == ID_A
    assert store.resolve("web").id == ID_A
    assert store.resolve("/web").id == ID_A


def test_resolve_by_unique_prefix(store: ContainerStore) -> None:
    store.add(record(ID_A, "one"))
    store.add(record(ID_C, "two"))
    assert store.resolve("c").id == ID_C
    assert store.resolve("aaaaaaaa1").id == ID_A


def test_resolve_prefers_exact_name_over_id_prefix(store: ContainerStore) -> None:
    store.add(record(ID_C, "other"))
    store.add(record(ID_A, "cc"))  # a name that is also a prefix of ID_C
    assert store.resolve("cc").id == ID_A


def test_resolve_ambiguous_prefix(store: ContainerStore) -> None:
    store.add(record(ID_A, "one"))
    store.add(record(ID_B, "two"))
    with pytest.raises(InvalidArgument, match="multiple IDs found with provided prefix: aaaa"):
        store.resolve("aaaa")


@pytest.mark.parametrize("ref", ["x", "nothing", "ffff", "/nope"])
def test_resolve_unknown(store: ContainerStore, ref: str) -> None:
    store.add(record(ID_A, "web"))
    with pytest.raises(ContainerNotFound) as info:
        store.resolve(ref)
    assert str(info.value) == f"No such container: {ref}"
    assert isinstance(info.value, NotFound)


def test_resolve_empty_is_invalid(store: ContainerStore) -> None:
    with pytest.raises(InvalidArgument):
        store.resolve("")


def test_add_name_conflict_uses_dockers_wording(store: ContainerStore) -> None:
    store.add(record(ID_A, "web"))
    with pytest.raises(Conflict) as info:
        store.add(record(ID_B, "web"))
    assert str(info.value) == conflict_message("web", ID_A)
    assert [r.id for r in store.all()] == [ID_A]


def test_rename(store: ContainerStore) -> None:
    rec = record(ID_A, "web")
    store.add(rec)
    store.rename(rec, "/api")
    assert rec.name == "api"
    assert store.resolve("api").id == ID_A
    with pytest.raises(ContainerNotFound):
        store.resolve("web")


def test_rename_to_taken_name_conflicts(store: ContainerStore) -> None:
    a, b = record(ID_A, "web"), record(ID_B, "db")
    store.add(a)
    store.add(b)
    with pytest.raises(Conflict) as info:
        store.rename(b, "web")
    assert str(info.value) == conflict_message("web", ID_A)
    assert b.name == "db"
    got = store.get(ID_B)
    assert got is not None and got.name == "db"


@pytest.mark.parametrize("same", ["web", "/web"])
def test_rename_to_same_name(store: ContainerStore, same: str) -> None:
    rec = record(ID_A, "web")
    store.add(rec)
    with pytest.raises(InvalidArgument, match="Renaming a container with the same name as its current name"):
        store.rename(rec, same)


def test_rename_checks_the_name(store: ContainerStore) -> None:
    rec = record(ID_A, "web")
    store.add(rec)
    with pytest.raises(InvalidArgument, match=re.escape("Invalid container name (bad name)")):
        store.rename(rec, "bad name")


@pytest.mark.parametrize("name,expected", [("web", "web"), ("/web", "web"), ("a1", "a1"),
                                           ("my_app-1.2", "my_app-1.2"), ("9lives", "9lives")])
def test_check_name_accepts(name: str, expected: str) -> None:
    assert check_name(name) == expected


@pytest.mark.parametrize("name", ["a", "/a", "_web", "-web", ".web", "web app", "web/1", "wéb", "", "//web"])
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_name(name)
    assert str(info.value) == f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"


def test_generate_name_is_valid_and_unique(store: ContainerStore) -> None:
    seen = set()
    for i in range(60):
        name = store.generate_name()
        assert re.fullmatch(r"[a-z]+_[a-z]+\d{0,2}", name)
        assert check_name(name) == name
        assert name not in seen
        seen.add(name)
        store.add(record(f"{i:064x}", name))


def test_generate_name_avoids_taken_names(store: ContainerStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.containers import store as storemod

    monkeypatch.setattr(storemod, "_LEFT", ("calm",))
    monkeypatch.setattr(storemod, "_RIGHT", ("curie",))
    store.add(record(ID_A, "calm_curie"))
    name = store.generate_name()
    assert name != "calm_curie"
    assert re.fullmatch(r"calm_curie\d{1,2}", name)


def test_using_image(store: ContainerStore) -> None:
    store.add(record(ID_A, "one", image_id="sha256:" + "1" * 64))
    store.add(record(ID_B, "two", image_id="sha256:" + "2" * 64))
    store.add(record(ID_C, "three", image_id="sha256:" + "1" * 64))
    assert sorted(r.id for r in store.using_image("sha256:" + "1" * 64)) == [ID_A, ID_C]
    assert store.using_image("sha256:" + "3" * 64) == []


def test_save_state_round_trip(store: ContainerStore, tmp_path: Path) -> None:
    rec = record(ID_A, "web", config={"args": ["sh"], "labels": {"k": "v"}})
    store.add(rec)
    rec.state.update(status="exited", exit_code=3, oom_killed=True, finished_at=123, pid=0)
    store.save_state(rec)
    reopened = ContainerStore(Database(tmp_path / "meta.db"))
    got = reopened.get(ID_A)
    assert got is not None
    assert got.state == rec.state
    assert got.status == "exited"
    assert got.config == {"args": ["sh"], "labels": {"k": "v"}}
    reopened.db.close()


def test_remove(store: ContainerStore) -> None:
    store.add(record(ID_A, "web"))
    store.remove(ID_A)
    assert store.get(ID_A) is None
    store.add(record(ID_B, "web"))  # the name is free again


# --- inspect ----------------------------------------------------------------

TOP_LEVEL = {"Id", "Created", "Path", "Args", "State", "Image", "ResolvConfPath", "HostnamePath", "HostsPath",
             "LogPath", "Name", "RestartCount", "Driver", "Platform", "MountLabel", "ProcessLabel",
             "AppArmorProfile", "ExecIDs", "HostConfig", "GraphDriver", "Mounts", "Config", "NetworkSettings"}
STATE_KEYS = {"Status", "Running", "Paused", "Restarting", "OOMKilled", "Dead", "Pid", "ExitCode", "Error",
              "StartedAt", "FinishedAt"}


def doc_for(config: dict[str, Any], state: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    rec = record(ID_A, "web", created=kw.pop("created", 1_700_000_000_123_456_789), config=config, state=state)
    return inspect_document(rec, log_path="/var/log/x.log", bundle="/run/skiff/b")


def parse_rfc3339(text: str) -> int:
    """Seconds and nanoseconds of an RFC 3339 UTC time (any fraction length), as unix ns."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", text)
    assert m, text
    secs = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return int(secs) * 1_000_000_000 + int((m.group(2) or "0").ljust(9, "0"))


def test_inspect_has_dockers_top_level_and_state_keys() -> None:
    doc = doc_for({"args": ["sh"]})
    assert set(doc) == TOP_LEVEL
    assert set(doc["State"]) == STATE_KEYS
    assert doc["Id"] == ID_A
    assert doc["Name"] == "/web"
    assert doc["Image"] == "sha256:" + "e" * 64
    assert doc["LogPath"] == "/var/log/x.log"
    assert doc["HostsPath"] == "/run/skiff/b/hosts"
    assert doc["ResolvConfPath"] == "/run/skiff/b/resolv.conf"
    assert doc["HostnamePath"] == "/run/skiff/b/hostname"


def test_inspect_state_of_a_created_container() -> None:
    state = doc_for({"args": ["sh"]})["State"]
    assert state == {"Status": "created", "Running": False, "Paused": False, "Restarting": False,
                     "OOMKilled": False, "Dead": False, "Pid": 0, "ExitCode": 0, "Error": "",
                     "StartedAt": "0001-01-01T00:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z"}


def test_inspect_state_of_running_and_exited() -> None:
    running = doc_for({"args": ["sh"]}, {"status": "running", "pid": 321, "started_at": 1_700_000_001_500_000_000})["State"]
    assert running["Running"] is True and running["Pid"] == 321
    assert parse_rfc3339(running["StartedAt"]) == 1_700_000_001_500_000_000
    assert running["FinishedAt"] == "0001-01-01T00:00:00Z"
    exited = doc_for({"args": ["sh"]}, {"status": "exited", "exit_code": 137, "oom_killed": True,
                                        "error": "boom", "started_at": 1, "finished_at": 2_000_000_000})["State"]
    assert (exited["Running"], exited["ExitCode"], exited["OOMKilled"], exited["Error"]) == (False, 137, True, "boom")
    assert exited["FinishedAt"].startswith("1970-01-01T00:00:02")
    assert doc_for({"args": ["sh"]}, {"status": "dead"})["State"]["Dead"] is True


def test_rfc3339_times() -> None:
    assert rfc3339(0) == "0001-01-01T00:00:00Z"
    assert rfc3339(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert parse_rfc3339(rfc3339(1_700_000_000_5 * 10**8)) == 1_700_000_000_5 * 10**8
    assert parse_rfc3339(doc_for({"args": ["sh"]})["Created"]) == 1_700_000_000_123_456_789


def test_rfc3339_trims_trailing_zeros_as_go_rfc3339nano() -> None:
    assert rfc3339(1_700_000_000_500_000_000) == "2023-11-14T22:13:20.5Z"
    assert rfc3339(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"


def test_inspect_path_and_args() -> None:
    doc = doc_for({"args": ["/bin/sh", "-c", "echo hi"]})
    assert doc["Path"] == "/bin/sh"
    assert doc["Args"] == ["-c", "echo hi"]
    empty = doc_for({"args": []})
    assert (empty["Path"], empty["Args"]) == ("", [])


def test_inspect_cmd_and_entrypoint_from_the_image() -> None:
    config = doc_for({"args": ["/entry", "serve"], "cmd": [], "entrypoint": None, "entrypoint_set": False,
                      "image_cmd": ["serve"], "image_entrypoint": ["/entry"]})["Config"]
    assert config["Cmd"] == ["serve"]
    assert config["Entrypoint"] == ["/entry"]


def test_inspect_cmd_given_keeps_image_entrypoint() -> None:
    config = doc_for({"args": ["/entry", "x"], "cmd": ["x"], "entrypoint": None, "entrypoint_set": False,
                      "image_cmd": ["serve"], "image_entrypoint": ["/entry"]})["Config"]
    assert config["Cmd"] == ["x"]
    assert config["Entrypoint"] == ["/entry"]


def test_inspect_entrypoint_given_resets_image_cmd() -> None:
    # docker: --entrypoint clears the image's CMD; only the command typed after the image remains
    config = doc_for({"args": ["/bin/echo"], "cmd": [], "entrypoint": ["/bin/echo"], "entrypoint_set": True,
                      "image_cmd": ["serve"], "image_entrypoint": ["/entry"]})["Config"]
    assert config["Entrypoint"] == ["/bin/echo"]
    assert config["Cmd"] is None
    with_cmd = doc_for({"args": ["/bin/echo", "hi"], "cmd": ["hi"], "entrypoint": ["/bin/echo"],
                        "entrypoint_set": True, "image_cmd": ["serve"], "image_entrypoint": ["/entry"]})["Config"]
    assert (with_cmd["Entrypoint"], with_cmd["Cmd"]) == (["/bin/echo"], ["hi"])


def test_inspect_empty_entrypoint_drops_the_images() -> None:
    config = doc_for({"args": ["serve"], "cmd": [], "entrypoint": None, "entrypoint_set": True,
                      "image_cmd": ["serve"], "image_entrypoint": ["/entry"]})["Config"]
    assert not config["Entrypoint"]


def test_inspect_host_config_values() -> None:
    hc = doc_for({"args": ["sh"], "network_mode": "host", "auto_remove": True, "init": True, "read_only": True,
                  "privileged": True, "cap_add": ["NET_ADMIN"], "shm_size": 128 << 20,
                  "resources": {"memory": 64 << 20, "memory_swap": -1, "memory_reservation": 32 << 20,
                                "cpus": 1.5, "cpuset_cpus": "0-1", "pids_limit": 100},
                  "ulimits": {"nofile": [1024, 2048]}, "log_opts_raw": {"max-size": "10m"}})["HostConfig"]
    assert hc["NetworkMode"] == "host"
    assert hc["NanoCpus"] == 1_500_000_000
    assert hc["Memory"] == 64 << 20
    assert hc["MemorySwap"] == -1
    assert hc["MemoryReservation"] == 32 << 20
    assert hc["CpusetCpus"] == "0-1"
    assert hc["PidsLimit"] == 100
    assert hc["ShmSize"] == 128 << 20
    assert hc["Ulimits"] == [{"Name": "nofile", "Soft": 1024, "Hard": 2048}]
    assert hc["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m"}}
    assert (hc["AutoRemove"], hc["Init"], hc["ReadonlyRootfs"], hc["Privileged"]) == (True, True, True, True)
    assert hc["CapAdd"] == ["NET_ADMIN"] and hc["CapDrop"] is None


def test_inspect_host_config_defaults() -> None:
    hc = doc_for({"args": ["sh"]})["HostConfig"]
    assert hc["NetworkMode"] == "none"
    assert hc["NanoCpus"] == 0 and hc["Memory"] == 0 and hc["MemorySwap"] == 0
    assert hc["PidsLimit"] is None
    assert hc["Ulimits"] is None
    assert hc["ShmSize"] == 64 << 20
    assert hc["LogConfig"] == {"Type": "json-file", "Config": {}}


@pytest.mark.parametrize("sig,name", [(None, "SIGTERM"), (int(signal.SIGTERM), "SIGTERM"),
                                      (int(signal.SIGINT), "SIGINT"), (int(signal.SIGKILL), "SIGKILL"),
                                      (int(signal.SIGUSR1), "SIGUSR1")])
def test_inspect_stop_signal_name(sig: int | None, name: str) -> None:
    assert doc_for({"args": ["sh"], "stop_signal": sig})["Config"]["StopSignal"] == name


def test_inspect_stop_timeout_only_when_set() -> None:
    assert "StopTimeout" not in doc_for({"args": ["sh"]})["Config"]
    assert doc_for({"args": ["sh"], "stop_timeout": 0})["Config"]["StopTimeout"] == 0
    assert doc_for({"args": ["sh"], "stop_timeout": 30})["Config"]["StopTimeout"] == 30


def test_inspect_config_fields() -> None:
    config = doc_for({"args": ["sh"], "hostname": "abc", "user": "app", "tty": True, "open_stdin": True,
                      "env": ["A=1"], "working_dir": "/srv", "labels": {"k": "v"},
                      "image_config": {"Volumes": {"/data": {}}}})["Config"]
    assert config["Hostname"] == "abc"
    assert config["User"] == "app"
    assert (config["Tty"], config["OpenStdin"]) == (True, True)
    assert config["Env"] == ["A=1"]
    assert config["WorkingDir"] == "/srv"
    assert config["Labels"] == {"k": "v"}
    assert config["Image"] == "busybox"
    assert config["Volumes"] == {"/data": {}}
    assert doc_for({"args": ["sh"], "working_dir": "/"})["Config"]["WorkingDir"] == ""


# --- filters ----------------------------------------------------------------


def test_parse_filters_groups_values_by_key() -> None:
    assert parse_filters(["status=running", "status=exited", "label=a=b", "name=web"]) == {
        "status": ["running", "exited"], "label": ["a=b"], "name": ["web"]}
    assert parse_filters([]) == {}


@pytest.mark.parametrize("bad,message", [
    ("status", "bad format of filter (expected name=value): status"),
    ("colour=red", "invalid filter 'colour'"),
    ("status=sleeping", "invalid filter 'status=sleeping'"),
    ("status=", "invalid filter 'status='"),
    ("exited=zero", "invalid filter 'exited=zero'"),
    ("exited=", "invalid filter 'exited='"),
])
def test_parse_filters_errors(bad: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filters([bad])
    assert str(info.value) == message


@pytest.mark.parametrize("status", ["created", "restarting", "running", "removing", "paused", "exited", "dead"])
def test_parse_filters_accepts_every_docker_status(status: str) -> None:
    assert parse_filters([f"status={status}"]) == {"status": [status]}


def test_parse_filters_accepts_negative_exit_codes() -> None:
    assert parse_filters(["exited=-1", "exited=137"]) == {"exited": ["-1", "137"]}


def rec_with(name: str = "web", status: str = "running", exit_code: int = 0,
             labels: dict[str, str] | None = None, cid: str = ID_A) -> ContainerRecord:
    return record(cid, name, config={"args": ["sh"], "labels": labels or {}},
                  state=new_state() | {"status": status, "exit_code": exit_code})


def m(rec: ContainerRecord, *filters: str, images: set[str] | None = None) -> bool:
    return matches(rec, parse_filters(list(filters)), images or {"busybox"})


def test_no_filters_match_everything() -> None:
    assert m(rec_with())


def test_values_of_one_key_are_ored() -> None:
    rec = rec_with(status="exited")
    assert m(rec, "status=running", "status=exited")
    assert not m(rec, "status=running", "status=created")
    assert m(rec_with(name="web"), "name=db", "name=web")


def test_different_keys_are_anded() -> None:
    rec = rec_with(name="web", status="exited")
    assert m(rec, "name=web", "status=exited")
    assert not m(rec, "name=web", "status=running")
    assert not m(rec, "name=db", "status=exited")


def test_name_filter_matches_part_of_the_name_with_or_without_slash() -> None:
    rec = rec_with(name="my-web-1")
    assert m(rec, "name=web")
    assert m(rec, "name=/my-web")
    assert not m(rec, "name=db")


def test_name_filter_is_a_regular_expression_as_in_docker() -> None:
    assert m(rec_with(name="web"), "name=^web$")
    assert not m(rec_with(name="web-2"), "name=^web$")


def test_id_filter_matches_a_prefix() -> None:
    rec = rec_with()
    assert m(rec, "id=aaaa")
    assert m(rec, f"id={ID_A}")
    assert not m(rec, "id=cccc")


def test_status_and_exited_filters() -> None:
    assert m(rec_with(status="exited", exit_code=3), "exited=3")
    assert m(rec_with(status="exited", exit_code=3), "exited=0", "exited=3")
    assert not m(rec_with(status="exited", exit_code=0), "exited=3")
    assert not m(rec_with(status="running", exit_code=0), "exited=0")
    assert m(rec_with(status="created"), "status=created")


def test_label_filter_with_and_without_value() -> None:
    rec = rec_with(labels={"tier": "front", "env": ""})
    assert m(rec, "label=tier")
    assert m(rec, "label=env")
    assert m(rec, "label=tier=front")
    assert not m(rec, "label=tier=back")
    assert not m(rec, "label=missing")
    assert m(rec, "label=env=")
    assert not m(rec_with(labels={}), "label=tier")


def test_label_values_must_all_match_as_in_docker() -> None:
    # docker's MatchKVList: every label filter must hold (unlike other keys' values)
    rec = rec_with(labels={"a": "1", "b": "2"})
    assert m(rec, "label=a", "label=b=2")
    assert not m(rec, "label=a", "label=c")


def test_ancestor_filter_uses_the_image_names() -> None:
    rec = rec_with()
    names = {"busybox", "busybox:latest", "sha256:" + "e" * 64}
    assert m(rec, "ancestor=busybox:latest", images=names)
    assert m(rec, "ancestor=alpine", "ancestor=busybox", images=names)
    assert not m(rec, "ancestor=alpine", images=names)
