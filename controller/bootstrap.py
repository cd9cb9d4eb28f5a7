"""``skiff bootstrap``: install, configure and start skiffd on hosts over SSH, with no internet there.

The control node builds (once, cached) the skiff wheel and every runtime dependency's wheel; per
host, over one verified SSH connection (:func:`controller.ssh.ssh_connect`):

1. facts: one run of a small Python helper (:data:`HELPER`) with the host's ``python3``;
2. a plan, computed from the facts alone (:func:`plan_host`, no I/O: describe, then do);
3. the plan applied: missing wheels uploaded by SFTP into ``/opt/skiff/wheels`` (a manifest
   keeps their sizes and sha256), ``/opt/skiff/venv`` made, ``pip install --no-index`` from
   those wheels when the installed set differs, ``/etc/skiff/daemon.toml`` (and with TLS the
   agent's certificate from the fleet CA) written when the content differs, skiffd (re)started:
   a systemd unit modelled on containerd's where systemd runs, else a detached process with a
   pidfile;
4. the agent's System/Version answered through the same SSH connection, within a timeout.

A second run changes nothing.  The venv is a plain one: the agent loads Debian's python3-seccomp
extension by path (:func:`agent.runtime.seccomp.load_binding`), so ``--system-site-packages``
(which would let Debian's packages shadow the wheels) is not needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shlex
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from controller.errors import ConnectionFailed, ControllerError, UsageError
from controller.targets import Target
from controller.wheels import Wheel, WheelSet, cached_wheels, read_wheels  # noqa: F401 (skiff bootstrap's)

if TYPE_CHECKING:
    import asyncssh

    from controller.fanout import HostResult, Limits
    from controller.ssh import SSHOptions

TLS_PORT = 2376
#: pidfile-started skiffd: seconds beyond its shutdown-timeout to wait for it to exit after SIGTERM
STOP_GRACE = 10.0


class BootstrapError(ControllerError):
    """A host cannot be bootstrapped; the message names the host and what to do."""


# --- where things go on a host ------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Every path bootstrap touches on a host."""

    root: str = "/opt/skiff"
    etc: str = "/etc/skiff"
    run: str = "/run/skiff"
    log: str = "/var/log/skiff/skiffd.log"
    unit: str = "/etc/systemd/system/skiffd.service"
    #: present where systemd is the running init (sd_booted())
    systemd_marker: str = "/run/systemd/system"

    @property
    def wheels(self) -> str:
        return f"{self.root}/wheels"

    @property
    def venv(self) -> str:
        return f"{self.root}/venv"

    @property
    def skiffd(self) -> str:
        return f"{self.venv}/bin/skiffd"

    @property
    def state(self) -> str:
        """What is installed in the venv (written after a successful install)."""
        return f"{self.venv}/skiff-bootstrap.json"

    @property
    def config(self) -> str:
        return f"{self.etc}/daemon.toml"

    @property
    def tls(self) -> str:
        return f"{self.etc}/tls"

    @property
    def socket(self) -> str:
        return f"{self.run}/skiffd.sock"

    @property
    def pidfile(self) -> str:
        return f"{self.run}/skiffd.pid"

    def for_helper(self, files: Sequence[str] = ()) -> dict[str, Any]:
        return {"wheels": self.wheels, "venv": self.venv, "skiffd": self.skiffd, "state": self.state,
                "config": self.config, "socket": self.socket, "pidfile": self.pidfile, "log": self.log,
                "systemd": self.systemd_marker, "files": list(files)}


# --- the daemon's configuration -----------------------------------------------------

