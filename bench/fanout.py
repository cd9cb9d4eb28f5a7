"""Fan-out benchmark: ``skiff ps`` on N hosts over gRPC+mTLS and over SSH, beside ansible, pssh
and a bare asyncssh floor, on the same loopback "hosts", in the same run.

    .venv/bin/python bench/fanout.py [--n 50,200] [--runs 5] [--ansible-runs 3]
                                     [--only grpc,grpc-floor,ssh,ansible,pssh,asyncssh] [--keep]

The hosts (everything under one tmp dir; the system sshd, /root and /run are untouched):

* addresses 127.0.0.2 … 127.0.0.(max N + 1), each one "host", all on loopback;
* gRPC: ``--agents`` (default 2, one per core) ``skiffd`` processes, each with its own
  --data-root/--exec-root and ``--cgroup-parent /skiff-bench-fanout-PID-K``, listening on its
  unix socket and on ``tcp://127.0.0.X:2376`` for every X with X % agents == K (so every N
  spreads over all agents), mutual TLS from ``skiff ca init``, one ``skiff ca agent-cert`` with
  every address as a SAN, and ``skiff ca client-cert bench --role admin`` for the controller
  ($SKIFF_CERT_PATH);
* SSH: one ``/usr/sbin/sshd -D`` per 16 addresses (OpenSSH listens on at most 16 sockets), port
  2222, each in its own private mount namespace (``unshare --mount``, /run and /var/log bound to
  the tmp dir: privsep dir and wtmp/lastlog stay private), MaxStartups 1000:30:2000 (the default
  10:30:100 drops connections at N=200), UsePAM no, root login with a bench ed25519 key,
  AllowStreamLocalForwarding yes, and ``SetEnv SHLVL=1`` so root's bash skips this box's
  ~/.bashrc (pyenv init, ~1 s per command).  known_hosts holds the host key for every
  ``[127.0.0.X]:2222``; "host" X's agent socket (the path in the ssh:// URL) is that of skiffd
  number X % agents.

What runs, per N (each case 1 warm-up + R runs, round-robin so drift hits every tool alike;
ansible fewer runs: 15–35 s each at N=200):

* ``skiff-grpc -i``: ``skiff -i grpc.N.ini --on all --forks N ps`` (INI inventory: ansible_host,
  skiff_port; skiff caches the parsed inventory under $XDG_CACHE_HOME, warmed by the warm-up);
* ``skiff-grpc -H``: ``skiff --forks N -H tcp://127.0.0.2:2376 … ps``;
* ``skiff-ssh -H``: ``skiff --known-hosts KH --ssh-key KEY --forks N -H ssh://root@127.0.0.X:2222/SOCK … ps``;
* ``skiff-ssh -i``: ``skiff --known-hosts KH -i ssh.N.ini --on all --forks N ps`` (skiff_transport=ssh,
  skiff_socket, ansible_user/port/key: the same file ansible reads);
* ``grpc.aio mTLS floor``: this file as ``fanout.py grpc-floor``: one mTLS channel per host (the
  same client certificate), one health check on each, at once, then ``os._exit`` as skiff does:
  the least a gRPC+mTLS fan-out costs here, and what skiff-grpc's controller CPU is measured against;
* ``asyncssh floor``: this file as ``fanout.py asyncssh-floor``: connect to every host, run ``true``
  on each, close; as the anchor's asyncssh_fanout.py, the key is read once and known_hosts is given
  as a path, which asyncssh parses again for every connection (so does skiff: ~1.4 ms per
  connection with this 200-line file);
* ``pssh``: ``parallel-ssh -h HOSTS -p N -t 120 -x "-F SSHCFG" true``;
* ``ansible``: ``ansible all -i ssh.N.ini -m command -a true -f N`` (gathering explicit, pipelining,
  ControlMaster=no: every run pays TCP + kex + auth per host, as skiff does).

``--forks N`` makes skiff as parallel as ``ansible -f N`` and ``pssh -p N`` (skiff's default is 50;
``--skiff-forks default`` keeps it).  Every client runs with HOME, XDG_CACHE_HOME and ANSIBLE_HOME
under the tmp dir and a minimal environment.

Measured per run (whole process, spawn to reap): wall; controller CPU and peak RSS from os.wait4's
rusage (user+sys of the process and every descendant it reaped: ansible's forks and ssh children,
pssh's ssh children; peak RSS is the largest single process of that tree); hosts that ended OK
(parsed from each tool's output) and the exit code; server CPU (sshd masters with their reaped
connection children, and the skiffd agents, from /proc); and the rest of the machine's busy CPU
("other": other people's work on this shared box, a noise indicator).  Printed: a markdown table,
the ratios (skiff-grpc vs 1.0 s at N=200; skiff-ssh / asyncssh floor <= 1.2; skiff vs ansible and
pssh; controller CPU per host <= 2 ms), and JSON lines appended to ``--results``.

Every server is stopped by its PID and the agents' cgroups removed at the end, also on Ctrl-C,
SIGTERM or an exception; ``--keep`` leaves them running (and the tmp dir) for debugging and prints
how to stop them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SSHD = "/usr/sbin/sshd"
#: OpenSSH's MAX_LISTEN_SOCKS: ListenAddress lines one sshd takes
PER_SSHD = 16
GRPC_TARGET_S = 1.0  # skiff-grpc wall at N=200
FLOOR_TARGET = 1.2  # skiff-ssh / asyncssh floor
CPU_TARGET_MS = 2.0  # controller CPU per host
#: skiff's inventory cache skips files younger than this (controller.inventory.SETTLE_SECONDS)
INVENTORY_SETTLE_S = 2.1
SKIFF_SUMMARY = re.compile(r"(\d+) OK, (\d+) FAILED, (\d+) UNREACHABLE, (\d+) TIMEOUT")
CASE_KEYS = ("grpc-i", "grpc-H", "grpc-floor", "ssh-H", "ssh-i", "asyncssh", "pssh", "ansible")
ALIASES = {"grpc": ("grpc-i", "grpc-H", "grpc-floor"), "ssh": ("ssh-H", "ssh-i"), "all": CASE_KEYS}


# -- the asyncssh floor: run as `fanout.py asyncssh-floor`, a separate process -----------------------


def asyncssh_floor(argv: Sequence[str]) -> int:
    """Connect to every host of HOSTS (``ip:port`` lines), run ``true``, close; one JSON line."""
    import asyncio

    import asyncssh

    parser = argparse.ArgumentParser(prog="fanout.py asyncssh-floor")
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--known-hosts", required=True)
    parser.add_argument("--user", default="root")
    args = parser.parse_args(argv)
    hosts = [line.rsplit(":", 1) for line in Path(args.hosts).read_text().split()]

    async def one(host: str, port: int, key: asyncssh.SSHKey) -> bool:
        async with asyncssh.connect(host, port=port, username=args.user, client_keys=[key],
                                    known_hosts=args.known_hosts, config=[], agent_path=None) as conn:
            result = await conn.run("true", check=False)
            return result.exit_status == 0

    async def main() -> int:
        key = asyncssh.read_private_key(args.key)
        results = await asyncio.gather(*(one(h, int(p), key) for h, p in hosts), return_exceptions=True)
        ok = sum(1 for r in results if r is True)
        errors = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
        print(json.dumps({"ok": ok, "n": len(hosts), "errors": len(errors), "error_sample": errors[:3]}))
        return 0 if ok == len(hosts) else 1

    return asyncio.run(main())


def grpc_floor(argv: Sequence[str]) -> int:
    """Open one mTLS channel to every ``tcp://`` agent of HOSTS (``ip:port`` lines) at once, make one
    health check on each, close; one JSON line.  The least any gRPC+mTLS fan-out pays: skiff's own
    controller CPU is reported against it."""
    import asyncio

    import grpc

    parser = argparse.ArgumentParser(prog="fanout.py grpc-floor")
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--certs", required=True, help="directory with ca.pem, cert.pem, key.pem")
    args = parser.parse_args(argv)
    hosts = Path(args.hosts).read_text().split()
    certs = Path(args.certs)
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), (certs / "key.pem").read_bytes(),
                                         (certs / "cert.pem").read_bytes())

    async def one(address: str) -> bool:
        async with grpc.aio.secure_channel(address, creds) as channel:
            await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=30)
            return True

    async def main() -> int:
        results = await asyncio.gather(*(one(h) for h in hosts), return_exceptions=True)
        ok = sum(1 for r in results if r is True)
        errors = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
        print(json.dumps({"ok": ok, "n": len(hosts), "errors": len(errors), "error_sample": errors[:3]}), flush=True)
        return 0 if ok == len(hosts) else 1

    code = asyncio.run(main())
    os._exit(code)  # as skiff does: no grpc teardown at exit


# -- /proc helpers ----------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """user+sys seconds of a process and of the children it reaped (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (all but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def port_free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def banner(ip: str, port: int, timeout: float = 1.0) -> bytes:
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            return s.recv(64)
    except OSError:
        return b""


def sh(argv: Sequence[str], **kw: Any) -> str:
    proc = subprocess.run(list(argv), check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}… exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return proc.stdout


# -- the fleet: agents, sshd, keys, inventories -----------------------------------------------------


class Fleet:
    """Every server and file the benchmark makes, so one ``close()`` takes it all down."""

    def __init__(self, work: Path, nhosts: int, agents: int, grpc_port: int, ssh_port: int) -> None:
        self.work = work
        self.ips = [f"127.0.0.{i}" for i in range(2, nhosts + 2)]
        self.nagents = agents
        self.grpc_port = grpc_port
        self.ssh_port = ssh_port
        self.agents: list[Any] = []  # tests.support.agent.AgentProcess
        self.sshd: list[subprocess.Popen[bytes]] = []
        self.ssh_dir = work / "ssh"
        self.key = self.ssh_dir / "id_ed25519"
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.ssh_config = self.ssh_dir / "ssh_config"
        self.ca = work / "ca"
        self.client_certs = self.ca / "clients" / "bench"
        self.inv = work / "inv"
        self.home = work / "home"
        self.logs = work / "logs"
        self.current: subprocess.Popen[bytes] | None = None  # the timed child, killed on interrupt
        self.inventories_written = 0.0
        for d in (self.ssh_dir, self.inv, self.home, self.logs, work / "cache", work / "ansible-remote-tmp"):
            d.mkdir(parents=True, exist_ok=True)

    # where "host" X's agent is
    def agent_index(self, ip: str) -> int:
        return int(ip.rsplit(".", 1)[1]) % self.nagents

    def agent_socket(self, ip: str) -> Path:
        return self.work / "agents" / f"a{self.agent_index(ip)}" / "run" / "skiffd.sock"

    def check_ports(self) -> None:
        taken = [f"{ip}:{port}" for ip in self.ips for port in (self.grpc_port, self.ssh_port)
                 if not port_free(ip, port)]
        if taken:
            raise RuntimeError(f"addresses in use (someone else's server?): {', '.join(taken[:8])}"
                               f"{' …' if len(taken) > 8 else ''}; try --grpc-port/--ssh-port")

    def make_keys(self) -> None:
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "skiff-bench-fanout", "-f", str(self.key)])
        hostkey = self.ssh_dir / "ssh_host_ed25519_key"
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "skiff-bench-fanout-host", "-f", str(hostkey)])
        shutil.copy(f"{self.key}.pub", self.ssh_dir / "authorized_keys")
        (self.ssh_dir / "authorized_keys").chmod(0o600)
        pub = " ".join(Path(f"{hostkey}.pub").read_text().split()[:2])
        self.known_hosts.write_text("".join(f"[{ip}]:{self.ssh_port} {pub}\n" for ip in self.ips))
        self.ssh_config.write_text(
            "Host 127.0.0.*\n"
            f"  Port {self.ssh_port}\n  User root\n  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n")

    def make_ca(self) -> None:
        skiff = str(BIN / "skiff")
        sh([skiff, "ca", "init", "--dir", str(self.ca)])
        sans = [arg for ip in self.ips for arg in ("--san", ip)]
        sh([skiff, "ca", "agent-cert", "bench-agent", *sans, "--dir", str(self.ca)])
        sh([skiff, "ca", "client-cert", "bench", "--role", "admin", "--dir", str(self.ca)])

    def write_inventories(self, ns: Sequence[int]) -> None:
        for n in ns:
            ips = self.ips[:n]
            grpc = ["[fleet]", *(f"h{ip.rsplit('.', 1)[1]} ansible_host={ip} skiff_port={self.grpc_port}"
                                  for ip in ips)]
            (self.inv / f"grpc.{n}.ini").write_text("\n".join(grpc) + "\n")
            ssh = ["[fleet]", *(f"{ip} skiff_socket={self.agent_socket(ip)}" for ip in ips), "",
                   "[fleet:vars]", f"ansible_port={self.ssh_port}", "ansible_user=root",
                   f"ansible_ssh_private_key_file={self.key}", "ansible_python_interpreter=/usr/bin/python3",
                   "skiff_transport=ssh"]
            (self.inv / f"ssh.{n}.ini").write_text("\n".join(ssh) + "\n")
            (self.inv / f"pssh.{n}").write_text("".join(f"{ip}:{self.ssh_port} root\n" for ip in ips))
            (self.inv / f"grpc-floor.{n}").write_text("".join(f"{ip}:{self.grpc_port}\n" for ip in ips))
            (self.inv / f"floor.{n}").write_text("".join(f"{ip}:{self.ssh_port}\n" for ip in ips))
        (self.work / "ansible.cfg").write_text(
            "[defaults]\ngathering = explicit\nhost_key_checking = True\ninterpreter_python = /usr/bin/python3\n"
            f"remote_tmp = {self.work}/ansible-remote-tmp\nlocal_tmp = {self.home}/.ansible/tmp\n"
            "retry_files_enabled = False\n\n[ssh_connection]\npipelining = True\n"
            f"ssh_args = -F {self.ssh_config} -o UserKnownHostsFile={self.known_hosts} -o ControlMaster=no\n")
        self.inventories_written = time.monotonic()

    def start_agents(self) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.support.agent import AgentProcess

        tls = self.ca / "agents" / "bench-agent"
        for k in range(self.nagents):
            root = self.work / "agents" / f"a{k}"
            listen = [arg for ip in self.ips if self.agent_index(ip) == k
                      for arg in ("-H", f"tcp://{ip}:{self.grpc_port}")]
            agent = AgentProcess(root, "-H", f"unix://{root / 'run' / 'skiffd.sock'}", *listen, "--tlsverify",
                                 "--tlscacert", str(tls / "ca.pem"), "--tlscert", str(tls / "cert.pem"),
                                 "--tlskey", str(tls / "key.pem"), "--log-level", "warn")
            agent.cgroup_parent = f"/skiff-bench-fanout-{os.getpid()}-{k}"
            self.agents.append(agent)
            self._spawn_agent(agent)
        for agent in self.agents:
            self._wait_agent(agent)

    @staticmethod
    def _spawn_agent(agent: Any) -> None:
        """AgentProcess.start's command, but in a session of its own: a Ctrl-C at the terminal reaches
        only this script, which stops the agents itself (AgentProcess.stop: containers, cgroup, mounts)."""
        agent.root.mkdir(parents=True, exist_ok=True)
        (agent.root / "daemon.toml").touch()
        with open(agent.log_path, "ab") as log:
            agent.proc = subprocess.Popen(
                [str(BIN / "skiffd"), "--config-file", str(agent.root / "daemon.toml"), "--data-root",
                 str(agent.data_root), "--exec-root", str(agent.exec_root), "--log-format", "json",
                 "--cgroup-parent", agent.cgroup_parent, *agent.extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @staticmethod
    def _wait_agent(agent: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"skiffd exited with {agent.proc.returncode}: {agent.log_tail()}")
            if agent.socket.exists() and agent.cli("version").code == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"skiffd did not come up in {timeout}s: {agent.log_tail()}")

    def start_sshd(self) -> None:
        run, varlog = self.ssh_dir / "run", self.ssh_dir / "varlog"
        (run / "sshd").mkdir(parents=True, exist_ok=True)
        (run / "sshd").chmod(0o755)
        varlog.mkdir(exist_ok=True)
        for m in range(0, len(self.ips), PER_SSHD):
            ips = self.ips[m:m + PER_SSHD]
            cfg = self.ssh_dir / f"sshd_config.{m // PER_SSHD}"
            cfg.write_text(
                f"Port {self.ssh_port}\n" + "".join(f"ListenAddress {ip}\n" for ip in ips)
                + f"HostKey {self.ssh_dir / 'ssh_host_ed25519_key'}\nPidFile none\n"
                f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}\nStrictModes no\n"
                "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nUseDNS no\nPrintMotd no\nPrintLastLog no\n"
                "MaxStartups 1000:30:2000\nMaxSessions 1000\nAllowStreamLocalForwarding yes\n"
                "LogLevel INFO\nSetEnv SHLVL=1\n")
            sh([SSHD, "-t", "-f", str(cfg)])
            log = self.logs / f"sshd.{m // PER_SSHD}.log"
            # unshare execs sh, sh execs sshd: the Popen's pid is sshd's
            with open(log, "ab") as err:
                self.sshd.append(subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     f"mount --bind {run} /run && mount --bind {varlog} /var/log && exec {SSHD} -D -f {cfg} -E {log}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
        deadline = time.monotonic() + 15
        pending = list(self.ips)
        while pending:
            for proc in self.sshd:
                if proc.poll() is not None:
                    raise RuntimeError(f"sshd pid {proc.pid} exited {proc.returncode}: see {self.logs}/sshd.*.log")
            pending = [ip for ip in pending if not banner(ip, self.ssh_port).startswith(b"SSH-")]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"sshd not answering on {pending[:5]}…")
            if pending:
                time.sleep(0.1)
        for proc in self.sshd:
            exe = os.readlink(f"/proc/{proc.pid}/exe")
            if exe != SSHD:
                raise RuntimeError(f"pid {proc.pid} is {exe}, not sshd")

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.sshd] + [a.proc.pid for a in self.agents if a.proc is not None]

    def check_servers(self) -> None:
        procs = [("sshd", p) for p in self.sshd] + [("skiffd", a.proc) for a in self.agents if a.proc is not None]
        dead = [f"{name} pid {p.pid} exited {p.returncode}" for name, p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a server died: {'; '.join(dead)} (logs in {self.logs} and {self.work}/agents)")

    def server_cpu(self) -> float:
        return sum(proc_cpu(pid) for pid in self.server_pids())

    def sshd_log_problems(self) -> dict[str, int]:
        """Counts of the sshd log lines that mean a refused or dropped connection."""
        counts: dict[str, int] = {}
        patterns = {"MaxStartups drop": "drop connection", "throttling": "MaxStartups throttling",
                    "error": "error:", "fatal": "fatal:", "refused/timeout": "Timeout before authentication"}
        for log in self.logs.glob("sshd.*.log"):
            for line in log.read_text(errors="replace").splitlines():
                for name, needle in patterns.items():
                    if needle in line:
                        counts[name] = counts.get(name, 0) + 1
        return counts

    def kill_current(self) -> None:
        proc = self.current
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def close(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        self.kill_current()
        for proc in self.sshd:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sshd:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for agent in self.agents:
            try:
                agent.stop()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"clean-up: agent {agent.root}: {exc}", file=sys.stderr)

    def keep_note(self) -> str:
        pids = " ".join(str(p) for p in self.server_pids())
        cgroups = " ".join(a.cgroup_parent for a in self.agents)
        return (f"kept: {self.work}\n  stop the servers with: kill {pids}\n"
                f"  then remove cgroups (if created) {cgroups} under /sys/fs/cgroup/* and rm -rf {self.work}")


# -- cases and timing -------------------------------------------------------------------------------


@dataclass
class Case:
    key: str
    label: str
    cmd: list[str]
    env: dict[str, str]
    runs: int
    count_ok: Callable[[str], int | None]


@dataclass
class Run:
    wall: float
    cpu: float
    rss_mib: float
    code: int
    ok_hosts: int | None
    srv_cpu: float
    other_cpu: float
    log: str


@dataclass
class Result:
    case: Case
    n: int
    runs: list[Run] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    @property
    def failures(self) -> list[Run]:
        return [r for r in self.runs if r.code != 0 or r.ok_hosts != self.n]

    def record(self) -> dict[str, Any]:
        walls = [r.wall for r in self.runs]
        return {
            "kind": "case", "tool": self.case.label, "key": self.case.key, "n": self.n, "runs": len(self.runs),
            "cmd": " ".join(self.case.cmd) if len(" ".join(self.case.cmd)) < 600 else
            " ".join(self.case.cmd[:12]) + " …",
            "wall_median_s": round(self.med("wall"), 4), "wall_min_s": round(min(walls), 4),
            "wall_max_s": round(max(walls), 4), "walls_s": [round(w, 4) for w in walls],
            "ctl_cpu_median_s": round(self.med("cpu"), 4),
            "ctl_cpu_ms_per_host": round(self.med("cpu") * 1000 / self.n, 3),
            "peak_rss_mib_median": round(self.med("rss_mib"), 1),
            "srv_cpu_median_s": round(self.med("srv_cpu"), 3), "other_cpu_median_s": round(self.med("other_cpu"), 3),
            "exit_codes": [r.code for r in self.runs], "ok_hosts": [r.ok_hosts for r in self.runs],
            "failed_runs": len(self.failures),
            "failure_sample": [r.log for r in self.failures][:2],
        }


def count_skiff(text: str) -> int | None:
    found = SKIFF_SUMMARY.findall(text)
    return int(found[-1][0]) if found else None


def count_ansible(text: str) -> int | None:
    return len(re.findall(r"^\S+ \| (?:SUCCESS|CHANGED) ", text, re.MULTILINE))


def count_pssh(text: str) -> int | None:
    return len(re.findall(r"\[SUCCESS\]", text))


def count_floor(text: str) -> int | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return int(json.loads(line)["ok"])
    return None


def tail(text: str, lines: int = 6) -> str:
    """The lines that say what went wrong: skiff's per-host errors and summary, others' last lines."""
    picked = [line for line in text.splitlines()
              if re.search(r"UNREACHABLE|FAILED|TIMEOUT|ERROR|rror|Timed out|\bOK,", line)]
    return "\n".join((picked or text.splitlines())[-lines:])[-1500:]


def timed(fleet: Fleet, case: Case, n: int, index: int, timeout: float) -> Run:
    fleet.check_servers()
    log = fleet.logs / f"{case.key}.{n}.{index + 1}.out"
    srv0, busy0 = fleet.server_cpu(), machine_busy()
    with open(log, "wb") as out:
        start = time.perf_counter()
        fleet.current = proc = subprocess.Popen(case.cmd, env=case.env, cwd=fleet.work, stdin=subprocess.DEVNULL,
                                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        watchdog = threading.Timer(timeout, fleet.kill_current)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    fleet.current = None
    srv = fleet.server_cpu() - srv0
    cpu = usage.ru_utime + usage.ru_stime
    other = machine_busy() - busy0 - cpu - srv
    text = log.read_text(errors="replace")
    ok = case.count_ok(text)
    failed = code != 0 or ok != n
    return Run(wall, cpu, usage.ru_maxrss / 1024, code, ok, srv, other, tail(text) if failed else "")


def interleave(fleet: Fleet, cases: Sequence[Case], n: int, warmup: int, timeout: float) -> list[Result]:
    """Round i runs every case that still has runs to do once, starting at a different case each
    round; the warm-up rounds are untimed."""
    results = [Result(case, n) for case in cases]
    rounds = max(case.runs for case in cases)
    for i in range(-warmup, rounds):
        for k in range(len(cases)):
            j = (i + k) % len(cases)
            case = cases[j]
            if i >= case.runs:
                continue
            run = timed(fleet, case, n, i, timeout)
            status = "ok" if run.code == 0 and run.ok_hosts == n else f"FAILED exit {run.code}, {run.ok_hosts} ok"
            print(f"  N={n:<4} {'warm-up' if i < 0 else f'run {i + 1}':<8} {case.label:<18} {run.wall:7.2f} s"
                  f"  cpu {run.cpu:6.2f} s  {status}", file=sys.stderr, flush=True)
            if i >= 0:
                results[j].runs.append(run)
            elif run.log:
                print(f"    {run.log}".replace("\n", "\n    "), file=sys.stderr)
    return results


def make_cases(fleet: Fleet, n: int, keys: Sequence[str], runs: int, ansible_runs: int,
               skiff_forks: str) -> list[Case]:
    work, ips = fleet.work, fleet.ips[:n]
    env = {"PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(fleet.home),
           "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "XDG_CACHE_HOME": str(work / "cache"), "SKIFF_CERT_PATH": str(fleet.client_certs),
           "ANSIBLE_CONFIG": str(work / "ansible.cfg"), "ANSIBLE_HOME": str(fleet.home / ".ansible")}
    skiff = [str(BIN / "skiff"), *(["--forks", str(n)] if skiff_forks == "n" else [])]
    ssh_opts = ["--known-hosts", str(fleet.known_hosts)]
    grpc_h = [arg for ip in ips for arg in ("-H", f"tcp://{ip}:{fleet.grpc_port}")]
    ssh_h = [arg for ip in ips for arg in ("-H", f"ssh://root@{ip}:{fleet.ssh_port}{fleet.agent_socket(ip)}")]
    inv = fleet.inv
    table: dict[str, tuple[str, list[str], Callable[[str], int | None]]] = {
        "grpc-i": ("skiff-grpc -i", [*skiff, "-i", str(inv / f"grpc.{n}.ini"), "--on", "all", "ps"], count_skiff),
        "grpc-H": ("skiff-grpc -H", [*skiff, *grpc_h, "ps"], count_skiff),
        "grpc-floor": ("grpc.aio mTLS floor", [sys.executable, str(Path(__file__).resolve()), "grpc-floor", "--hosts",
                                               str(inv / f"grpc-floor.{n}"), "--certs", str(fleet.client_certs)],
                       count_floor),
        "ssh-H": ("skiff-ssh -H", [*skiff, *ssh_opts, "--ssh-key", str(fleet.key), *ssh_h, "ps"], count_skiff),
        "ssh-i": ("skiff-ssh -i", [*skiff, *ssh_opts, "-i", str(inv / f"ssh.{n}.ini"), "--on", "all", "ps"],
                  count_skiff),
        "asyncssh": ("asyncssh floor", [sys.executable, str(Path(__file__).resolve()), "asyncssh-floor", "--hosts",
                                        str(inv / f"floor.{n}"), "--key", str(fleet.key), "--known-hosts",
                                        str(fleet.known_hosts)], count_floor),
        "pssh": ("pssh", ["parallel-ssh", "-h", str(inv / f"pssh.{n}"), "-p", str(n), "-t", "120",
                          "-x", f"-F {fleet.ssh_config}", "true"], count_pssh),
        "ansible": ("ansible", [str(BIN / "ansible"), "all", "-i", str(inv / f"ssh.{n}.ini"), "-m", "command",
                                "-a", "true", "-f", str(n)], count_ansible),
    }
    return [Case(key, table[key][0], table[key][1], env, ansible_runs if key == "ansible" else runs, table[key][2])
            for key in CASE_KEYS if key in keys]


# -- report -----------------------------------------------------------------------------------------


def print_table(results: Sequence[Result]) -> None:
    print("| tool | N | runs | wall median s | min–max s | ctl CPU s | CPU ms/host | peak RSS MiB "
          "| server CPU s | other CPU s | failed runs |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        walls = [x.wall for x in r.runs]
        print(f"| {r.case.label} | {r.n} | {len(r.runs)} | {r.med('wall'):.3f} | {min(walls):.2f}–{max(walls):.2f} "
              f"| {r.med('cpu'):.3f} | {r.med('cpu') * 1000 / r.n:.2f} | {r.med('rss_mib'):.0f} "
              f"| {r.med('srv_cpu'):.2f} | {r.med('other_cpu'):.2f} | {len(r.failures)}/{len(r.runs)} |")


def ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    by = {(r.case.key, r.n): r for r in results}
    out = []
    for r in results:
        if not r.case.key.startswith(("grpc-i", "grpc-H", "ssh")):
            continue
        wall = r.med("wall")
        row: dict[str, Any] = {"kind": "ratio", "tool": r.case.label, "n": r.n, "wall_median_s": round(wall, 4),
                               "ctl_cpu_ms_per_host": round(r.med("cpu") * 1000 / r.n, 3)}
        for other in ("asyncssh", "ansible", "pssh"):
            if (other, r.n) in by:
                row[f"over_{other}"] = round(wall / by[(other, r.n)].med("wall"), 3)
        if r.case.key.startswith("grpc") and ("grpc-floor", r.n) in by:
            floor = by[("grpc-floor", r.n)]
            row["floor_cpu_ms_per_host"] = round(floor.med("cpu") * 1000 / r.n, 3)
            row["cpu_over_grpc_floor"] = round(r.med("cpu") / floor.med("cpu"), 3)
        smaller = [m for (key, m) in by if key == r.case.key and m < r.n]
        if smaller:  # what one more host costs: the slope from the next smaller N, start-up cost excluded
            base = by[(r.case.key, max(smaller))]
            row["marginal_cpu_ms_per_host"] = round((r.med("cpu") - base.med("cpu")) * 1000 / (r.n - base.n), 3)
            row["marginal_wall_ms_per_host"] = round((wall - base.med("wall")) * 1000 / (r.n - base.n), 3)
        out.append(row)
    return out


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def print_ratios(rows: Sequence[dict[str, Any]]) -> None:
    print("\n| skiff | N | wall s | target | / asyncssh floor | / ansible | / pssh | ctl CPU ms/host "
          "| marginal CPU / wall ms/host |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["tool"].startswith("skiff-grpc"):
            target = (f"<= {GRPC_TARGET_S:.1f} s: {verdict(row['wall_median_s'] <= GRPC_TARGET_S)}"
                      if row["n"] == 200 else "(1.0 s at N=200)")
        elif "over_asyncssh" in row:
            target = f"floor x{FLOOR_TARGET}: {verdict(row['over_asyncssh'] <= FLOOR_TARGET)}"
        else:
            target = "-"
        cells = [f"{row[k]:.2f}" if k in row else "-" for k in ("over_asyncssh", "over_ansible", "over_pssh")]
        cpu = row["ctl_cpu_ms_per_host"]
        floor = (f"; grpc.aio floor {row['floor_cpu_ms_per_host']:.2f}, skiff x{row['cpu_over_grpc_floor']:.2f}"
                 if "floor_cpu_ms_per_host" in row else "")
        marginal = (f"{row['marginal_cpu_ms_per_host']:.2f} / {row['marginal_wall_ms_per_host']:.2f}"
                    if "marginal_cpu_ms_per_host" in row else "-")
        print(f"| {row['tool']} | {row['n']} | {row['wall_median_s']:.3f} | {target} | {' | '.join(cells)} "
              f"| {cpu:.2f} (<= {CPU_TARGET_MS:g}: {verdict(cpu <= CPU_TARGET_MS)}{floor}) | {marginal} |")


# -- main -------------------------------------------------------------------------------------------


def parse_keys(text: str) -> list[str]:
    keys: list[str] = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        names = ALIASES.get(word, (word,))
        for name in names:
            if name not in CASE_KEYS:
                raise argparse.ArgumentTypeError(f"unknown tool {word!r}: one of {', '.join((*ALIASES, *CASE_KEYS))}")
            if name not in keys:
                keys.append(name)
    return keys


def main() -> int:
    # every skiff a process of its own (no client zygote): its cpu is then the timed process's own
    os.environ["SKIFF_CLIENT_PERSIST"] = "0"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="50,200", help="host counts, comma-separated (default 50,200; max 253)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per tool and N (default 5)")
    parser.add_argument("--ansible-runs", type=int, default=3, help="timed runs of ansible (default 3, at most --runs)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds per N (default 1)")
    parser.add_argument("--only", type=parse_keys, default=list(CASE_KEYS),
                        help="tools: grpc (= grpc-i,grpc-H), ssh (= ssh-H,ssh-i), asyncssh, pssh, ansible [all]")
    parser.add_argument("--agents", type=int, default=2, help="skiffd processes serving the hosts (default 2)")
    parser.add_argument("--skiff-forks", choices=("n", "default"), default="n",
                        help="n: skiff --forks N like ansible -f N (default); default: skiff's own (50)")
    parser.add_argument("--grpc-port", type=int, default=2376)
    parser.add_argument("--ssh-port", type=int, default=2222)
    parser.add_argument("--timeout", type=float, default=300.0, help="kill a run after this many seconds")
    parser.add_argument("--results", type=Path, default=Path(tempfile.gettempdir()) / "skiff-bench-fanout.jsonl",
                        help="JSON lines appended here (default $TMPDIR/skiff-bench-fanout.jsonl)")
    parser.add_argument("--keep", action="store_true", help="leave the servers running and the tmp dir")
    args = parser.parse_args()
    ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    if not ns or ns[0] < 1 or ns[-1] > 253:
        parser.error("--n: host counts from 1 to 253 (127.0.0.2 … 127.0.0.254)")
    if os.geteuid() != 0:
        parser.error("needs root (sshd, mount namespaces, skiffd)")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    work = Path(tempfile.mkdtemp(prefix="skiff-bench-fanout-"))
    fleet = Fleet(work, ns[-1], args.agents, args.grpc_port, args.ssh_port)
    keys = args.only
    needs_agents = any(k.startswith(("grpc", "ssh")) for k in keys)
    needs_sshd = any(not k.startswith("grpc") for k in keys)
    results: list[Result] = []
    try:
        t0 = time.monotonic()
        fleet.check_ports()
        fleet.make_keys()
        fleet.write_inventories(ns)
        if needs_agents:
            fleet.make_ca()
            fleet.start_agents()
        t_agents = time.monotonic()
        if needs_sshd:
            fleet.start_sshd()
        t_sshd = time.monotonic()
        settle = INVENTORY_SETTLE_S - (time.monotonic() - fleet.inventories_written)
        if settle > 0:  # or skiff -i would not cache the parsed inventory during the warm-up
            time.sleep(settle)
        setup_s = time.monotonic() - t0
        print(f"set-up {setup_s:.1f} s ({len(fleet.ips)} hosts; CA + {len(fleet.agents)} skiffd "
              f"{t_agents - t0:.1f} s, {len(fleet.sshd)} sshd {t_sshd - t_agents:.1f} s) in {work}", file=sys.stderr)
        started = time.time()
        for n in ns:
            cases = make_cases(fleet, n, keys, args.runs, min(args.ansible_runs, args.runs), args.skiff_forks)
            results += interleave(fleet, cases, n, args.warmup, args.timeout)
        bench_s = time.time() - started

        ansible_note = f" (ansible {min(args.ansible_runs, args.runs)})" if "ansible" in keys else ""
        print(f"\nfan-out, whole process, medians of {args.runs} runs{ansible_note} "
              f"after {args.warmup} warm-up, round-robin; {len(fleet.agents)} skiffd, {len(fleet.sshd)} sshd on "
              f"loopback; skiff --forks {'N' if args.skiff_forks == 'n' else 'default'}; set-up {setup_s:.1f} s, "
              f"benchmark {bench_s:.0f} s; load avg now {' '.join(loadavg())}\n")
        print_table(results)
        rows = ratios(results)
        print_ratios(rows)
        print("\n(ctl CPU: user+sys of the timed process and its reaped descendants; peak RSS: its largest "
              "single process; server CPU: sshd + skiffd per run; other CPU: the rest of the machine per run "
              "(other people's work; high means noisy numbers)")
        problems = fleet.sshd_log_problems()
        if problems:
            print(f"sshd logs: {problems}")
        for r in results:
            for run in r.failures[:1]:
                print(f"\n{r.case.label} N={r.n}: {len(r.failures)} of {len(r.runs)} runs failed, e.g. "
                      f"(exit {run.code}, {run.ok_hosts} hosts OK):\n  " + run.log.replace("\n", "\n  "))
        meta = {"kind": "meta", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ns": ns, "runs": args.runs,
                "ansible_runs": min(args.ansible_runs, args.runs), "warmup": args.warmup, "agents": len(fleet.agents),
                "sshd": len(fleet.sshd), "skiff_forks": args.skiff_forks, "setup_s": round(setup_s, 2),
                "benchmark_s": round(bench_s, 1), "cpus": os.cpu_count(), "sshd_log_problems": problems,
                "loadavg": loadavg()}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in (meta, *(r.record() for r in results), *rows))
        print(f"\nresults appended to {args.results}")
    except KeyboardInterrupt:
        print("interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            fleet.kill_current()
            print(fleet.keep_note(), file=sys.stderr)
        else:
            fleet.close()
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["asyncssh-floor"]:
        sys.exit(asyncssh_floor(sys.argv[2:]))
    if sys.argv[1:2] == ["grpc-floor"]:
        sys.exit(grpc_floor(sys.argv[2:]))
    sys.exit(main())
