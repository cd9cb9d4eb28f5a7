"""skiffd over TCP with mutual TLS from `skiff ca`, and the role table: real certificates, real grpc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess, Result

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def skiff(*args: str, env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run([str(BIN / "skiff"), *args], capture_output=True, timeout=120,
                          env={**os.environ, **(env or {})})
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def ok(*args: str) -> str:
    result = skiff(*args)
    assert result.code == 0, f"skiff {' '.join(args)} failed ({result.code}): {result.err}"
    return result.out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("ca")
    ok("ca", "init", "--dir", str(ca))
    ok("ca", "agent-cert", "127.0.0.1", "--dir", str(ca))
    ok("ca", "client-cert", "ops", "--role", "admin", "--dir", str(ca))
    ok("ca", "client-cert", "intern", "--role", "viewer", "--dir", str(ca))
    ok("ca", "client-cert", "late", "--role", "admin", "--days", "0", "--dir", str(ca))
    other = tmp_path_factory.mktemp("other-ca")
    ok("ca", "init", "--dir", str(other))
    ok("ca", "client-cert", "mallory", "--role", "admin", "--dir", str(other))
    return ca


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[tuple[AgentProcess, str]]:
    port = _free_port()
    root = tmp_path_factory.mktemp("tls-agent")
    certs = pki / "agents" / "127.0.0.1"
    proc = AgentProcess(root, "-H", f"unix://{root / 'run' / 'skiffd.sock'}", "-H", f"tcp://127.0.0.1:{port}",
                        "--tlsverify", "--tlscacert", str(certs / "ca.pem"), "--tlscert", str(certs / "cert.pem"),
                        "--tlskey", str(certs / "key.pem"))
    try:
        yield proc.start(), f"tcp://127.0.0.1:{port}"
    finally:
        proc.stop()


def _as(pki: Path, who: str, *args: str, ca_dir: Path | None = None) -> Result:
    d = (ca_dir or pki) / "clients" / who
    return skiff("--tlscacert", str(pki / "ca.pem"), "--tlscert", str(d / "cert.pem"), "--tlskey", str(d / "key.pem"),
                 *args)


def test_admin_over_mutual_tls(tls_agent: tuple[AgentProcess, str], pki: Path) -> None:
    _, host = tls_agent
    result = _as(pki, "ops", "-H", host, "version")
    assert result.code == 0, result.err
    assert "Server:" in result.out
    assert _as(pki, "ops", "-H", host, "ps", "-a").code == 0


def test_cert_path_env_like_docker(tls_agent: tuple[AgentProcess, str], pki: Path) -> None:
    _, host = tls_agent
    client = pki / "clients" / "ops"
    result = skiff("-H", host, "version", env={"SKIFF_CERT_PATH": str(client)})
    assert result.code == 0, result.err


def test_viewer_may_read_but_not_act(tls_agent: tuple[AgentProcess, str], pki: Path) -> None:
    _, host = tls_agent
    assert _as(pki, "intern", "-H", host, "ps", "-a").code == 0
    assert _as(pki, "intern", "-H", host, "images").code == 0
    assert _as(pki, "intern", "-H", host, "info").code == 0
    for args in (("run", "--rm", "busybox", "true"), ("pull", "busybox"), ("rm", "-f", "x"), ("exec", "x", "true")):
        denied = _as(pki, "intern", "-H", host, *args)
        assert denied.code != 0, args
        assert "may not call" in denied.err and len(denied.err.strip().splitlines()) == 1, denied.err


def test_wrong_ca_expired_and_missing_certs_are_refused(tls_agent: tuple[AgentProcess, str], pki: Path,
                                                        tmp_path: Path) -> None:
    _, host = tls_agent
    other = pki.parent / next(p.name for p in pki.parent.iterdir() if p.name.startswith("other-ca"))
    foreign = _as(pki, "mallory", "-H", host, "version", ca_dir=other)
    assert foreign.code != 0 and "TLS" in foreign.err
    expired = _as(pki, "late", "-H", host, "version")
    assert expired.code != 0 and "TLS" in expired.err
    nothing = skiff("-H", host, "version", env={"SKIFF_CERT_PATH": str(tmp_path / "none"), "HOME": str(tmp_path)})
    assert nothing.code != 0 and len(nothing.err.strip().splitlines()) == 1


def test_plain_tcp_is_refused_unless_asked_for(tmp_path: Path) -> None:
    (tmp_path / "none.toml").touch()
    proc = subprocess.run([str(BIN / "skiffd"), "--config-file", str(tmp_path / "none.toml"),
                           "--data-root", str(tmp_path / "d"), "--exec-root", str(tmp_path / "r"),
                           "-H", f"tcp://127.0.0.1:{_free_port()}"], capture_output=True, timeout=30)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "without mutual TLS" in err and len(err.strip().splitlines()) == 1
