"""The fleet lab: N "hosts" on this machine, each a network and a mount namespace of its own
with a real ``skiffd`` and a real ``sshd``, behind one bridge, with a registry holding busybox.

    with Lab(5, tmp_path) as lab:                     # ~2 s for 5 hosts, all started in parallel
        lab.ok(*lab.target_args(), "pull", lab.registry_ref("busybox:1"))   # real CLI, admin cert
        lab.skiff("-H", lab.hosts[0].grpc_url, "ps", cert="viewer")
        lab.hosts[2].kill_agent(); lab.hosts[2].start_agent()
        lab.ssh(lab.hosts[1], "cat", "/etc/skiff/lab-host")                 # -> "host2"
    assert not lab.leftovers()

Each host ``hostN`` (address ``10.A.B.(N+1)``, the bridge is ``.1``; the /24 is random in
10.200-250.x.0, one no interface or route of this machine uses) has:

* a named network namespace ``skiff-lab-<run>-N`` (``ip -n``), its ``eth0`` a veth whose root
  side ``skv-<run>-N`` is a port of the bridge ``skbr-<run>``; ``lo`` up; no default route,
  so nothing in the lab reaches past the bridge;
* a mount (and UTS, hostname ``hostN``) namespace held by a *keeper* process (``sleep
  infinity``), where ``/etc/skiff``, ``/var/lib/skiff``, ``/run/skiff``, ``/root/.ssh``,
  ``/opt/skiff`` and ``/run/sshd`` are bind mounts of ``<workdir>/hostN/<path with - for />``
  (see :meth:`LabHost.private`), and ``/root/.bashrc`` is an empty file, so ssh commands never
  run this machine's pyenv set-up.  Every later process of the host is started with ``nsenter
  -t KEEPER -m -n -u``: skiffd's mounts (overlays) live and die in that namespace;
* ``skiffd`` with no flags but ``--log-format json``, configured as a real install would be, by
  ``/etc/skiff/daemon.toml``: the default unix socket ``/run/skiff/skiffd.sock`` (private), state
  in ``/var/lib/skiff``, ``tcp://ADDR:2376`` with mutual TLS (``skiff ca agent-cert ADDR``, files
  in ``/etc/skiff/tls``), ``cgroup-parent = /skiff-lab-<run>-N``, the lab registry as an insecure
  registry.  ``Lab(n, dir, agents=[True, False, ...])`` makes hosts with no agent and no
  ``/etc/skiff/daemon.toml`` (for bootstrap tests: ``start_agent()`` writes the lab's config
  first; an agent installed another way should use ``agent_cert_dir`` and ``cgroup_parent``, so
  that teardown finds its containers' cgroups);
* ``sshd`` on ``ADDR:22`` with its own ed25519 host key, root login with the lab's key only.

The lab writes ``ca/`` (``skiff ca init``; ``ca/clients/admin`` and ``ca/clients/viewer`` are
usable as ``$SKIFF_CERT_PATH``), ``ssh/id_ed25519`` (the client key), ``ssh/known_hosts`` (every
host's key by address) and ``inventory.ini`` / ``inventory-ssh.ini`` (groups ``lab``, ``agents``,
``bare``; the second adds ``skiff_transport=ssh``).  The registry (``docker-registry``, plain
HTTP) listens on the bridge address and holds ``busybox:1``.

API::

    Lab(n, workdir, *, agents=True)           context manager; start() / close() also work
      .hosts: list[LabHost]   .run_id   .prefix ("skiff-lab-<run>")   .bridge   .bridge_address
      .ca_dir   .admin   .viewer (cert dirs)   .ssh_key   .known_hosts
      .inventory(transport="grpc"|"ssh") -> Path     .registry_ref("busybox:1") -> "10.A.B.1:PORT/busybox:1"
      .target_args(transport="grpc", hosts=None) -> ["-i", INV, "--on", "host1:host2"] or ["-H", url, ...]
      .skiff(*args, cert="admin"|"viewer"|None|Path, env=None, timeout=120) -> Result (root side, no $SKIFF_HOST)
      .ok(*args, ...) -> stdout, raising LabError unless it exits 0
      .ssh(host, *cmd, known_hosts=None, timeout=30) -> CompletedProcess[str]
      .restore(): agents running and thawed, no containers   .leftovers() -> list[str] (empty once closed)
      .setup_seconds   .teardown_seconds   .teardown_errors
    LabHost
      .name .index .address .netns .veth .cgroup_parent .dir .grpc_url .ssh_url .unix_url
      .private("/etc/skiff/x") -> the root-side path of a host-private file
      .run(*cmd, timeout=60, input=None) -> CompletedProcess[str] inside the host's namespaces
      .start_agent() .stop_agent() .kill_agent() .freeze_agent() .thaw_agent() .agent_pid .agent_log
      .write_agent_config() .agent_cert_dir   .start_sshd() .stop_sshd()   .remove_containers()

Teardown (``close()``; also when ``start()`` fails half-way) removes everything, each step
whatever the others did: containers (``rm -f`` through each agent), agents (SIGCONT, SIGTERM,
SIGKILL), sshds, the cgroups under each ``--cgroup-parent`` (every v1 hierarchy and the unified
one), every process left in a host's namespaces, the keepers (their mount namespaces, with the
overlays in them, go with their last process), netns, veths, the bridge and the registry.  Only
processes found in a host's own namespaces or started by the lab are ever signalled, by PID.

Mount points that do not exist on this machine are created once as empty directories (bind
mounts need them); they stay, like iproute2's ``/run/netns`` mount, shared with any later lab.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tests.support import ociimage
from tests.support.agent import Result
from tests.support.registry import DOCKER_REGISTRY, Registry

BIN = Path(sys.executable).parent
SSHD = "/usr/sbin/sshd"
AGENT_PORT = 2376
#: each host's private directories (bind mounts of ``<host dir>/<path with - for />``, see ``LabHost.private``)
PRIVATE_DIRS = ("/etc/skiff", "/var/lib/skiff", "/run/skiff", "/root/.ssh", "/opt/skiff", "/run/sshd")
MARKER = "/etc/skiff/lab-host"
CGROUP_ROOT = Path("/sys/fs/cgroup")
Transport = Literal["grpc", "ssh"]


class LabError(RuntimeError):
    """The lab could not be set up or torn down (the message names the host, command and output)."""


def missing_requirements() -> list[str]:
    """Why a lab cannot run here (empty when it can)."""
    missing = [] if os.geteuid() == 0 else ["root (namespaces, bridges, cgroups)"]
    for path, package in ((SSHD, "openssh-server"), (DOCKER_REGISTRY, "docker-registry")):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} (apt-get install {package})")
    for tool, package in (("ssh", "openssh-client"), ("ssh-keygen", "openssh-client"), ("skopeo", "skopeo"),
                          ("ip", "iproute2"), ("nsenter", "util-linux"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install {package})")
    if not (CGROUP_ROOT / "cgroup.procs").exists() and not any(CGROUP_ROOT.glob("*/cgroup.procs")):
        missing.append("a cgroup filesystem at /sys/fs/cgroup")
    return missing


def inventory_supported() -> bool:
    """Whether this skiff takes ``-i INVENTORY --on PATTERN`` (``controller.inventory`` exists)."""
    import importlib.util

    return importlib.util.find_spec("controller.inventory") is not None


def _run(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{shlex.join(cmd)}: no exit within {timeout:g}s") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _ns(pid: int | str, kind: str) -> str | None:
    """``/proc/PID/ns/KIND``'s target (``mnt:[4026531841]``), None for a gone process."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids_in(namespaces: set[str]) -> set[int]:
    """Live processes whose mount or network namespace is one of ``namespaces``."""
    found = set()
    for entry in os.listdir("/proc"):
        in_lab = entry.isdigit() and (_ns(entry, "mnt") in namespaces or _ns(entry, "net") in namespaces)
        if in_lab and _alive(int(entry)):
            found.add(int(entry))
    return found


