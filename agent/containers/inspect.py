"""Docker-shaped views of a container record: the inspect document, ps rows, filters."""

from __future__ import annotations

import signal
import time
from typing import Any

from agent.containers.store import RUNNING, STATUSES, ContainerRecord
from agent.errors import InvalidArgument

_ZERO_TIME = "0001-01-01T00:00:00Z"


def rfc3339(ns: int) -> str:
    if not ns:
        return _ZERO_TIME
    secs, frac = divmod(ns, 1_000_000_000)
    fraction = f".{frac:09d}".rstrip("0").rstrip(".")  # Go's RFC3339Nano trims trailing zeros
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + fraction + "Z"


def command_text(record: ContainerRecord) -> str:
    return " ".join(record.config.get("args") or [])


def inspect_document(record: ContainerRecord, *, log_path: str, bundle: str) -> dict[str, Any]:
    c = record.config
    s = record.state
    resources = c.get("resources") or {}
    args = list(c.get("args") or [])
    stop_signal = int(c.get("stop_signal") or signal.SIGTERM)
    return {
        "Id": record.id,
        "Created": rfc3339(record.created),
        "Path": args[0] if args else "",
        "Args": args[1:],
        "State": {
            "Status": record.status,
            "Running": record.status == RUNNING,
            "Paused": False,
            "Restarting": False,
            "OOMKilled": bool(s.get("oom_killed")),
            "Dead": record.status == "dead",
            "Pid": int(s.get("pid") or 0),
            "ExitCode": int(s.get("exit_code") or 0),
            "Error": str(s.get("error") or ""),
            "StartedAt": rfc3339(int(s.get("started_at") or 0)),
            "FinishedAt": rfc3339(int(s.get("finished_at") or 0)),
        },
        "Image": record.image_id,
        "ResolvConfPath": f"{bundle}/resolv.conf",
        "HostnamePath": f"{bundle}/hostname",
        "HostsPath": f"{bundle}/hosts",
        "LogPath": log_path,
        "Name": "/" + record.name,
        "RestartCount": int(s.get("restart_count") or 0),
        "Driver": "overlay2",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "ExecIDs": None,
        "HostConfig": {
            "NetworkMode": c.get("network_mode") or "none",
            "PidMode": c.get("pid_mode") or "",
            "IpcMode": c.get("ipc_mode") or "private",
            "UTSMode": c.get("uts_mode") or "",
            "LogConfig": {"Type": "json-file", "Config": dict(c.get("log_opts_raw") or {})},
            "AutoRemove": bool(c.get("auto_remove")),
            "Runtime": c.get("runtime") or "builtin",
            "CapAdd": c.get("cap_add") or None,
            "CapDrop": c.get("cap_drop") or None,
            "SecurityOpt": c.get("security_opt") or None,
            "ReadonlyRootfs": bool(c.get("read_only")),
            "Privileged": bool(c.get("privileged")),
            "Init": bool(c.get("init")),
            "ShmSize": int(c.get("shm_size") or 64 << 20),
            "Memory": int(resources.get("memory") or 0),
            "MemoryReservation": int(resources.get("memory_reservation") or 0),
            "MemorySwap": int(resources.get("memory_swap") or 0),
            "NanoCpus": int(round(float(resources.get("cpus") or 0) * 1e9)),
            "CpusetCpus": resources.get("cpuset_cpus") or "",
            "PidsLimit": resources.get("pids_limit"),
            "Ulimits": [{"Name": k, "Soft": v[0], "Hard": v[1]} for k, v in (c.get("ulimits") or {}).items()]
            or None,
        },
        "GraphDriver": {"Name": "overlay2", "Data": None},
        "Mounts": [],
        "Config": {
            "Hostname": c.get("hostname") or "",
            "Domainname": "",
            "User": c.get("user") or "",
            "AttachStdin": False,
            "AttachStdout": False,
            "AttachStderr": False,
            "Tty": bool(c.get("tty")),
            "OpenStdin": bool(c.get("open_stdin")),
            "StdinOnce": bool(c.get("stdin_once")),
            "Env": list(c.get("env") or []),
            "Cmd": (c.get("cmd") or None) if c.get("entrypoint_set") or c.get("cmd") else c.get("image_cmd"),
            "Image": record.image,
            "Volumes": (c.get("image_config") or {}).get("Volumes"),
            "WorkingDir": c.get("working_dir") if c.get("working_dir") != "/" else "",
            "Entrypoint": c.get("entrypoint") if c.get("entrypoint_set") else c.get("image_entrypoint"),
            "OnBuild": None,
            "Labels": dict(c.get("labels") or {}),
            "StopSignal": signal.Signals(stop_signal).name if stop_signal in signal.valid_signals()
            else str(stop_signal),
            **({"StopTimeout": c["stop_timeout"]} if c.get("stop_timeout") is not None else {}),
        },
        "NetworkSettings": {
            "IPAddress": "", "IPPrefixLen": 0, "Gateway": "", "MacAddress": "", "Ports": {},
            "Networks": {c.get("network_mode") or "none": {"IPAddress": "", "Gateway": "", "MacAddress": ""}},
        },
    }


def parse_filters(filters: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep:
            raise InvalidArgument(f"bad format of filter (expected name=value): {f}")
        if key not in ("id", "name", "label", "status", "exited", "ancestor", "before", "since"):
            raise InvalidArgument(f"invalid filter '{key}'")
        if key == "status" and value not in STATUSES:
            raise InvalidArgument(f"invalid filter 'status={value}'")
        if key == "exited" and not value.lstrip("-").isdigit():
            raise InvalidArgument(f"invalid filter 'exited={value}'")
        out.setdefault(key, []).append(value)
    return out


def matches(record: ContainerRecord, filters: dict[str, list[str]], image_names: set[str]) -> bool:
    """Docker's semantics: values of one key are OR'ed, keys are AND'ed."""
    for key, values in filters.items():
        if key == "id" and not any(record.id.startswith(v) for v in values):
            return False
        if key == "name" and not any(_name_matches(v, record.name) for v in values):
            return False
        if key == "status" and record.status not in values:
            return False
        if key == "exited" and (record.status != "exited"
                                or str(record.state.get("exit_code", 0)) not in values):
            return False
        if key == "ancestor" and not (image_names & set(values)):
            return False
        if key == "label":
            labels = record.config.get("labels") or {}
            for v in values:
                k, sep, want = v.partition("=")
                if k not in labels or (sep and labels[k] != want):
                    return False
    return True


def _name_matches(pattern: str, name: str) -> bool:
    """docker's name filter: a regular expression against the name, with or without its "/"."""
    import re

    try:
        return bool(re.search(pattern, name) or re.search(pattern, "/" + name))
    except re.error:
        return pattern.lstrip("/") in name
