"""Ansible inventories as skiff targets, parsed by Ansible itself.

``-i`` sources are whatever ``ansible -i`` takes (INI or YAML files, directories,
executable dynamic-inventory scripts, ``a,b,`` host lists) and the pattern is an
Ansible host pattern; hosts come back in Ansible's order.  Per host, these merged
variables (inventory, ``group_vars/``, ``host_vars/``; ``{{ }}`` templated) say how
to reach its agent:

====================  ==========================================================
``skiff_transport``   ``grpc`` (default): ``tcp://ADDRESS:PORT`` with mutual TLS;
                      ``ssh``: ``ssh://[USER@]ADDRESS:PORT`` to the agent's socket
``ansible_host``      ADDRESS (default: the inventory hostname)
``skiff_port``        grpc PORT (default 2376)
``ansible_connection`` ``local`` with grpc: the agent's unix socket on this machine
``skiff_socket``      the agent's socket (ssh, and grpc with a local connection)
``ansible_user``, ``ansible_port``, ``ansible_ssh_private_key_file``: ssh's USER,
PORT (default 22) and key, with their ``ansible_ssh_*`` aliases
====================  ==========================================================

Importing Ansible and parsing costs about half a second, so when every source is
a static file or directory the resolved targets are cached under
``$XDG_CACHE_HOME/skiff/inventory/``, keyed by every file's path, mtime and size
(``SKIFF_INVENTORY_CACHE=0`` turns that off).  This module imports Ansible only
on a cache miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.errors import ControllerError, UsageError
from controller.targets import DEFAULT_TLS_PORT, REMOTE_SOCKET, Target

#: bump when the cache entry's layout or the variables' meaning changes
CACHE_FORMAT = 1
#: cache entries kept; the oldest go when a write makes more
CACHE_ENTRIES = 64
#: a result is not cached while one of its files is younger than this (seconds): an edit within the
#: file system's timestamp granularity could keep both mtime and size ("racily clean", as git says)
SETTLE_SECONDS = 2.0

#: the host variables that say how to reach an agent (only these are templated)
CONNECTION_VARS = (
    "ansible_host", "ansible_connection", "ansible_port", "ansible_ssh_port", "ansible_user", "ansible_ssh_user",
    "ansible_ssh_private_key_file", "ansible_private_key_file", "skiff_transport", "skiff_port", "skiff_socket",
)
_LOCAL_CONNECTIONS = ("local", "ansible.builtin.local", "ansible.legacy.local")
#: templates whose value is not a function of the inventory's files alone: such a result is not cached
_UNSTABLE_TEMPLATE = re.compile(r"\b(?:lookup|query|q|now|pipe)\s*\(|\brandom\b|\benv\b")
#: a hostname written to an INI file as it is
_INI_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: a value written to an INI file unquoted (when it does not read as a Python literal)
_INI_PLAIN = re.compile(r"[A-Za-z0-9_./@%+~:-]+")


def default_sources() -> list[str]:
    """``$SKIFF_INVENTORY``: one path, or several separated by commas; empty when unset."""
    value = os.environ.get("SKIFF_INVENTORY", "").strip()
    if not value:
        return []
    if os.path.exists(os.path.expanduser(value)):
        return [value]
    return [part.strip() for part in value.split(",") if part.strip()]


def load_targets(sources: Sequence[str], pattern: str = "all") -> list[Target]:
    """The targets of the hosts of ``sources`` (as ``ansible -i`` takes them) that match the
    Ansible host ``pattern``, in Ansible's order.  Raises :class:`UsageError` with one line."""
    given = [s.strip() for s in ([sources] if isinstance(sources, str) else sources) if s.strip()]
    if not given:
        raise UsageError("no inventory given: -i PATH or $SKIFF_INVENTORY")
    normalized = [_normalize(s) for s in given]
    directory = _cache_dir() if _cache_enabled() else None
    key, settled = _cache_key(normalized, pattern) if directory else (None, False)
    resolved = _cache_read(directory / f"{key}.json") if directory and key else None
    if resolved is None:
        resolved = _resolve(normalized, given, pattern)
        if directory and key and settled and resolved.cacheable:
            _cache_write(directory, key, resolved)
    for warning in resolved.warnings:
        print(f"WARNING: inventory: {warning}", file=sys.stderr)
    return resolved.targets


