"""skiffd's configuration: defaults, the TOML config file, and flags on top (dockerd's rules)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.errors import InvalidArgument

DEFAULT_CONFIG_FILE = Path("/etc/skiff/daemon.toml")
DEFAULT_DATA_ROOT = Path("/var/lib/skiff")
DEFAULT_EXEC_ROOT = Path("/run/skiff")
SOCKET_NAME = "skiffd.sock"


@dataclass
class DaemonConfig:
    data_root: Path = DEFAULT_DATA_ROOT
    exec_root: Path = DEFAULT_EXEC_ROOT
    hosts: list[str] = field(default_factory=list)
    group: str = "skiff"
    insecure_registries: list[str] = field(default_factory=list)
    certs_dir: Path = Path("/etc/skiff/certs.d")
    max_concurrent_downloads: int = 3
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console
    shutdown_timeout: float = 15.0
    #: where containers' cgroups go (cgroupfs path), as dockerd's --cgroup-parent
    cgroup_parent: str = "/skiff"
    #: mutual TLS on tcp:// listeners, with dockerd's names (--tlsverify --tlscacert --tlscert --tlskey)
    tlsverify: bool = False
    tlscacert: Path | None = None
    tlscert: Path | None = None
    tlskey: Path | None = None
    #: serve tcp:// without TLS: anyone who reaches the port is root on this host
    allow_insecure_tcp: bool = False

    def __post_init__(self) -> None:
        if not self.hosts:
            self.hosts = [f"unix://{self.exec_root / SOCKET_NAME}"]

    @property
    def db_path(self) -> Path:
        return self.data_root / "metadata.db"

    @property
    def content_root(self) -> Path:
        return self.data_root / "content"

    @property
    def snapshots_root(self) -> Path:
        return self.data_root / "snapshots"

    @property
    def credentials_path(self) -> Path:
        return self.data_root / "credentials.json"


# TOML keys are dockerd's daemon.json keys.
_KEYS = {
    "data-root": "data_root",
    "exec-root": "exec_root",
    "hosts": "hosts",
    "group": "group",
    "insecure-registries": "insecure_registries",
    "certs-dir": "certs_dir",
    "max-concurrent-downloads": "max_concurrent_downloads",
    "log-level": "log_level",
    "log-format": "log_format",
    "shutdown-timeout": "shutdown_timeout",
    "cgroup-parent": "cgroup_parent",
    "tlsverify": "tlsverify",
    "tlscacert": "tlscacert",
    "tlscert": "tlscert",
    "tlskey": "tlskey",
    "allow-insecure-tcp": "allow_insecure_tcp",
}


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(DaemonConfig)}
    kind = str(kinds[name])
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidArgument(f"config {name}: expected true or false, got {value!r}")
        return value
    if "Path" in kind:
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"config {name}: expected a path, got {value!r}")
        return Path(value)
    if "list" in kind:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"config {name}: expected a list of strings, got {value!r}")
        return list(value)
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"config {name}: expected a number, got {value!r}")
        if value < 0:
            raise InvalidArgument(f"config {name}: must not be negative, got {value!r}")
        return int(value) if kind == "int" else float(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"config {name}: expected a string, got {value!r}")
    return value


def load_config(path: Path | None, overrides: dict[str, Any]) -> DaemonConfig:
    """Defaults, then the TOML file (missing is fine only for the default path), then flags."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            if path != DEFAULT_CONFIG_FILE:
                raise InvalidArgument(f"config file {path} not found") from None
            doc = {}
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {path}: {exc}") from exc
        for key, value in doc.items():
            if key not in _KEYS:
                raise InvalidArgument(f"config file {path}: unknown key {key!r}")
            values[_KEYS[key]] = _coerce(_KEYS[key], value)
    for name, value in overrides.items():
        if value is None or value == [] or value == ():
            continue
        values[name] = _coerce(name, list(value) if isinstance(value, tuple) else value)
    if values.get("log_format", "auto") not in ("auto", "json", "console"):
        raise InvalidArgument(f"log-format must be auto, json or console, not {values['log_format']!r}")
    parent = str(values.get("cgroup_parent", "/skiff"))
    if not re.fullmatch(r"(/[A-Za-z0-9_.@-]+)+", parent) or ".." in parent.split("/"):
        raise InvalidArgument(f"cgroup-parent must be an absolute cgroup path like /skiff, not {parent!r}")
    config = DaemonConfig(**values)
    for host in config.hosts:
        if host.startswith("unix://"):
            continue
        if not host.startswith("tcp://") or not _tcp_address(host):
            raise InvalidArgument(f"unsupported listen address {host!r}: use unix:///path or tcp://HOST:PORT")
        if config.tlsverify:
            missing = [flag for flag, value in (("--tlscacert", config.tlscacert), ("--tlscert", config.tlscert),
                                                ("--tlskey", config.tlskey)) if value is None]
            if missing:
                raise InvalidArgument(f"--tlsverify on {host} needs {', '.join(missing)}")
            for path in (config.tlscacert, config.tlscert, config.tlskey):
                if path is not None and not path.is_file():
                    raise InvalidArgument(f"TLS file {path} not found")
        elif not config.allow_insecure_tcp:
            raise InvalidArgument(
                f"refusing to listen on {host} without mutual TLS: give --tlsverify --tlscacert --tlscert "
                "--tlskey (see `skiff ca`), or --allow-insecure-tcp, which lets anyone who reaches the port "
                "run containers as root")
    return config


def _tcp_address(host: str) -> str:
    """``tcp://HOST:PORT`` → ``HOST:PORT`` (``[v6]:PORT`` kept), or "" when malformed."""
    rest = host.removeprefix("tcp://").rstrip("/")
    name, sep, port = rest.rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        return ""
    return rest


def tcp_address(host: str) -> str:
    return _tcp_address(host)
