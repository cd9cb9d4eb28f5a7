"""skiffd as a process: flags, config file, sockets, health, logs, signals, side-by-side agents."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.agent import BIN, AgentProcess


def test_version_info_health_and_socket(agent: AgentProcess) -> None:
    out = agent.ok("version")
    assert "Client:" in out and "Server:" in out
    info = agent.ok("info")
    assert f"Skiff Root Dir: {agent.data_root}" in info
    assert "Storage Driver: overlay" in info
    mode = agent.ok("info", "-f", "{{.CgroupMode}}").strip()
    assert mode in ("v1", "hybrid", "v2")
    assert agent.ok("info", "--format", "{{.Images}}").strip().isdigit()
    assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o660
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "skiff.v1.Images", "skiff.v1.System"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_one_json_log_line_per_rpc(agent: AgentProcess) -> None:
    agent.ok("info")
    agent.cli("image", "inspect", "does-not-exist:1")
    lines = [json.loads(line) for line in agent.log_path.read_text().splitlines() if line.startswith("{")]
    rpcs = [entry for entry in lines if entry.get("event") == "rpc"]
    info = [e for e in rpcs if e["method"] == "/skiff.v1.System/Info"]
    assert info and info[-1]["code"] == "OK" and "duration_ms" in info[-1]
    failed = [e for e in rpcs if e["method"] == "/skiff.v1.Images/Inspect"]
    assert failed[-1]["code"] == "NOT_FOUND" and "does-not-exist" in failed[-1]["error"]


def test_side_by_side_agents_config_file_and_sigterm(tmp_path: Path) -> None:
    first = AgentProcess(tmp_path / "a")
    second = AgentProcess(tmp_path / "b")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "daemon.toml").write_text('max-concurrent-downloads = 5\ninsecure-registries = ["10.99.0.0/16"]\n')
    try:
        first.start()
        second.start()
        assert first.ok("info", "-f", "{{.DataRoot}}").strip() == str(first.data_root)
        assert second.ok("info", "-f", "{{.DataRoot}}").strip() == str(second.data_root)
        assert second.ok("info", "-f", "{{.MaxConcurrentDownloads}}").strip() == "5"
        assert "10.99.0.0/16" in second.ok("info")
        # A second agent on the same data root is refused with one clear line.
        clash = subprocess.run([str(BIN / "skiffd"), "--data-root", str(first.data_root),
                                "--exec-root", str(tmp_path / "other-run")],
                               capture_output=True, text=True, timeout=30)
        assert clash.returncode != 0 and "another skiffd is using the data root" in clash.stderr
        assert "Traceback" not in clash.stderr
    finally:
        assert first.stop() == 0
        assert second.stop() == 0
    assert not first.socket.exists() and not second.socket.exists()
    assert "skiffd stopped" in first.log_path.read_text()


def test_bad_flags_and_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("data-root = 5\n")
    for args, message in (
        (["--config-file", str(bad)], "expected a path"),
        (["--config-file", str(tmp_path / "missing.toml")], "not found"),
        (["-H", "tcp://0.0.0.0:1"], "without mutual TLS"),
        (["-H", "http://0.0.0.0:1"], "unsupported listen address"),
    ):
        res = subprocess.run([str(BIN / "skiffd"), "--data-root", str(tmp_path / "d"),
                              "--exec-root", str(tmp_path / "r"), *args], capture_output=True, text=True, timeout=30)
        assert res.returncode != 0 and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_cli_without_agent_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run([str(BIN / "skiff"), "-H", f"unix://{tmp_path}/none.sock", "images"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "cannot connect to the skiff agent" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run([str(BIN / "skiff"), "-H", "ftp://x", "images"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 125 and "unsupported host" in res.stderr


def test_sigterm_during_pull_leaves_a_consistent_store(fresh_agent: AgentProcess, registry: object) -> None:
    host = getattr(registry, "host")
    env = {**os.environ, "SKIFF_HOST": fresh_agent.host}
    pull = subprocess.Popen([str(BIN / "skiff"), "pull", "-q", f"{host}/multi:1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)
    assert fresh_agent.proc is not None
    fresh_agent.proc.send_signal(signal.SIGTERM)
    pull.communicate(timeout=60)
    fresh_agent.proc.wait(30)
    fresh_agent.start()
    fresh_agent.ok("pull", "-q", f"{host}/multi:1")
    assert len(fresh_agent.ok("images", "-q").split()) == 1