def write_retry_file(path: str | Path, targets: Sequence[Target]) -> None:
    """An INI inventory of ``targets`` that ``skiff -i PATH`` (and ``ansible -i PATH``) reads back
    as the same targets."""
    lines = [f"# skiff: {len(targets)} hosts that did not end OK; retry with: skiff -i {path} ..."]
    seen: set[str] = set()
    for target in targets:
        name, hostvars = _retry_entry(target)
        unique, n = name, 1
        while unique in seen:
            n += 1
            unique = f"{name}-{n}"
        seen.add(unique)
        lines.append(" ".join([unique, *(f"{k}={_ini_value(v)}" for k, v in hostvars.items())]))
    try:
        Path(path).write_text("\n".join(lines) + "\n")
    except OSError as exc:
        raise ControllerError(f"retry file {path}: {exc.strerror}") from exc


# -- resolving with Ansible -------------------------------------------------------------------------


@dataclass
class _Resolved:
    targets: list[Target]
    #: Ansible's warnings worth showing (a pattern part matching nothing, odd group names)
    warnings: list[str] = field(default_factory=list)
    #: False when a value came from a template that may give something else next time
    cacheable: bool = True


@dataclass
class _Capture:
    """Ansible's warnings, kept instead of printed while an inventory is read."""

    warnings: list[str] = field(default_factory=list)
    #: while a source is parsed: each plugin's failure (message, exception); else None
    failures: list[tuple[str, BaseException]] | None = None

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.warnings.append(_one_line(msg))

    def error_as_warning(self, msg: str | None, exception: BaseException, *args: Any, **kwargs: Any) -> None:
        if self.failures is not None:
            self.failures.append((msg or "", exception))
        else:
            self.warnings.append(f"{_one_line(msg or '')}: {_describe(exception)}".lstrip(": "))

    def deprecated(self, *args: Any, **kwargs: Any) -> None:
        """Deprecations are for the inventory's authors, not for skiff's users."""


@contextmanager
def _captured(display: Any) -> Iterator[_Capture]:
    capture = _Capture()
    names = ("warning", "error_as_warning", "deprecated")
    for name in names:
        setattr(display, name, getattr(capture, name))
    try:
        yield capture
    finally:
        for name in names:
            display.__dict__.pop(name, None)


def _resolve(sources: list[str], given: list[str], pattern: str) -> _Resolved:
    try:
        from ansible.errors import AnsibleError
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.template import Templar
        from ansible.utils.display import Display
        from ansible.vars.manager import VariableManager
    except ImportError as exc:
        raise ControllerError(f"inventories need ansible-core ({exc})") from exc

    _forget_vars_files()
    shown = dict(zip(sources, given))
    unparsed: list[tuple[str, list[tuple[str, BaseException]]]] = []

    class Inventory(InventoryManager):
        """Records each file Ansible could not parse, with every plugin's reason."""

        def parse_source(self, source: str, cache: bool = False) -> bool:
            if os.path.isdir(source):
                parsed = bool(super().parse_source(source, cache=cache))
                if not parsed and source in shown:
                    unparsed.append((source, []))
                return parsed
            failures: list[tuple[str, BaseException]] = []
            capture.failures = failures
            try:
                parsed = bool(super().parse_source(source, cache=cache))
            except AnsibleError:  # with `any_unparsed_is_failed` in ansible.cfg
                parsed = False
            finally:
                capture.failures = None
            if not parsed:
                unparsed.append((source, failures))
            return parsed

    with _captured(Display()) as capture:
        loader = DataLoader()
        try:
            inventory = Inventory(loader=loader, sources=sources)
        except AnsibleError as exc:  # with `unparsed_is_failed` in ansible.cfg, or a vars plugin's error
            if not unparsed:
                raise UsageError(f"inventory: {_describe(exc)}") from exc
        if unparsed:
            source, failures = unparsed[0]
            raise UsageError(_parse_failure(_shown_path(source, shown), source, failures))
        try:
            hosts = inventory.get_hosts(pattern)
        except AnsibleError as exc:
            raise UsageError(f"invalid host pattern {pattern!r}: {_describe(exc)}") from exc
        if not hosts:
            raise UsageError(f"no hosts in inventory match {pattern}")
        variables = VariableManager(loader=loader, inventory=inventory)
        variables.safe_basedir = False  # like `ansible` ad hoc: no group_vars/ from the current directory
        resolved = _Resolved([])
        for host in hosts:
            name = str(host.name)
            try:
                hostvars = variables.get_vars(host=host, include_hostvars=False)
            except AnsibleError as exc:
                where = _where(exc)
                raise UsageError(f"inventory {where}: {_first_line(exc)}" if where
                                 else f"inventory: host {name}: {_first_line(exc)}") from exc
            values: dict[str, object] = {}
            templar = None
            for var in CONNECTION_VARS:
                value = hostvars.get(var)
                if type(value).__name__ in ("EncryptedString", "AnsibleVaultEncryptedUnicode"):
                    raise UsageError(f"host {name}: {var} is vault-encrypted; skiff does not decrypt inventory "
                                     "variables (leave connection variables unencrypted)")
                try:
                    if isinstance(value, str) and ("{{" in value or "{%" in value):
                        templar = templar or Templar(loader=loader, variables=hostvars)
                        if _UNSTABLE_TEMPLATE.search(value):
                            resolved.cacheable = False
                        value = templar.template(value)
                    if value is not None:  # str() here: a vaulted value decrypts (or fails) now
                        values[var] = value if isinstance(value, int) else str(value)
                except Exception as exc:  # templating and vault raise more than AnsibleError
                    raise UsageError(f"host {name}: {var}: {_describe(exc)}") from exc
            resolved.targets.append(target_from_vars(name, values))
        resolved.warnings = list(dict.fromkeys(capture.warnings))
    return resolved


