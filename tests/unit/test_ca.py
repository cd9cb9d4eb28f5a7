"""The fleet CA (controller.ca, `skiff ca`): files and modes, certificate contents, chains,
and real mutual-TLS handshakes with Python's ssl module on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller import ca
from controller.errors import ControllerError
from controller.main import DockerGroup


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- the CA -----------------------------------------------------------------


def test_init_refuses_an_existing_ca_and_force_replaces_it(tmp_path: Path) -> None:
    root = tmp_path / "ca"
    assert ca.init_ca(root) == root
    first = (root / "ca.pem").read_bytes()
    with pytest.raises(ca.CAExistsError) as info:
        ca.init_ca(root)
    message = str(info.value)
    assert "\n" not in message and str(root) in message and "--force" in message
    assert (root / "ca.pem").read_bytes() == first
    ca.init_ca(root, force=True)
    assert (root / "ca.pem").read_bytes() != first
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_init_refuses_a_lone_key_too(tmp_path: Path) -> None:
    tmp_path.joinpath("ca-key.pem").write_text("x")
    with pytest.raises(ca.CAExistsError, match="ca-key.pem"):
        ca.init_ca(tmp_path)


def test_file_and_directory_modes(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "ca"
    ca.init_ca(root)
    ca.issue_agent_cert(root, "web1")
    ca.issue_client_cert(root, "alice", role="admin")
    assert _mode(root) == 0o700
    assert _mode(root / "ca-key.pem") == 0o600
    assert _mode(root / "ca.pem") == 0o644
    for sub in ("agents/web1", "clients/alice"):
        d = root / sub
        assert _mode(d) == 0o700 and _mode(d.parent) == 0o700
        assert sorted(p.name for p in d.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
        assert _mode(d / "key.pem") == 0o600
        assert (d / "ca.pem").read_bytes() == (root / "ca.pem").read_bytes()
        assert b"PRIVATE KEY" in (d / "key.pem").read_bytes()


def test_ca_certificate_properties(tmp_path: Path) -> None:
    ca.init_ca(tmp_path, common_name="lab CA", days=30)
    cert = _cert(tmp_path / "ca.pem")
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lab CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    assert dt.timedelta(days=29) < cert.not_valid_after_utc - _now() <= dt.timedelta(days=30)
    cert.verify_directly_issued_by(cert)


def test_issuing_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(ca.CANotFoundError) as info:
        ca.issue_client_cert(tmp_path / "none", "alice", role="admin")
    assert "\n" not in str(info.value) and str(tmp_path / "none") in str(info.value)
    assert not (tmp_path / "none").exists()


# --- agent certificates ---------------------------------------------------------


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return ca.init_ca(tmp_path / "ca")


def _sans(cert: x509.Certificate) -> list[object]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *san.get_values_for_type(x509.IPAddress)]


def test_agent_cert_for_a_dns_name(root: Path) -> None:
    d = ca.issue_agent_cert(root, "web1.lab", extra_names=["localhost", "127.0.0.1"])
    assert d == root / "agents" / "web1.lab"
    cert = _cert(d / "cert.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web1.lab"
    assert _sans(cert) == ["web1.lab", "localhost", ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = _cert(root / "ca.pem").extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest


def _verify_server(root: Path, leaf: Path, subject: x509.verification.Subject) -> None:
    store = verification.Store([_cert(root / "ca.pem")])
    verifier = verification.PolicyBuilder().store(store).build_server_verifier(subject)
    chain = verifier.verify(_cert(leaf), [])
    assert chain[-1] == _cert(root / "ca.pem")


def test_agent_cert_chains_to_the_ca_by_name_and_by_ip(root: Path) -> None:
    dns = ca.issue_agent_cert(root, "web1")
    ip = ca.issue_agent_cert(root, "10.0.0.5")
    _verify_server(root, dns / "cert.pem", x509.DNSName("web1"))
    _verify_server(root, ip / "cert.pem", x509.IPAddress(ipaddress.ip_address("10.0.0.5")))
    assert _sans(_cert(ip / "cert.pem")) == [ipaddress.ip_address("10.0.0.5")]
    with pytest.raises(verification.VerificationError):
        _verify_server(root, dns / "cert.pem", x509.DNSName("web2"))
    other = ca.init_ca(root.parent / "other")
    with pytest.raises(verification.VerificationError):
        _verify_server(other, dns / "cert.pem", x509.DNSName("web1"))


def test_ipv6_hosts_are_canonical(root: Path) -> None:
    d = ca.issue_agent_cert(root, "fd00:0:0::1")
    assert d.name == "fd00::1"
    assert _sans(_cert(d / "cert.pem")) == [ipaddress.ip_address("fd00::1")]


@pytest.mark.parametrize("host", ["", "../etc", "web1/x", "a..b", "-web", "web_1", "*.lab", "1.2.3", "999.1.1.1",
                                  "web 1", "x" * 64 + ".lab", "fe80::1%eth0"])
def test_invalid_hosts_are_one_line_errors(root: Path, host: str) -> None:
    with pytest.raises(ca.InvalidNameError) as info:
        ca.issue_agent_cert(root, host)
    assert "\n" not in str(info.value) and repr(host) in str(info.value)
    assert isinstance(info.value, ControllerError) and info.value.exit_code == 125
    assert not (root / "agents").exists()


def test_invalid_extra_name(root: Path) -> None:
    with pytest.raises(ca.InvalidNameError, match="'bad name'"):
        ca.issue_agent_cert(root, "web1", extra_names=["bad name"])


# --- client certificates and roles ------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "viewer"])
def test_client_cert_role_round_trip(root: Path, role: str) -> None:
    d = ca.issue_client_cert(root, "alice", role=role)
    assert d == root / "clients" / "alice"
    pem = (d / "cert.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert ca.role_of(pem) == role
    assert ca.role_of(cert.public_bytes(Encoding.DER)) == role
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # like docker's, the client certificate has no SAN, which the Web PKI profile requires
    ee = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    builder = verification.PolicyBuilder().store(verification.Store([_cert(root / "ca.pem")]))
    builder = builder.extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
    verified = builder.build_client_verifier().verify(cert, [])
    assert verified.chain[-1] == _cert(root / "ca.pem")


def test_role_of_without_a_role(root: Path) -> None:
    agent = ca.issue_agent_cert(root, "web1")
    assert ca.role_of((agent / "cert.pem").read_bytes()) is None
    assert ca.role_of(b"not a certificate") is None
    assert ca.role_of(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n") is None


@pytest.mark.parametrize("role", ["root", "Admin", ""])
def test_invalid_role_is_a_one_line_error(root: Path, role: str) -> None:
    with pytest.raises(ca.InvalidNameError) as info:
        ca.issue_client_cert(root, "alice", role=role)
    assert "\n" not in str(info.value) and repr(role) in str(info.value) and "admin, viewer" in str(info.value)
    assert not (root / "clients").exists()


@pytest.mark.parametrize("name", ["", "../alice", "a/b", ".hidden", "x" * 65])
def test_invalid_client_name(root: Path, name: str) -> None:
    with pytest.raises(ca.InvalidNameError) as info:
        ca.issue_client_cert(root, name, role="viewer")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("days", [0, -1])
def test_expired_certificates(root: Path, days: int) -> None:
    cert = _cert(ca.issue_client_cert(root, "late", role="admin", days=days) / "cert.pem")
    assert cert.not_valid_after_utc < _now()
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    assert ca.describe(root / "clients" / "late").expired


def test_describe_and_list(root: Path) -> None:
    ca.issue_agent_cert(root, "web1", extra_names=["10.0.0.5"])
    ca.issue_client_cert(root, "bob", role="viewer")
    infos = ca.list_certs(root)
    assert [(i.kind, i.common_name, i.role) for i in infos] == [
        ("ca", "skiff fleet CA", None), ("agent", "web1", None), ("client", "bob", "viewer")]
    assert infos[1].sans == ("DNS:web1", "IP:10.0.0.5")
    assert infos[2].serial == _cert(root / "clients" / "bob" / "cert.pem").serial_number
    assert not infos[2].expired and infos[0].is_ca
    with pytest.raises(ca.CertificateFileError, match="cannot read"):
        ca.describe(root / "nope.pem")


# --- the CLI (through the same lazy group main.py uses) --------------------------------


def _skiff(*args: str) -> tuple[int, str, str]:
    group = DockerGroup(name="skiff", lazy={"ca": "ca:ca"})
    result = CliRunner().invoke(group, list(args), env={"SKIFF_CA_DIR": None})
    return result.exit_code, result.stdout, result.stderr


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ca"
    code, out, _ = _skiff("ca", "init", "--dir", str(root))
    assert code == 0 and out == f"fleet CA: {root}/\n"
    code, out, err = _skiff("ca", "init", "--dir", str(root))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "already exists" in err
    code, out, _ = _skiff("ca", "agent-cert", "web1", "127.0.0.1", "--san", "localhost", "--dir", str(root))
    assert code == 0
    assert out.splitlines() == [f"agent cert for web1: {root}/agents/web1/",
                                f"agent cert for 127.0.0.1: {root}/agents/127.0.0.1/"]
    assert _sans(_cert(root / "agents" / "127.0.0.1" / "cert.pem")) == ["localhost", ipaddress.ip_address("127.0.0.1")]
    code, out, err = _skiff("ca", "agent-cert", "web2", "bad/host", "--dir", str(root))
    assert code == 125 and out == "" and "bad/host" in err and not (root / "agents" / "web2").exists()
    code, _, err = _skiff("ca", "client-cert", "bob", "--dir", str(root))
    assert code == 2 and "--role" in err
    code, out, _ = _skiff("ca", "client-cert", "late", "--role", "viewer", "--days", "-1", "--dir", str(root))
    assert code == 0 and out == f"client cert for late (viewer): {root}/clients/late/\n"
    monkeypatch.setenv("SKIFF_CA_DIR", str(root))
    group = DockerGroup(name="skiff", lazy={"ca": "ca:ca"})
    result = CliRunner().invoke(group, ["ca", "client-cert", "alice", "--role", "admin"])
    assert result.exit_code == 0 and ca.role_of((root / "clients/alice/cert.pem").read_bytes()) == "admin"
    result = CliRunner().invoke(group, ["ca", "show"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and lines[0].split()[:3] == ["KIND", "NAME", "ROLE"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["ca", "skiff", "fleet"], ["agent", "127.0.0.1", "-"], ["agent", "web1", "-"],
        ["client", "alice", "admin"], ["client", "late", "viewer"]]
    assert "(expired)" in lines[-1] and "(expired)" not in lines[-2]
    result = CliRunner().invoke(group, ["ca", "show", str(root / "clients" / "alice")])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2
    assert b"PRIVATE" not in result.stdout_bytes


def test_the_cli_module_does_not_import_cryptography() -> None:
    import subprocess
    import sys

    code = ("import sys, controller.commands.ca, controller.ca; "
            "sys.exit(1 if any(m.startswith('cryptography') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


# --- real mutual TLS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = ca.init_ca(tmp_path_factory.mktemp("pki"))
    ca.issue_agent_cert(root, "127.0.0.1")
    ca.issue_client_cert(root, "ops", role="admin")
    ca.issue_client_cert(root, "late", role="admin", days=0)
    other = ca.init_ca(root / "other")
    ca.issue_client_cert(other, "mallory", role="admin")
    return root


def _handshake(pki: Path, client: Path | None) -> str | None:
    """Connect to a TLS server on 127.0.0.1 that wants a client certificate from the CA in
    ``pki``, presenting ``client``'s cert.pem/key.pem (or none); return None when the server
    accepted it and read a message, else the server's error."""
    agent = pki / "agents" / "127.0.0.1"
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(agent / "cert.pem", agent / "key.pem")
    server_ctx.load_verify_locations(agent / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    outcome: list[str | None] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                assert peer is not None
                assert tls.recv(4) == b"ping"
                tls.sendall((ca.role_of(peer) or "none").encode())
            outcome.append(None)
        except (OSError, AssertionError) as exc:  # ssl.SSLError is an OSError
            outcome.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(pki / "ca.pem")  # the client checks the agent, by IP
    if client is not None:
        client_ctx.load_cert_chain(client / "cert.pem", client / "key.pem")
    reply = b""
    try:
        with (socket.create_connection(listener.getsockname(), timeout=10) as raw,
              client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
            tls.sendall(b"ping")
            reply = tls.recv(16)
    except OSError:
        pass
    finally:
        thread.join(15)
        listener.close()
    assert outcome, "the server thread did not finish"
    if outcome[0] is None:
        assert reply == b"admin"
    return outcome[0]


def test_mtls_accepts_a_client_of_this_ca(pki: Path) -> None:
    assert _handshake(pki, pki / "clients" / "ops") is None


def test_mtls_refuses_a_client_of_another_ca(pki: Path) -> None:
    error = _handshake(pki, pki / "other" / "clients" / "mallory")
    assert error is not None and "certificate verify failed" in error


def test_mtls_refuses_no_client_cert(pki: Path) -> None:
    error = _handshake(pki, None)
    assert error is not None and "certificate" in error


def test_mtls_refuses_an_expired_client_cert(pki: Path) -> None:
    error = _handshake(pki, pki / "clients" / "late")
    assert error is not None and "expired" in error