#: daemon.toml's keys and their kinds; the agent's own list is agent.config (a unit test checks they agree)
DAEMON_KEYS: dict[str, str] = {
    "data-root": "path", "exec-root": "path", "hosts": "list", "group": "str", "insecure-registries": "list",
    "certs-dir": "path", "max-concurrent-downloads": "int", "log-level": "str", "log-format": "str",
    "shutdown-timeout": "float", "cgroup-parent": "str", "tlsverify": "bool", "tlscacert": "path",
    "tlscert": "path", "tlskey": "path", "allow-insecure-tcp": "bool",
}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_config_args(items: Sequence[str]) -> dict[str, Any]:
    """``--config KEY=VALUE`` (repeatable) → typed daemon.toml values; a list key given twice collects
    both values (``VALUE`` may also be ``a,b``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"invalid --config {item!r}: use KEY=VALUE")
        kind = DAEMON_KEYS.get(key)
        if kind is None:
            raise UsageError(f"invalid --config {item!r}: unknown key {key!r} (one of {', '.join(DAEMON_KEYS)})")
        value = value.strip()
        if kind == "list":
            out.setdefault(key, []).extend(v.strip() for v in value.split(",") if v.strip())
        elif kind == "bool":
            if value.lower() not in _TRUE + _FALSE:
                raise UsageError(f"invalid --config {item!r}: {key} is true or false")
            out[key] = value.lower() in _TRUE
        elif kind in ("int", "float"):
            try:
                number = int(value) if kind == "int" else float(value)
            except ValueError:
                raise UsageError(f"invalid --config {item!r}: {key} is a number") from None
            if number < 0:
                raise UsageError(f"invalid --config {item!r}: {key} must not be negative")
            out[key] = number
        elif kind == "path" and not value.startswith("/"):
            raise UsageError(f"invalid --config {item!r}: {key} is an absolute path")
        else:
            out[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def daemon_config(layout: Layout, tls: bool, extra: Mapping[str, Any]) -> dict[str, Any]:
    """daemon.toml's keys: the unix socket always; with TLS also tcp://0.0.0.0:2376 and the certificate;
    then ``extra`` (its ``hosts`` replace the tcp listener, the unix socket stays)."""
    doc: dict[str, Any] = {"hosts": [f"unix://{layout.socket}"]}
    if tls:
        doc["hosts"].append(f"tcp://0.0.0.0:{TLS_PORT}")
        doc.update({"tlsverify": True, "tlscacert": f"{layout.tls}/ca.pem", "tlscert": f"{layout.tls}/cert.pem",
                    "tlskey": f"{layout.tls}/key.pem"})
    for key, value in extra.items():
        if key == "hosts":
            value = [f"unix://{layout.socket}"] + [h for h in value if h != f"unix://{layout.socket}"]
        doc[key] = value
    for host in doc["hosts"]:
        if not host.startswith(("unix:///", "tcp://")):
            raise UsageError(f"invalid --config hosts {host!r}: use unix:///path or tcp://HOST:PORT")
    return doc


def render_config(doc: Mapping[str, Any]) -> str:
    lines = ["# Written by `skiff bootstrap`; its next run replaces edits here.",
             "# Extra keys: skiff bootstrap --config KEY=VALUE"]
    return "\n".join(lines + [f"{key} = {_toml_value(value)}" for key, value in doc.items()]) + "\n"


def render_unit(layout: Layout) -> str:
    """skiffd's systemd unit, after containerd's: the agent's containers live in their own cgroups
    (Delegate), survive its restart (KillMode=process), and no ProtectSystem (it mounts)."""
    return f"""\
# Written by `skiff bootstrap`; its next run replaces edits here.
[Unit]
Description=skiff container agent
After=network-online.target local-fs.target
Wants=network-online.target