def _forget_vars_files() -> None:
    """Empties the process-long caches of Ansible's group_vars/host_vars plugin (which files each
    host and group has, which directories are missing), so a second load in one process sees edits."""
    plugin = sys.modules.get("ansible.plugins.vars.host_group_vars")
    for name in ("FOUND", "NAK", "CANONICAL_PATHS"):
        cache = getattr(plugin, name, None)
        if isinstance(cache, (dict, set)):
            cache.clear()


def target_from_vars(name: str, hostvars: Mapping[str, object]) -> Target:
    """The target of inventory host ``name`` from its (templated) variables."""
    transport = (_text(hostvars.get("skiff_transport")) or "grpc").lower()
    address = _text(hostvars.get("ansible_host")) or name
    socket = _text(hostvars.get("skiff_socket")) or REMOTE_SOCKET
    if not socket.startswith("/"):
        raise UsageError(f"host {name}: skiff_socket {socket!r} is not an absolute path")
    if transport == "grpc":
        if _text(hostvars.get("ansible_connection")) in _LOCAL_CONNECTIONS:
            return Target(f"unix://{socket}", name=name)
        port = _port(name, hostvars, "skiff_port") or DEFAULT_TLS_PORT
        return Target(f"tcp://{_url_host(address)}:{port}", name=name)
    if transport == "ssh":
        user = _text(hostvars.get("ansible_user")) or _text(hostvars.get("ansible_ssh_user"))
        port = _port(name, hostvars, "ansible_port") or _port(name, hostvars, "ansible_ssh_port") or 22
        key = _text(hostvars.get("ansible_ssh_private_key_file")) or _text(hostvars.get("ansible_private_key_file"))
        userinfo = f"{user}@" if user else ""
        return Target(f"ssh://{userinfo}{_url_host(address)}:{port}", name=name,
                      ssh_key=os.path.expanduser(key) if key else None, socket=socket)
    raise UsageError(f"host {name}: skiff_transport {transport!r} is not grpc or ssh")


def _text(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _port(name: str, hostvars: Mapping[str, object], var: str) -> int | None:
    value = hostvars.get(var)
    if value is None or value == "":
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]{1,5}", text) or not 0 < int(text) < 65536:
        raise UsageError(f"host {name}: {var} {text!r} is not a port number")
    return int(text)


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _normalize(source: str) -> str:
    """A path source made absolute (as Ansible does), after checking it exists; host lists as they are."""
    if "," in source:
        return source
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(path):
        raise UsageError(f"inventory {source}: no such file")
    return path


def _shown_path(path: str, shown: Mapping[str, str]) -> str:
    """``path`` as the user spelled its source (a file inside a directory source under that name)."""
    for source, given in shown.items():
        if path == source:
            return given
        if path.startswith(source.rstrip("/") + "/"):
            return os.path.join(given, os.path.relpath(path, source))
    return path


def _parse_failure(shown: str, path: str, failures: list[tuple[str, BaseException]]) -> str:
    """One line for a source no inventory plugin could parse, with the likeliest plugin's reason."""
    if os.path.isdir(path):
        return f"inventory {shown}: no inventory file in this directory"
    if not failures:
        return f"inventory {shown}: no inventory plugin can read this file"
    ext = os.path.splitext(path)[1].lower()
    preferred: tuple[str, ...]
    if os.access(path, os.X_OK):
        preferred = ("script",)
    elif ext in (".yml", ".yaml", ".json"):
        preferred = ("auto", "yaml")
    elif ext == ".toml":
        preferred = ("toml",)
    else:
        preferred = ("ini",)
    plugins = [_plugin_name(msg) for msg, _ in failures]
    index = next((plugins.index(p) for p in preferred if p in plugins), 0)
    exc = failures[index][1]
    reason = _first_line(exc).removeprefix("Failed to parse inventory: ")
    line = _origin_line(exc, path)
    where = f"{shown}:{line}" if line else shown
    plugin = f" as {plugins[index]}" if plugins[index] not in ("", "auto") else ""
    return f"inventory {where}: cannot parse{plugin}: {reason}"


