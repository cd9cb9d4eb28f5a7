"""Start a real skiffd in a private data/exec root and drive it with the real skiff CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.leftovers import Leftovers

BIN = Path(sys.executable).parent


@dataclass
class Result:
    code: int
    out: str
    err: str


class AgentProcess:
    """One skiffd process: ``start()``, ``cli(...)``, ``kill9()``, ``stop()``."""

    def __init__(self, root: Path, *extra_args: str) -> None:
        self.root = root
        self.data_root = root / "data"
        self.exec_root = root / "run"
        self.socket = self.exec_root / "skiffd.sock"
        self.log_path = root / "skiffd.log"
        self.cgroup_parent = f"/skiff-test-{os.getpid()}-{id(self):x}"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 20.0) -> AgentProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "daemon.toml").touch(exist_ok=True)  # an explicit --config-file must exist
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "skiffd"), "--config-file", str(self.root / "daemon.toml"),
             "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
             "--log-format", "json", "--cgroup-parent", self.cgroup_parent, *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"skiffd exited with {self.proc.returncode}: {self.log_tail()}")
            if self.socket.exists() and self.cli("version").code == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"skiffd did not come up in {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 120.0) -> Result:
        env = {**os.environ, "SKIFF_HOST": self.host}
        proc = subprocess.run([str(BIN / "skiff"), *args], input=input, capture_output=True,
                              timeout=timeout, env=env)
        return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))

    def ok(self, *args: str, input: bytes | None = None, timeout: float = 120.0) -> str:
        result = self.cli(*args, input=input, timeout=timeout)
        assert result.code == 0, f"skiff {' '.join(args)} failed ({result.code}): {result.err}{result.out}"
        return result.out

    def leftovers(self) -> Leftovers:
        """Mounts, cgroups and serving shims of this agent right now."""
        return Leftovers.snapshot(self.root, self.cgroup_parent, self.exec_root / "shim.log")

    def remove_all_containers(self) -> None:
        """``rm -f`` every container (they outlive the agent: live-restore)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        ids = self.cli("ps", "-aq", "--no-trunc").out.split()
        if ids:
            self.cli("rm", "-f", *ids)

    def reap_leftovers(self) -> None:
        """After the agent is gone: kill what its containers left (cgroups, shims, mounts)."""
        from agent.runtime.cgroups import detect

        containers = self.exec_root / "containers"
        for state in containers.glob("*") if containers.exists() else []:
            try:
                os.kill(int((state / "shim.pid").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        try:
            detect().destroy(self.cgroup_parent, kill=True)
        except OSError:
            pass
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            targets = [line.split()[4] for line in f]
        for target in reversed(targets):
            if target.startswith(str(self.root) + "/"):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        self.remove_all_containers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reap_leftovers()
        return self.proc.returncode