[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart={layout.skiffd} --config-file {layout.config}
Type=simple
Delegate=yes
KillMode=process
Restart=on-failure
RestartSec=5
LimitNPROC=infinity
LimitCORE=infinity
LimitNOFILE=1048576
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
"""


# --- facts and the plan -----------------------------------------------------------


@dataclass(frozen=True)
class HostFacts:
    """What the helper found on a host (see :data:`HELPER`'s ``facts``)."""

    python: tuple[int, ...]
    machine: str = "x86_64"
    uid: int = 0
    ensurepip: bool = True
    #: the venv's Python (major, minor), None without a venv
    venv_python: tuple[int, ...] | None = None
    #: the install state file's content, None when nothing is installed
    installed: Mapping[str, str] | None = None
    #: wheels in the wheel directory: name -> (size, sha256)
    wheels: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    manifest_stale: bool = False
    #: path -> (sha256, mode) of each file asked about, None when missing
    files: Mapping[str, tuple[str, int] | None] = field(default_factory=dict)
    systemd: bool = False
    unit_active: str = "inactive"
    unit_enabled: bool = False
    #: the pidfile's skiffd, when it runs
    pid: int | None = None
    #: something accepts connections on the agent's socket
    socket_live: bool = False
    group: bool = True

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> HostFacts:
        return cls(python=tuple(doc["python"]), machine=doc["machine"], uid=doc["uid"], ensurepip=doc["ensurepip"],
                   venv_python=tuple(doc["venv_python"]) if doc.get("venv_python") else None,
                   installed=doc.get("installed"), wheels={k: (v[0], v[1]) for k, v in doc["wheels"].items()},
                   manifest_stale=doc["manifest_stale"],
                   files={k: (v[0], v[1]) if v else None for k, v in doc["files"].items()},
                   systemd=doc["systemd"], unit_active=doc.get("unit_active", "inactive"),
                   unit_enabled=doc.get("unit_enabled", False), pid=doc.get("pid"),
                   socket_live=doc["socket_live"], group=doc["group"])


@dataclass(frozen=True)
class FileSpec:
    content: bytes
    mode: int


@dataclass
class Plan:
    """What to do on one host, in this order."""

    host: str
    upload: list[Wheel] = field(default_factory=list)
    #: wheels to keep in the wheel directory (everything else there goes); None: leave it alone
    keep: list[str] | None = None
    venv: str = ""  # "", "create", "recreate"
    install: bool = False
    reinstall_skiff: bool = False
    create_group: bool = False
    dirs: dict[str, int] = field(default_factory=dict)
    write: dict[str, FileSpec] = field(default_factory=dict)
    systemd: bool = False
    daemon_reload: bool = False
    enable: bool = False
    service: str = ""  # "", "start", "restart"
    actions: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def install_state(wheels: WheelSet) -> dict[str, str]:
    return {"version": wheels.version, "skiff_sha256": wheels.skiff.sha256, "wheels": wheels.digest}


def needs_upload(local: Sequence[Wheel], remote: Mapping[str, tuple[int, str]]) -> list[Wheel]:
    """The wheels the host lacks, or has with another size or sha256."""
    return [w for w in local if remote.get(w.name) != (w.size, w.sha256)]


def plan_host(host: str, facts: HostFacts, wheels: WheelSet, files: Mapping[str, FileSpec],
              dirs: Mapping[str, int], layout: Layout) -> Plan:
    """Everything one host needs, from its facts alone (raises :class:`BootstrapError` when it cannot)."""
    if facts.uid != 0:
        raise BootstrapError(f"skiff bootstrap logs in as root: the SSH user on {host} has uid {facts.uid} "
                             "(use ssh://root@HOST)")
    if tuple(facts.python[:2]) < (3, 11):
        raise BootstrapError(f"python3 on {host} is {'.'.join(map(str, facts.python))}; skiffd needs 3.11 or later")
    plan = Plan(host, systemd=facts.systemd)
    plan.upload = needs_upload(wheels.wheels, facts.wheels)
    names = sorted(w.name for w in wheels.wheels)
    if plan.upload or facts.manifest_stale or sorted(facts.wheels) != names:
        plan.keep = names
    if plan.upload:
        plan.actions.append(f"uploaded {len(plan.upload)} wheels")
    if extra := sorted(set(facts.wheels) - set(names)):
        plan.actions.append(f"removed {len(extra)} old wheels")
    if facts.venv_python is None:
        plan.venv = "create"
    elif tuple(facts.venv_python[:2]) != tuple(facts.python[:2]):
        plan.venv = "recreate"
    if plan.venv and not facts.ensurepip:
        raise BootstrapError(f"python3-venv missing on {host}: apt-get install python3-venv")
    if plan.venv:
        plan.actions.append(f"{plan.venv}d {layout.venv}")
    installed = dict(facts.installed) if facts.installed else None
    plan.install = bool(plan.venv) or installed != install_state(wheels)
    if plan.install:
        plan.reinstall_skiff = not plan.venv and (installed is None or (
            installed.get("version") == wheels.version and installed.get("skiff_sha256") != wheels.skiff.sha256))
        plan.actions.append(f"installed skiff {wheels.version}")
    if not facts.group:
        plan.create_group = True
        plan.actions.append("created group skiff")
    plan.dirs = dict(dirs)
    restart = plan.install
    for path, spec in files.items():
        have = facts.files.get(path)
        if have == (hashlib.sha256(spec.content).hexdigest(), spec.mode):
            continue
        plan.write[path] = spec
        plan.actions.append(f"wrote {path}")
        if have is None or have[0] != hashlib.sha256(spec.content).hexdigest():
            restart = True
    if facts.systemd:
        plan.daemon_reload = layout.unit in plan.write
        plan.enable = not facts.unit_enabled
        if plan.enable:
            plan.actions.append("enabled skiffd.service")
        if facts.unit_active not in ("active", "activating", "reloading"):
            plan.service = "start"
        elif restart:
            plan.service = "restart"
    elif facts.pid is not None:
        plan.service = "restart" if restart else ""
    elif facts.socket_live:
        raise BootstrapError(f"a skiffd that skiff bootstrap did not start already serves {layout.socket} on {host} "
                             f"(no live process in {layout.pidfile}): stop it first")
    else:
        plan.service = "start"
    if plan.service:
        plan.actions.append("restarted skiffd" if plan.service == "restart" else "started skiffd")
    return plan


# --- the helper run on the host ----------------------------------------------------

#: run as ``python3 -c HELPER COMMAND LAYOUT_JSON [ARG_JSON]``; prints JSON.  Python 3.6+ syntax,
#: so that an old python3 is reported as such rather than failing to parse.
HELPER = r'''
import grp, hashlib, importlib.util, json, os, platform, signal, socket, subprocess, sys, time

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def write(path, data, mode):
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, ".%s.tmp" % os.path.basename(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())
    os.replace(tmp, path)

def listing(L):
    d = L["wheels"]
    try:
        with open(os.path.join(d, "manifest.json")) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    out, stale = {}, False
    names = sorted(n for n in os.listdir(d) if n.endswith(".whl")) if os.path.isdir(d) else []
    for n in names:
        st = os.stat(os.path.join(d, n))
        k = known.get(n) or {}
        if k.get("size") == st.st_size and k.get("mtime_ns") == st.st_mtime_ns and k.get("sha256"):
            digest = k["sha256"]
        else:
            digest, stale = sha(os.path.join(d, n)), True
        out[n] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return out, stale or sorted(known) != names

def agent_pid(L):
    try:
        with open(L["pidfile"]) as f:
            pid = int(f.read().split()[0])
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if state not in ("Z", "X") and L["skiffd"].encode() in argv else None

def facts(L):
    ensurepip = importlib.util.find_spec("ensurepip")  # Debian ships it in python3-venv
    out = {"python": list(sys.version_info[:3]), "machine": platform.machine(), "uid": os.geteuid(),
           "ensurepip": bool(ensurepip and ensurepip.has_location), "venv_python": None, "installed": None}
    try:  # a venv whose creation completed: pyvenv.cfg, its python, and pip in it
        with open(os.path.join(L["venv"], "pyvenv.cfg")) as f:
            cfg = dict((k.strip(), v.strip()) for k, _, v in (ln.partition("=") for ln in f) if v)
        major, minor = [int(x) for x in (cfg.get("version_info") or cfg.get("version") or "").split(".")[:2]]
        pip = os.path.join(L["venv"], "lib", "python%d.%d" % (major, minor), "site-packages", "pip")
        if os.access(os.path.join(L["venv"], "bin", "python"), os.X_OK) and os.path.isdir(pip):
            out["venv_python"] = [major, minor]
    except (OSError, ValueError):
        pass
    try:
        if os.access(L["skiffd"], os.X_OK):
            with open(L["state"]) as f:
                out["installed"] = json.load(f)
    except (OSError, ValueError):
        pass
    wheels, out["manifest_stale"] = listing(L)
    out["wheels"] = dict((n, [w["size"], w["sha256"]]) for n, w in wheels.items())
    out["files"] = {}
    for path in L["files"]:
        try:
            out["files"][path] = [sha(path), os.stat(path).st_mode & 0o7777]
        except OSError:
            out["files"][path] = None
    out["systemd"] = os.path.isdir(L["systemd"])
    if out["systemd"]:
        run = lambda *a: subprocess.run(["systemctl"] + list(a) + ["skiffd.service"], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, universal_newlines=True).stdout.strip()
        out["unit_active"], out["unit_enabled"] = run("is-active"), run("is-enabled") == "enabled"
    out["pid"] = agent_pid(L)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(L["socket"])
        out["socket_live"] = True
    except OSError:
        out["socket_live"] = False
    finally:
        s.close()
    try:
        grp.getgrnam("skiff")
        out["group"] = True
    except KeyError:
        out["group"] = False
    return out

def manifest(L, keep):
    d = L["wheels"]
    os.makedirs(d, exist_ok=True)
    for n in os.listdir(d):
        if (n.endswith(".whl") or n.endswith(".part")) and n not in keep:
            os.unlink(os.path.join(d, n))
    wheels, _ = listing(L)
    write(os.path.join(d, "manifest.json"), json.dumps(wheels, indent=1, sort_keys=True).encode(), 0o644)
    return dict((n, [w["size"], w["sha256"]]) for n, w in wheels.items())

def put(L, arg):
    for path, mode in arg["dirs"]:
        os.makedirs(path, mode, exist_ok=True)
        os.chmod(path, mode)
    data, at = sys.stdin.buffer.read() if arg["files"] else b"", 0
    for path, mode, size in arg["files"]:
        write(path, data[at:at + size], mode)
        at += size
    return len(arg["files"])

def start(L):
    for d in (os.path.dirname(L["log"]), os.path.dirname(L["pidfile"])):
        os.makedirs(d, 0o755, exist_ok=True)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    with open(L["log"], "ab") as log, open(os.devnull, "rb") as null:
        proc = subprocess.Popen([L["skiffd"], "--config-file", L["config"]], stdin=null, stdout=log, stderr=log,
                                cwd="/", env=env, start_new_session=True, close_fds=True)
    write(L["pidfile"], ("%d\n" % proc.pid).encode(), 0o644)
    return proc.pid

def stop(L, timeout):
    pid = agent_pid(L)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while agent_pid(L) == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if agent_pid(L) == pid:
            os.kill(pid, signal.SIGKILL)
    try:
        os.unlink(L["pidfile"])
    except OSError:
        pass
    return pid

CHECK = """import sys
from pathlib import Path
from agent.config import load_config
try:
    load_config(Path(sys.argv[1]), {})
except Exception as exc:
    sys.exit(str(exc))
"""

def config(L, staged):
    python = os.path.join(L["venv"], "bin", "python")
    done = subprocess.run([python, "-c", CHECK, staged], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          universal_newlines=True)
    if done.returncode != 0:
        os.unlink(staged)
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else "exit status %d" % done.returncode
    os.replace(staged, L["config"])
    return None

def status(L):
    tail = []
    try:
        with open(L["log"], "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace").splitlines()[-5:]
    except OSError:
        pass
    return {"pid": agent_pid(L), "tail": tail}

L = json.loads(sys.argv[2])
arg = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
cmd = sys.argv[1]
result = {"facts": lambda: facts(L), "manifest": lambda: manifest(L, set(arg)), "put": lambda: put(L, arg),
          "start": lambda: start(L), "stop": lambda: stop(L, arg), "status": lambda: status(L),
          "config": lambda: config(L, arg)}[cmd]()
sys.stdout.write(json.dumps(result))
'''


class Remote(Protocol):
    """A host's side of bootstrap: commands, uploads and the agent's answer (see :class:`SSHRemote`)."""

    label: str

    async def run(self, command: str, input: bytes = b"") -> tuple[int, str, str]:
        """``command`` through the login shell: (exit status, stdout, stderr)."""

    async def upload(self, files: Sequence[tuple[Path, str]]) -> None:
        """Each local file to its remote path (whole or not at all)."""

    async def agent_version(self, socket: str, timeout: float) -> str | None:
        """The version the agent at ``socket`` answers with; None while nothing answers there."""


async def helper(remote: Remote, layout: Layout, command: str, arg: Any = None, files: Sequence[str] = (),
                 input: bytes = b"") -> Any:
    argv = ["python3", "-c", HELPER, command, json.dumps(layout.for_helper(files))]
    if arg is not None:
        argv.append(json.dumps(arg))
    code, out, err = await remote.run(shlex.join(argv), input)
    if code == 127 and "python3" in err:
        raise BootstrapError(f"python3 missing on {remote.label}: apt-get install python3")
    if code != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        raise BootstrapError(f"bootstrap helper {command!r} on {remote.label} exited {code}: "
                             f"{lines[-1] if lines else '(no output)'}")
    return json.loads(out)


async def _checked(remote: Remote, what: str, command: str) -> None:
    code, out, err = await remote.run(command)
    if code != 0:
        lines = [ln.strip() for ln in (err or out).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "(no output)")
        raise BootstrapError(f"{what} on {remote.label} failed (exit {code}): {why}")


async def apply(remote: Remote, plan: Plan, wheels: WheelSet, layout: Layout, shutdown_timeout: float) -> None:
    """Carry out ``plan`` on the host."""
    if plan.upload:
        await remote.upload([(wheels.dir / w.name, f"{layout.wheels}/{w.name}") for w in plan.upload])
    if plan.keep is not None:
        have = await helper(remote, layout, "manifest", plan.keep)
        bad = [w.name for w in plan.upload if have.get(w.name) != [w.size, w.sha256]]
        if bad:
            raise BootstrapError(f"uploaded wheels differ on {remote.label} (size or sha256): {', '.join(bad)}")
    if plan.venv:
        await _checked(remote, "python3 -m venv", f"python3 -m venv --clear {shlex.quote(layout.venv)}")
    if plan.install:
        pip = (f"env PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "
               f"{shlex.quote(layout.venv)}/bin/python -m pip install -q --no-index "
               f"--find-links {shlex.quote(layout.wheels)}")
        await _checked(remote, "pip install", f"{pip} --upgrade --upgrade-strategy eager skiff=={wheels.version}")
        if plan.reinstall_skiff:
            await _checked(remote, "pip install", f"{pip} --force-reinstall --no-deps "
                                                  f"{shlex.quote(layout.wheels + '/' + wheels.skiff.name)}")
        state = json.dumps(install_state(wheels)).encode()
        await helper(remote, layout, "put", {"dirs": [], "files": [[layout.state, 0o644, len(state)]]}, input=state)
    if plan.create_group:
        await _checked(remote, "groupadd", "getent group skiff >/dev/null || groupadd --system skiff")
    if plan.write:  # daemon.toml staged, and in place only once the agent's own loader takes it
        staged = {f"{p}.new" if p == layout.config else p: spec for p, spec in plan.write.items()}
        data = b"".join(spec.content for spec in staged.values())
        await helper(remote, layout, "put", {"dirs": [[d, m] for d, m in plan.dirs.items()],
                                             "files": [[p, s.mode, len(s.content)] for p, s in staged.items()]},
                     input=data)
        if layout.config in plan.write and (why := await helper(remote, layout, "config", f"{layout.config}.new")):
            raise BootstrapError(f"skiffd on {remote.label} refuses the new {layout.config} (the old one stays): {why}")
    if plan.systemd:
        steps = (["systemctl daemon-reload"] if plan.daemon_reload else []) + (
            ["systemctl enable skiffd.service"] if plan.enable else []) + (
            [f"systemctl {plan.service} skiffd.service"] if plan.service else [])
        if steps:
            await _checked(remote, "systemctl", " && ".join(steps))
    elif plan.service:
        if plan.service == "restart":
            await helper(remote, layout, "stop", shutdown_timeout + STOP_GRACE)
        await helper(remote, layout, "start")


async def wait_healthy(remote: Remote, layout: Layout, version: str, timeout: float, systemd: bool) -> None:
    """Until the agent answers System/Version through the connection (its version must be ours)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    next_check = loop.time() + 1.0
    while True:
        answered = await remote.agent_version(layout.socket, max(1.0, min(5.0, deadline - loop.time())))
        if answered is not None:
            if answered != version:
                raise BootstrapError(f"the agent on {remote.label} answers as skiffd {answered}, not {version} "
                                     "(another skiffd still serves its socket?)")
            return
        now = loop.time()
        if now >= deadline:
            raise BootstrapError(f"skiffd on {remote.label} did not answer at {layout.socket} within {timeout:g}s"
                                 f"{await _why(remote, layout, systemd)}")
        if now >= next_check:
            next_check = now + 1.0
            if (why := await _why(remote, layout, systemd, only_dead=True)):
                raise BootstrapError(f"skiffd on {remote.label} exited at start{why}")
        await asyncio.sleep(0.1)


async def _why(remote: Remote, layout: Layout, systemd: bool, only_dead: bool = False) -> str:
    if systemd:
        _, out, _ = await remote.run("systemctl is-active skiffd.service; journalctl -u skiffd.service -n 3 "
                                     "--no-pager -o cat 2>/dev/null")
        lines = out.strip().splitlines()
        state = lines[0] if lines else "unknown"
        if only_dead and state in ("active", "activating", "reloading"):
            return ""
        return f" (skiffd.service {state}{': ' + lines[-1] if len(lines) > 1 else ''})"
    found = await helper(remote, layout, "status")
    if only_dead and found["pid"] is not None:
        return ""
    last = next((ln for ln in reversed(found["tail"]) if ln.strip()), "")
    return f" ({layout.log}: {last})" if last else f" (nothing in {layout.log})"


# --- one host --------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapOptions:
    #: the wheels to install from; None: this checkout's, built once and cached
    wheels: WheelSet | None = None
    #: also listen on tcp://0.0.0.0:2376 with mutual TLS, the certificate from the fleet CA
    tls: bool = False
    #: the fleet CA (None: $SKIFF_CA_DIR or ~/.skiff/ca)
    ca_dir: Path | None = None
    #: extra daemon.toml keys (``parse_config_args``)
    config: Mapping[str, Any] = field(default_factory=dict)
    layout: Layout = field(default_factory=Layout)
    health_timeout: float = 60.0


def agent_tls_files(ca_dir: Path, host: str, names: Sequence[str] = ()) -> dict[str, bytes]:
    """ca.pem, cert.pem and key.pem for the agent on ``host``: the CA's certificate for it when it
    has one that is current, signed by this CA and names ``names`` too; else a new one."""
    import datetime as dt

    from controller import ca as pki

    host = pki.check_host(host)
    wanted = [pki.check_host(n) for n in names]
    ca_pem = (ca_dir / pki.CA_CERT).read_bytes() if (ca_dir / pki.CA_CERT).is_file() else None
    issued = ca_dir / pki.AGENTS / host
    try:
        info = pki.describe(issued / pki.CERT)
        sans = {s.split(":", 1)[1] for s in info.sans}
        current = (ca_pem is not None and (issued / pki.CA_CERT).read_bytes() == ca_pem
                   and (issued / pki.KEY).is_file() and {host, *wanted} <= sans
                   and info.not_after - dt.datetime.now(dt.UTC) > dt.timedelta(days=30))
    except (pki.CAError, OSError):
        current = False
    if not current:
        pki.issue_agent_cert(ca_dir, host, extra_names=wanted)
    return {name: (issued / name).read_bytes() for name in (pki.CA_CERT, pki.CERT, pki.KEY)}


def desired_files(target: Target, options: BootstrapOptions, systemd: bool) -> tuple[dict[str, FileSpec],
                                                                                      dict[str, int]]:
    """The files bootstrap keeps on ``target`` (path -> content and mode) and the directories they need."""
    layout = options.layout
    files = {layout.config: FileSpec(render_config(daemon_config(layout, options.tls, options.config)).encode(),
                                     0o644)}
    dirs: dict[str, int] = {}
    if options.tls:
        from controller import ca as pki

        address = target.ssh_address().host
        names = [target.name] if target.name and target.name != address and _valid_host(target.name) else []
        tls = agent_tls_files(options.ca_dir or pki.default_dir(), address, names)
        dirs[layout.tls] = 0o700
        files.update({f"{layout.tls}/{n}": FileSpec(data, 0o600 if n == pki.KEY else 0o644) for n, data in tls.items()})
    if systemd:
        files[layout.unit] = FileSpec(render_unit(layout).encode(), 0o644)
    return files, dirs


def _valid_host(name: str) -> bool:
    from controller import ca as pki

    try:
        pki.check_host(name)
    except pki.InvalidNameError:
        return False
    return True


async def converge(remote: Remote, target: Target, options: BootstrapOptions, wheels: WheelSet) -> Plan:
    """Facts, plan, apply, health: what was done (``plan.changed``) once the agent answers."""
    layout = options.layout
    tracked = [layout.config, layout.unit, *(f"{layout.tls}/{n}" for n in ("ca.pem", "cert.pem", "key.pem"))]
    facts = HostFacts.from_json(await helper(remote, layout, "facts", files=tracked))
    files, dirs = desired_files(target, options, facts.systemd)
    plan = plan_host(remote.label, facts, wheels, files, dirs, layout)
    shutdown = float(options.config.get("shutdown-timeout", 15.0))
    await apply(remote, plan, wheels, layout, shutdown)
    await wait_healthy(remote, layout, wheels.version, options.health_timeout, facts.systemd)
    return plan


class SSHRemote:
    """:class:`Remote` over one asyncssh connection; asyncssh's errors become controller errors here."""

    _forwards = 0

    def __init__(self, conn: asyncssh.SSHClientConnection, label: str) -> None:
        self.conn = conn
        self.label = label

    def _lost(self, exc: Exception) -> ConnectionFailed:
        return ConnectionFailed(f"SSH connection to {self.label} lost: {getattr(exc, 'reason', None) or exc}")

    async def run(self, command: str, input: bytes = b"") -> tuple[int, str, str]:
        import asyncssh

        try:
            # stdin gets EOF either way: a command reading it must not wait for the connection to end
            stdin: dict[str, Any] = {"input": input} if input else {"stdin": asyncssh.DEVNULL}
            done = await self.conn.run(command, encoding=None, check=False, **stdin)
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(exc) from exc
        out, err = done.stdout or b"", done.stderr or b""
        assert isinstance(out, bytes) and isinstance(err, bytes)
        return (done.exit_status if done.exit_status is not None else 255,
                out.decode(errors="replace"), err.decode(errors="replace"))

    async def upload(self, files: Sequence[tuple[Path, str]]) -> None:
        import asyncssh

        try:
            async with self.conn.start_sftp_client() as sftp:
                for parent in sorted({os.path.dirname(r) for _, r in files}):
                    await sftp.makedirs(parent, exist_ok=True)

                async def one(local: Path, remote: str) -> None:
                    part = f"{os.path.dirname(remote)}/.{os.path.basename(remote)}.part"
                    await sftp.put(str(local), part)
                    await sftp.posix_rename(part, remote)

                await asyncio.gather(*(one(local, remote) for local, remote in files))
        except asyncssh.SFTPError as exc:
            raise BootstrapError(f"SFTP upload to {self.label} failed: {exc.reason}") from exc
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(exc) from exc

    async def agent_version(self, socket: str, timeout: float) -> str | None:
        import asyncssh
        import grpc
        from grpc import aio

        from controller.client import Agent
        from skiff.v1 import system_pb2

        try:
            _, writer = await self.conn.open_unix_connection(socket)
            writer.close()
        except asyncssh.ChannelOpenError:
            return None
        SSHRemote._forwards += 1
        name = f"skiff-bootstrap-{os.getpid()}-{SSHRemote._forwards}"
        try:
            listener = await self.conn.forward_local_path("\0" + name, socket)
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(exc) from exc
        try:
            channel = aio.insecure_channel(f"unix-abstract:{name}")
            try:
                answer = await Agent(self.label, channel).system.Version(system_pb2.VersionRequest(), timeout=timeout)
                return str(answer.version)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return None
                from controller.client import translate

                raise translate(self.label, exc) from exc
            finally:
                await channel.close(grace=None)
        finally:
            listener.close()


_checkout_lock = threading.Lock()


def _this_checkout() -> WheelSet:
    """This checkout's wheels, looked up (or built) once per process however many hosts need them."""
    with _checkout_lock:
        global _checkout_wheels
        if _checkout_wheels is None:
            _checkout_wheels = cached_wheels(announce=lambda text: print(text, file=sys.stderr))
        return _checkout_wheels


_checkout_wheels: WheelSet | None = None


async def ensure_agent(conn: asyncssh.SSHClientConnection, target: Target,
                       options: BootstrapOptions = BootstrapOptions()) -> bool:
    """Install, configure and start skiffd on ``target`` over ``conn`` as needed; True when it changed
    something.  Raises :class:`BootstrapError` (the host cannot be bootstrapped) or
    :class:`ConnectionFailed` (the connection broke)."""
    wheels = options.wheels if options.wheels is not None else await asyncio.to_thread(_this_checkout)
    return (await converge(SSHRemote(conn, target.label), target, options, wheels)).changed


# --- many hosts ------------------------------------------------------------------


async def bootstrap_hosts(targets: Sequence[Target], options: BootstrapOptions, ssh: SSHOptions,
                          limits: Limits, host_timeout: float) -> list[HostResult]:
    """Every host at once (``forks`` at a time, in ``serial`` batches), each ending in a fan-out state;
    an OK host's value is ``{"changed": bool, "actions": [...]}``."""
    from controller.fanout import FAILED, OK, SKIPPED, TIMEOUT, UNREACHABLE, HostResult

    wheels = options.wheels
    assert wheels is not None, "bootstrap_hosts takes prepared wheels"
    gate = asyncio.Semaphore(max(1, limits.forks))

    async def one(target: Target) -> HostResult:
        from controller.ssh import ssh_connect

        label = target.label
        if not target.is_ssh:
            return HostResult(label, FAILED, error=f"skiff bootstrap goes over SSH, and {target.url} is not ssh:// "
                              "(-H ssh://root@HOST, or skiff_transport=ssh in the inventory)", target=target)
        async with gate:
            attempt = 0
            while True:
                try:
                    conn = await ssh_connect(target, ssh)
                    break
                except ConnectionFailed as exc:
                    if not exc.retryable or attempt >= limits.retries:
                        return HostResult(label, UNREACHABLE, error=str(exc), target=target, attempts=attempt + 1)
                await asyncio.sleep(limits.backoff * (2 ** attempt) * random.uniform(0.5, 1.5))
                attempt += 1
            try:
                plan = await asyncio.wait_for(converge(SSHRemote(conn, label), target, options, wheels),
                                              host_timeout)
            except TimeoutError:
                return HostResult(label, TIMEOUT, error=f"not done within {host_timeout:g}s", target=target)
            except ConnectionFailed as exc:
                return HostResult(label, UNREACHABLE, error=str(exc), target=target)
            except ControllerError as exc:
                return HostResult(label, FAILED, error=str(exc), target=target)
            finally:
                conn.close()
            return HostResult(label, OK, {"changed": plan.changed, "actions": plan.actions}, target=target,
                              attempts=attempt + 1)

    size = limits.serial or len(targets) or 1
    results: list[HostResult] = []
    for start in range(0, len(targets), size):
        batch = list(await asyncio.gather(*(one(t) for t in targets[start:start + size])))
        results.extend(batch)
        failed = sum(1 for r in batch if r.status != OK)
        over = failed == len(batch) or (limits.max_fail_percentage is not None
                                        and 100.0 * failed / len(batch) > limits.max_fail_percentage)
        if limits.serial and failed and over and start + size < len(targets):
            why = f"not run: {failed} of {len(batch)} hosts in the last batch did not end OK"
            results += [HostResult(t.label, SKIPPED, error=why, target=t) for t in targets[start + size:]]
            break
    return results


def summary_line(result: HostResult) -> str:
    return f"{result.host}\t{'changed' if result.value and result.value.get('changed') else 'ok'}"


__all__ = ["BootstrapError", "BootstrapOptions", "Layout", "WheelSet", "bootstrap_hosts", "cached_wheels",
           "ensure_agent", "read_wheels"]