def _wait_port(address: str, port: int, until: float) -> bool:
    while time.monotonic() < until:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _unix_ready(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(path))
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGCONT, SIGTERM, then SIGKILL after ``timeout``; reaped either way."""
    if proc is None:
        return
    if proc.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(10)


def _free_subnet() -> str:
    """``10.A.B`` for a /24 in 10.200-250.x.0 that no address or route here overlaps."""
    used = []
    for line in _run("ip", "-4", "-o", "addr", "show").stdout.splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _run("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        words = [w for w in line.split() if w not in ("unicast", "local", "broadcast", "multicast")]
        try:
            used.append(ipaddress.ip_network(words[0], strict=False))
        except (IndexError, ValueError):  # "default", "unreachable ..."
            continue
    for _ in range(200):
        a, b = 200 + secrets.randbelow(51), secrets.randbelow(256)
        net = ipaddress.ip_network(f"10.{a}.{b}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return f"10.{a}.{b}"
    raise LabError("no free /24 in 10.200.0.0-10.250.255.0")


class LabHost:
    """One host of a :class:`Lab`; see the module docstring."""

    def __init__(self, lab: Lab, index: int, address: str, *, agent: bool) -> None:
        self.lab = lab
        self.index = index
        self.name = f"host{index}"
        self.address = address
        self.netns = f"{lab.prefix}-{index}"
        self.veth = f"skv-{lab.run_id}-{index}"
        self.cgroup_parent = f"/{lab.prefix}-{index}"
        self.dir = lab.workdir / self.name
        self.wants_agent = agent
        self.keeper: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.sshd: subprocess.Popen[bytes] | None = None
        #: this host's mount and network namespaces (``mnt:[…]``, ``net:[…]``), once the keeper is up
        self.namespaces: set[str] = set()
        #: every process the lab started for this host (all reaped by teardown)
        self.processes: list[subprocess.Popen[bytes]] = []
        #: what set-up made ("netns", "veth"): teardown removes nothing by name that it did not make
        self.created: set[str] = set()

    def __repr__(self) -> str:
        return f"<LabHost {self.name} {self.address} agent={self.agent_pid}>"

    # -- names ---------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"tcp://{self.address}:{AGENT_PORT}"

    @property
    def ssh_url(self) -> str:
        return f"ssh://root@{self.address}:22"

    @property
    def unix_url(self) -> str:
        """The agent's socket as the root side reaches it (through the bind source)."""
        return f"unix://{self.private('/run/skiff/skiffd.sock')}"

    @property
    def labels(self) -> tuple[str, ...]:
        """What fan-out output may call this host: its inventory name or one of its URLs."""
        return (self.name, self.grpc_url, self.ssh_url)

    def private(self, path: str) -> Path:
        """The root-side path of ``path`` inside one of the host's private directories."""
        for top in PRIVATE_DIRS:
            if path == top or path.startswith(top + "/"):
                return self.dir / top.strip("/").replace("/", "-") / path[len(top):].lstrip("/")
        raise ValueError(f"{path} is not under one of {self.name}'s private directories {PRIVATE_DIRS}")

    # -- processes in the host -------------------------------------------------
    def _enter(self) -> list[str]:
        if self.keeper is None or self.keeper.poll() is not None:
            raise LabError(f"{self.name}: its namespaces are gone (keeper not running)")
        return ["nsenter", "-t", str(self.keeper.pid), "-m", "-n", "-u", "--"]

    def run(self, *cmd: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``cmd`` inside this host's namespaces (not checked: look at ``returncode``)."""
        return subprocess.run([*self._enter(), *cmd], check=False, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def _popen(self, log: Path, *cmd: str) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen([*self._enter(), *cmd], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    # -- set-up ------------------------------------------------------------------
    def _create_network(self) -> None:
        ns = self.netns
        _run("ip", "netns", "add", ns)
        self.created.add("netns")
        _run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.created.add("veth")
        _run("ip", "link", "set", self.veth, "master", self.lab.bridge, "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _start_keeper(self, timeout: float = 10.0) -> None:
        for top in PRIVATE_DIRS:
            self.private(top).mkdir(parents=True, exist_ok=True)
        self.private("/root/.ssh").chmod(0o700)
        bashrc = self.dir / "bashrc"
        bashrc.write_text("# the fleet lab's root ~/.bashrc: nothing\n")
        ready = self.dir / "keeper.ready"
        ready.unlink(missing_ok=True)
        lines = ["set -e", f"hostname {self.name}"]
        for top in PRIVATE_DIRS:
            mode = "0700" if top == "/root/.ssh" else "0755"
            lines += [f"mkdir -p -m {mode} {top}", f"mount --bind {shlex.quote(str(self.private(top)))} {top}"]
        lines.append(f"if [ -f /root/.bashrc ]; then mount --bind {shlex.quote(str(bashrc))} /root/.bashrc; fi")
        lines.append(f": > {shlex.quote(str(ready))}")
        lines.append("exec sleep infinity")
        with open(self.dir / "keeper.log", "ab") as log:
            self.keeper = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--mount", "--uts",
                 "--propagation", "private", "--", "sh", "-c", "\n".join(lines)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(self.keeper)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.keeper.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"{self.name}: keeper did not set up its namespaces: {_log_tail(self.dir / 'keeper.log')}")
            time.sleep(0.01)
        mnt, net = _ns(self.keeper.pid, "mnt"), _ns(self.keeper.pid, "net")
        # never let a host's "namespaces" be this machine's own: teardown kills what is in them
        if not mnt or not net or mnt == _ns("self", "mnt") or net == _ns("self", "net"):
            raise LabError(f"{self.name}: keeper {self.keeper.pid} is not in namespaces of its own ({mnt}, {net})")
        self.namespaces = {mnt, net}

    def _write_files(self, client_pub: str) -> None:
        self.private(MARKER).write_text(self.name + "\n")
        keys = self.private("/root/.ssh/authorized_keys")
        keys.write_text(client_pub)
        keys.chmod(0o600)
        (self.dir / "sshd_config").write_text("\n".join([
            f"ListenAddress {self.address}:22",
            f"HostKey {self.dir / 'ssh_host_ed25519_key'}",
            "PidFile /run/sshd/sshd.pid",
            "AuthorizedKeysFile /root/.ssh/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "AllowStreamLocalForwarding yes",
            "AllowTcpForwarding yes",
            "UsePAM no",
            "MaxStartups 200",
            "MaxSessions 100",
            "PrintMotd no",
            "Subsystem sftp /usr/lib/openssh/sftp-server",
            "LogLevel VERBOSE",
            "",
        ]))

    @property
    def agent_cert_dir(self) -> Path:
        """This host's agent certificate (``skiff ca agent-cert ADDR``): ca.pem, cert.pem, key.pem."""
        return self.lab.ca_dir / "agents" / self.address

    def write_agent_config(self) -> None:
        """``/etc/skiff/daemon.toml`` and ``/etc/skiff/tls/`` as the lab's agents use them."""
        assert self.lab.registry is not None, "the lab registry is not running"
        tls = self.private("/etc/skiff/tls")
        tls.mkdir(mode=0o700, exist_ok=True)
        for name in ("ca.pem", "cert.pem", "key.pem"):
            shutil.copy2(self.agent_cert_dir / name, tls / name)
        self.private("/etc/skiff/daemon.toml").write_text("\n".join([
            f"# fleet lab {self.lab.run_id}: {self.name}",
            f'hosts = ["unix:///run/skiff/skiffd.sock", "{self.grpc_url}"]',
            "tlsverify = true",
            'tlscacert = "/etc/skiff/tls/ca.pem"',
            'tlscert = "/etc/skiff/tls/cert.pem"',
            'tlskey = "/etc/skiff/tls/key.pem"',
            f'cgroup-parent = "{self.cgroup_parent}"',
            f'insecure-registries = ["{self.lab.registry.host}"]',
            "",
        ]))

    # -- sshd ---------------------------------------------------------------------
    def start_sshd(self, timeout: float = 15.0) -> None:
        if self.sshd is not None and self.sshd.poll() is None:
            return
        self.sshd = self._popen(self.dir / "sshd.out", SSHD, "-D", "-f", str(self.dir / "sshd_config"),
                                "-E", str(self.dir / "sshd.log"))
        if not _wait_port(self.address, 22, time.monotonic() + timeout) or self.sshd.poll() is not None:
            raise LabError(f"{self.name}: sshd not listening on {self.address}:22: "
                           f"{_log_tail(self.dir / 'sshd.log')}{_log_tail(self.dir / 'sshd.out')}")

    def stop_sshd(self) -> None:
        _stop_process(self.sshd)

    # -- the agent ----------------------------------------------------------------
    @property
    def agent_pid(self) -> int | None:
        return self.agent.pid if self.agent is not None and self.agent.poll() is None else None

    @property
    def agent_log(self) -> Path:
        return self.dir / "skiffd.log"

    def start_agent(self, timeout: float = 30.0) -> None:
        """Start skiffd (if not running; writing its configuration first if the host has none)
        and wait until both its listeners answer."""
        if self.agent_pid is not None:
            return
        if not self.private("/etc/skiff/daemon.toml").exists():
            self.write_agent_config()
        self.agent = self._popen(self.agent_log, str(BIN / "skiffd"), "--log-format", "json")
        socket_path = self.private("/run/skiff/skiffd.sock")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise LabError(f"{self.name}: skiffd exited {self.agent.returncode}: {_log_tail(self.agent_log)}")
            if _unix_ready(socket_path) and _wait_port(self.address, AGENT_PORT, time.monotonic() + 0.2):
                return
            time.sleep(0.05)
        raise LabError(f"{self.name}: skiffd did not answer within {timeout:g}s: {_log_tail(self.agent_log)}")

    def stop_agent(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (after SIGCONT); containers keep running (live-restore).  Its exit status."""
        _stop_process(self.agent, timeout)
        return self.agent.returncode if self.agent is not None else None

    def kill_agent(self) -> None:
        """kill -9; containers keep running."""
        if self.agent is not None and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait(10)

    def freeze_agent(self) -> None:
        if self.agent_pid is None:
            raise LabError(f"{self.name}: no agent to freeze")
        os.kill(self.agent_pid, signal.SIGSTOP)

    def thaw_agent(self) -> None:
        if self.agent_pid is not None:
            os.kill(self.agent_pid, signal.SIGCONT)

    def remove_containers(self, timeout: float = 60.0) -> None:
        """``rm -f`` every container through whatever agent answers on the host's unix socket
        (the lab's, thawed first, or one a test started there)."""
        self.thaw_agent()
        if not _unix_ready(self.private("/run/skiff/skiffd.sock")):
            return
        listed = self.lab.skiff("-H", self.unix_url, "ps", "-aq", "--no-trunc", cert=None, timeout=timeout)
        if listed.code != 0:
            raise LabError(f"{self.name}: skiff ps -aq failed ({listed.code}): {listed.err.strip()}")
        if ids := listed.out.split():
            removed = self.lab.skiff("-H", self.unix_url, "rm", "-f", *ids, cert=None, timeout=timeout)
            if removed.code != 0:
                raise LabError(f"{self.name}: skiff rm -f failed ({removed.code}): {removed.err.strip()}")

    # -- teardown ---------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Remove every trace of this host, each step whatever the others did; what failed."""
        errors: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - teardown goes on and reports
                errors.append(f"{self.name}: {what}: {exc}")

        if self.keeper is not None:  # else nothing ever ran in this host
            step("remove containers", self.remove_containers)
            step("stop skiffd", self.stop_agent)
            step("stop sshd", self.stop_sshd)
            # shims first (so none restarts a container), then what is left in the containers' cgroups
            step("kill what is left in its namespaces", self._kill_namespace_processes)
            step("remove cgroups", self._destroy_cgroups)
            step("stop keeper", lambda: _stop_process(self.keeper, 5))
            step("release its namespaces", self._check_namespaces_released)
        if "netns" in self.created:
            step("delete netns", lambda: _run("ip", "netns", "del", self.netns))
        if "veth" in self.created:
            step("delete veth", self._delete_veth)
        return errors

    def _delete_veth(self, timeout: float = 5.0) -> None:
        """The veth goes with its netns, in the kernel's own time: delete it if still there, then wait."""
        link = Path(f"/sys/class/net/{self.veth}")
        deadline = time.monotonic() + timeout
        while link.exists():
            _run("ip", "link", "del", self.veth, check=False)
            if time.monotonic() > deadline:
                raise LabError(f"{self.veth} still exists after {timeout:g}s")
            time.sleep(0.02)

    def _destroy_cgroups(self) -> None:
        from agent.runtime.cgroups import detect

        detect().destroy(self.cgroup_parent, kill=True, timeout=10)

    def _check_namespaces_released(self) -> None:
        """No process left in the host's mount namespace: it is gone, and the overlays with it."""
        if self.namespaces and (left := _pids_in(self.namespaces)):
            raise LabError(f"processes {sorted(left)} still hold {sorted(self.namespaces)}")

    def _kill_namespace_processes(self, timeout: float = 10.0) -> None:
        if not self.namespaces:
            return
        keeper = self.keeper.pid if self.keeper is not None else -1
        deadline = time.monotonic() + timeout
        while left := _pids_in(self.namespaces) - {keeper}:
            if time.monotonic() > deadline:
                raise LabError(f"processes {sorted(left)} survive SIGKILL")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)


class Lab:
    """N hosts behind one bridge; see the module docstring."""

    def __init__(self, n: int, workdir: str | os.PathLike[str], *, agents: bool | Sequence[bool] = True) -> None:
        if not 1 <= n <= 250:
            raise ValueError(f"a lab has 1 to 250 hosts, not {n}")
        wants = [agents] * n if isinstance(agents, bool) else list(agents)
        if len(wants) != n:
            raise ValueError(f"agents: {len(wants)} flags for {n} hosts")
        self.run_id = secrets.token_hex(3)
        self.prefix = f"skiff-lab-{self.run_id}"
        self.bridge = f"skbr-{self.run_id}"
        self.workdir = Path(workdir) / self.prefix
        self.ca_dir = self.workdir / "ca"
        self.admin = self.ca_dir / "clients" / "admin"
        self.viewer = self.ca_dir / "clients" / "viewer"
        self.ssh_key = self.workdir / "ssh" / "id_ed25519"
        self.known_hosts = self.workdir / "ssh" / "known_hosts"
        self.subnet = ""
        self.hosts: list[LabHost] = []
        self._wants = wants
        self.registry: Registry | None = None
        self.setup_seconds = 0.0
        self.teardown_seconds = 0.0
        self.teardown_errors: list[str] = []
        self._started = False
        self._bridge_created = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} {self.subnet}.0/24 hosts={len(self.hosts)}>"

    @property
    def bridge_address(self) -> str:
        return f"{self.subnet}.1"

    # -- start ---------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        errors = self.close()
        if errors and exc_type is None:
            raise LabError("lab teardown failed:\n" + "\n".join(errors))

    def start(self) -> Self:
        if self._started:
            raise LabError(f"{self.prefix} was started already")
        self._started = True
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - began
        return self

    def _start(self) -> None:
        missing = missing_requirements()
        if missing:
            raise LabError("the fleet lab needs " + "; ".join(missing))
        (self.workdir / "ssh").mkdir(parents=True)
        self.subnet = _free_subnet()
        self.hosts = [LabHost(self, i + 1, f"{self.subnet}.{i + 2}", agent=want) for i, want in enumerate(self._wants)]
        for host in self.hosts:
            host.dir.mkdir()
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._bridge_created = True
        _run("ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        pool = ThreadPoolExecutor(max_workers=len(self.hosts) + 4)
        try:
            jobs = [pool.submit(self._make_ca), pool.submit(self._make_ssh_keys), pool.submit(self._start_registry)]
            jobs += [pool.submit(self._make_namespaces, h) for h in self.hosts]
            _gather(jobs)
            self._write_inventories()
            client_pub = self.ssh_key.with_suffix(".pub").read_text()
            _gather([pool.submit(self._start_host, h, client_pub) for h in self.hosts])
        finally:  # on a failure or ^C: what has not begun never will, what runs ends before teardown
            pool.shutdown(wait=True, cancel_futures=True)

    def _make_ca(self) -> None:
        self.ok("ca", "init", "--dir", str(self.ca_dir), cert=None)
        with ThreadPoolExecutor(max_workers=3) as pool:
            _gather([
                pool.submit(self.ok, "ca", "agent-cert", *(h.address for h in self.hosts), "--dir", str(self.ca_dir),
                            cert=None),
                pool.submit(self.ok, "ca", "client-cert", "admin", "--role", "admin", "--dir", str(self.ca_dir),
                            cert=None),
                pool.submit(self.ok, "ca", "client-cert", "viewer", "--role", "viewer", "--dir", str(self.ca_dir),
                            cert=None),
            ])

    def _make_ssh_keys(self) -> None:
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.prefix} client", "-f", str(self.ssh_key))
        lines = []
        for host in self.hosts:
            key = host.dir / "ssh_host_ed25519_key"
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{host.name}", "-f", str(key))
            kind, blob = key.with_suffix(".pub").read_text().split()[:2]
            lines.append(f"{host.address} {kind} {blob}\n")
        self.known_hosts.write_text("".join(lines))

    def _start_registry(self) -> None:
        layout = self.workdir / "oci"
        ociimage.build_busybox(layout)
        self.registry = Registry(self.workdir / "registry", address=self.bridge_address)
        self.registry.start()
        self.registry.push(layout, ociimage.TAG_BUSYBOX, "busybox:1")

    def _make_namespaces(self, host: LabHost) -> None:
        host._create_network()
        host._start_keeper()

    def _start_host(self, host: LabHost, client_pub: str) -> None:
        host._write_files(client_pub)
        host.start_sshd()
        if host.wants_agent:
            host.start_agent()

    def _write_inventories(self) -> None:
        for transport in ("grpc", "ssh"):
            lines = [f"# skiff fleet lab {self.run_id}: {len(self.hosts)} hosts on {self.bridge} ({self.subnet}.0/24)"]
            for group, members in (("lab", self.hosts), ("agents", [h for h in self.hosts if h.wants_agent]),
                                   ("bare", [h for h in self.hosts if not h.wants_agent])):
                lines.append(f"\n[{group}]")
                for h in members:
                    fields = [h.name, f"ansible_host={h.address}", "ansible_user=root",
                              f"ansible_ssh_private_key_file={self.ssh_key}", f"skiff_port={AGENT_PORT}",
                              f"ansible_ssh_common_args='-o UserKnownHostsFile={self.known_hosts}'"]
                    if transport == "ssh":
                        fields.append("skiff_transport=ssh")
                    lines.append(" ".join(fields))
            self.inventory(transport).write_text("\n".join(lines) + "\n")

    # -- use ---------------------------------------------------------------------------
    def inventory(self, transport: Transport = "grpc") -> Path:
        return self.workdir / ("inventory.ini" if transport == "grpc" else "inventory-ssh.ini")

    def registry_ref(self, name: str) -> str:
        assert self.registry is not None, "the lab is not started"
        return self.registry.ref(name)

    def target_args(self, transport: Transport = "grpc", hosts: Sequence[LabHost] | None = None, *,
                    via_inventory: bool | None = None) -> list[str]:
        """The CLI's target flags for ``hosts`` (default: every host with an agent): ``-i INVENTORY --on
        PATTERN`` when ``via_inventory`` (default: when the CLI has inventories), else ``-H URL`` each;
        for ``ssh`` also ``--known-hosts`` (and ``--ssh-key`` with ``-H``)."""
        chosen = [h for h in self.hosts if h.wants_agent] if hosts is None else list(hosts)
        ssh = ["--known-hosts", str(self.known_hosts)] if transport == "ssh" else []
        if via_inventory if via_inventory is not None else inventory_supported():
            pattern = "lab" if chosen == self.hosts else ":".join(h.name for h in chosen)
            return ["-i", str(self.inventory(transport)), "--on", pattern, *ssh]
        if ssh:
            ssh += ["--ssh-key", str(self.ssh_key)]
        return [arg for h in chosen for arg in ("-H", h.grpc_url if transport == "grpc" else h.ssh_url)] + ssh

    def skiff(self, *args: str, cert: str | Path | None = "admin", env: dict[str, str] | None = None,
              timeout: float = 120, input: str | None = None) -> Result:
        """The real ``skiff`` on the root side (no ``$SKIFF_*`` from this environment), with
        ``$SKIFF_CERT_PATH`` set to ``cert``: ``"admin"``, ``"viewer"`` or a directory."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SKIFF_") or k == "SKIFF_CLIENT_DIR"}
        if cert is not None:
            named = {"admin": self.admin, "viewer": self.viewer}
            base["SKIFF_CERT_PATH"] = str(named[cert] if isinstance(cert, str) and cert in named else cert)
        proc = subprocess.run([str(BIN / "skiff"), *args], check=False, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              env={**base, **(env or {})})
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, cert: str | Path | None = "admin", timeout: float = 120) -> str:
        result = self.skiff(*args, cert=cert, timeout=timeout)
        if result.code != 0:
            raise LabError(f"skiff {shlex.join(args)} exited {result.code}: {result.err.strip()}")
        return result.out

    def ssh(self, host: LabHost, *cmd: str, known_hosts: Path | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """OpenSSH's client as root@host with the lab key, strict host key checking."""
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(self.ssh_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
             "-o", "ConnectTimeout=5", f"root@{host.address}", *cmd],
            check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def restore(self) -> None:
        """Back to how the lab started: every host meant to have an agent has a running, thawed one,
        and no host has containers (all hosts at once)."""
        def one(host: LabHost) -> None:
            if host.wants_agent:
                host.thaw_agent()
                host.start_agent()
            host.remove_containers()

        with ThreadPoolExecutor(max_workers=len(self.hosts) or 1) as pool:
            _gather([pool.submit(one, h) for h in self.hosts])

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Remove everything (idempotent); what failed, also kept in ``teardown_errors``."""
        if self._closed:
            return self.teardown_errors
        self._closed = True
        began = time.monotonic()
        errors: list[str] = []
        if self.hosts:
            with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
                for found in pool.map(LabHost.teardown, self.hosts):
                    errors += found
        if self._bridge_created:
            try:
                _run("ip", "link", "del", self.bridge)
            except LabError as exc:
                errors.append(str(exc))
        if self.registry is not None:
            try:
                self.registry.stop()
            except Exception as exc:  # noqa: BLE001 - teardown goes on and reports
                errors.append(f"registry: {exc}")
        self.teardown_seconds = time.monotonic() - began
        self.teardown_errors = errors
        return errors

    def leftovers(self) -> list[str]:
        """What of this lab is still on the machine: netns, links, cgroups, processes, mounts."""
        found = [f"netns {line.split()[0]}" for line in _run("ip", "netns", "list").stdout.splitlines()
                 if line.startswith(self.prefix + "-")]
        found += [f"link {line.split(':')[1].strip()}" for line in _run("ip", "-o", "link").stdout.splitlines()
                  if self.run_id in line.split(":")[1]]
        tops = [CGROUP_ROOT, *(p for p in CGROUP_ROOT.iterdir() if p.is_dir())] if CGROUP_ROOT.exists() else []
        found += [f"cgroup {d}" for top in tops for d in top.glob(f"{self.prefix}-*")]
        namespaces = set().union(*(h.namespaces for h in self.hosts)) if self.hosts else set()
        started = {p.pid for h in self.hosts for p in h.processes if p.returncode is None}  # not reaped yet
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or not _alive(int(entry)) or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if (int(entry) in started or _ns(entry, "mnt") in namespaces or _ns(entry, "net") in namespaces
                    or str(self.workdir) in cmdline):
                found.append(f"process {entry}: {cmdline.strip()[:200]}")
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            found += [f"mount {t}" for t in (line.split()[4] for line in f)
                      if t.startswith((f"{self.workdir}/", f"/run/netns/{self.prefix}-"))]
        return found


def _gather(jobs: Sequence[Future[Any]]) -> None:
    """Wait for every job; raise the first failure once all have ended."""
    wait(jobs)
    for job in jobs:
        job.result()