def _plugin_name(msg: str) -> str:
    match = re.search(r"'([\w.]+)' plugin", msg)
    return match.group(1) if match else ""


def _origins(exc: BaseException) -> Iterator[object]:
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        yield getattr(current, "obj", None)
        current = current.__cause__ or current.__context__
        seen += 1


def _origin_line(exc: BaseException, path: str) -> int | None:
    for obj in _origins(exc):
        line = getattr(obj, "line_num", None)
        if getattr(obj, "path", None) == path and isinstance(line, int):
            return line
    return None


def _describe(exc: BaseException) -> str:
    """The first line of an (Ansible) exception, after the file and line it names, if any."""
    where = _where(exc)
    return f"{where}: {_first_line(exc)}" if where else _first_line(exc)


def _where(exc: BaseException) -> str | None:
    """``PATH[:LINE]`` of the file an (Ansible) exception is about, if it says."""
    for obj in _origins(exc):
        path = getattr(obj, "path", None)
        if isinstance(path, str):
            line = getattr(obj, "line_num", None)
            return f"{path}:{line}" if isinstance(line, int) else path
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return _one_line(lines[0]) if lines else type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- the cache ----------------------------------------------------------------------------------------


def _cache_enabled() -> bool:
    return os.environ.get("SKIFF_INVENTORY_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/skiff/inventory`` (``~/.cache/...``); None without a home directory."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = base if os.path.isabs(base) else os.path.expanduser("~/.cache")
    return Path(root, "skiff", "inventory") if os.path.isabs(root) else None


def _cache_key(sources: list[str], pattern: str) -> tuple[str | None, bool]:
    """A hash of all that the result depends on (None when a source is dynamic: a host list, a
    script, an inventory plugin's config; or cannot be read), and whether all its files have
    settled (may be cached)."""
    digest = hashlib.sha256()
    newest = 0

    def add(*parts: object) -> None:
        digest.update(json.dumps(parts).encode() + b"\n")

    add("skiff-inventory", CACHE_FORMAT, _ansible_version(), pattern, os.path.expanduser("~"))
    for source in sources:
        files = _source_files(source)
        if files is None:
            return None, False
        add("source", source, files)
        newest = max([newest, *(mtime for _, mtime, _ in files)])
    add("env", sorted((k, v) for k, v in os.environ.items() if k.startswith("ANSIBLE_")))
    configs = [os.environ.get("ANSIBLE_CONFIG", ""), os.path.abspath("ansible.cfg"),
               os.path.expanduser("~/.ansible.cfg"), "/etc/ansible/ansible.cfg"]
    stamps = [(p, _stamp(p)) for p in configs if p]
    add("config", stamps)
    newest = max([newest, *(stamp[0] for _, stamp in stamps if stamp)])
    return digest.hexdigest(), newest < (time.time() - SETTLE_SECONDS) * 1e9


def _ansible_version() -> str:
    """ansible-core's version and place, without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("ansible")
        locations = list(spec.submodule_search_locations or []) if spec else []
        release = Path(locations[0], "release.py")
        match = re.search(r"""__version__\s*=\s*['"]([^'"]+)""", release.read_text())
    except (ImportError, ValueError, IndexError, OSError):
        return ""
    return f"{match.group(1) if match else '?'} {release}"


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _source_files(source: str) -> list[tuple[str, int, int]] | None:
    """(path, mtime_ns, size) of every file the source's hosts and variables come from; None when
    the source is not a static file or directory."""
    if "," in source:
        return None
    try:
        st = os.stat(source)
        if stat.S_ISDIR(st.st_mode):
            return _walk(source, inventory=True)
        if not stat.S_ISREG(st.st_mode) or _is_dynamic(source, st):
            return None
        files = [(source, st.st_mtime_ns, st.st_size)]
        parent = os.path.dirname(source)
        for vars_dir in ("group_vars", "host_vars"):
            found = _walk(os.path.join(parent, vars_dir), inventory=False)
            if found is None:
                return None
            files += found
        return files
    except OSError:
        return None


def _walk(top: str, inventory: bool) -> list[tuple[str, int, int]] | None:
    """Every file under ``top`` (nothing when it is missing); None when one of its inventory files
    (not under group_vars/, host_vars/ or a hidden directory) is dynamic."""
    files: list[tuple[str, int, int]] = []
    visited: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(top, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in visited:
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs.sort()
        parts = os.path.relpath(root, top).split(os.sep)
        in_vars = any(p in ("group_vars", "host_vars", "vars_plugins") or p.startswith(".")
                      for p in parts if p != ".")
        for name in sorted(names):
            path = os.path.join(root, name)
            fst = os.stat(path)
            if inventory and not in_vars and not name.startswith(".") and _is_dynamic(path, fst):
                return None
            files.append((path, fst.st_mtime_ns, fst.st_size))
    return files


def _is_dynamic(path: str, st: os.stat_result) -> bool:
    """An executable (a dynamic-inventory script) or an inventory plugin's YAML config."""
    if st.st_mode & 0o111:
        return True
    if path.lower().endswith((".yml", ".yaml")):
        with open(path, "rb") as f:
            return re.search(rb"^plugin\s*:", f.read(), re.MULTILINE) is not None
    return False


def _cache_read(path: Path) -> _Resolved | None:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != CACHE_FORMAT:
            return None
        targets = [Target(url=str(t["url"]), name=str(t["name"]), socket=str(t["socket"]),
                          ssh_key=None if t["ssh_key"] is None else str(t["ssh_key"])) for t in doc["targets"]]
        return _Resolved(targets, [str(w) for w in doc["warnings"]])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _cache_write(directory: Path, key: str, resolved: _Resolved) -> None:
    import tempfile

    doc = {
        "format": CACHE_FORMAT,
        "targets": [{"url": t.url, "name": t.name, "ssh_key": t.ssh_key, "socket": t.socket}
                    for t in resolved.targets],
        "warnings": resolved.warnings,
    }
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, directory / f"{key}.json")
        except BaseException:
            os.unlink(tmp)
            raise
        entries = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in entries[CACHE_ENTRIES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


# -- retry files ----------------------------------------------------------------------------------------


def _retry_entry(target: Target) -> tuple[str, dict[str, object]]:
    """An INI host line's name and variables for ``target``."""
    url = f"unix://{target.url}" if target.url.startswith("/") else target.url
    scheme, sep, rest = url.partition("://")
    hostvars: dict[str, object] = {}
    if not sep:
        raise UsageError(f"cannot write host {target.url!r} to a retry file")
    if scheme == "unix":
        hostvars = {"ansible_connection": "local", "skiff_transport": "grpc", "skiff_socket": rest}
        return _ini_hostname(target.name, "localhost"), hostvars
    user, host, port = _split_netloc(rest.split("/", 1)[0])
    if scheme == "tcp":
        hostvars = {"ansible_host": host, "skiff_transport": "grpc"}
        if port is not None:
            hostvars["skiff_port"] = port
    elif scheme == "ssh":
        hostvars = {"ansible_host": host, "skiff_transport": "ssh"}
        if port is not None:
            hostvars["ansible_port"] = port
        if user:
            hostvars["ansible_user"] = user
        if target.ssh_key:
            hostvars["ansible_ssh_private_key_file"] = target.ssh_key
        if target.socket != REMOTE_SOCKET:
            hostvars["skiff_socket"] = target.socket
    else:
        raise UsageError(f"cannot write host {target.url!r} to a retry file")
    return _ini_hostname(target.name, host), hostvars


def _split_netloc(netloc: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (IPv6 hosts in brackets) without lowercasing the host."""
    userinfo, at, hostport = netloc.rpartition("@")
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port = tail.removeprefix(":")
    else:
        head, colon, port = hostport.rpartition(":")
        host = head if colon else hostport
        port = port if colon else ""
    return (userinfo if at else None), host, (int(port) if re.fullmatch(r"[0-9]{1,5}", port) else None)


def _ini_hostname(name: str, address: str) -> str:
    if _INI_HOSTNAME.fullmatch(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or address).strip("-.")
    return cleaned if _INI_HOSTNAME.fullmatch(cleaned) else f"host-{cleaned}".rstrip("-")


def _ini_value(value: object) -> str:
    """``value`` as an INI host variable that Ansible reads back as the same value (it reads
    each one as a Python literal when it can)."""
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _INI_PLAIN.fullmatch(text) and not _reads_as_literal(text):
        return text
    import shlex

    return shlex.quote(json.dumps(text))


def _reads_as_literal(text: str) -> bool:
    import ast

    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return True
