"""The fleet's certificate authority: one CA, a server certificate per agent host and a
client certificate per person or tool, whose subject's OU is its role.

Layout of a CA directory (default ``~/.skiff/ca``, or ``$SKIFF_CA_DIR``)::

    ca.pem                 the CA certificate (0644)
    ca-key.pem             the CA key (0600)
    agents/<host>/         ca.pem, cert.pem, key.pem for ``skiffd --tlscacert/--tlscert/--tlskey``
    clients/<name>/        ca.pem, cert.pem, key.pem: usable as $SKIFF_CERT_PATH, as ~/.docker

Keys are ECDSA P-256, written atomically (temp file, fsync, rename) with mode 0600 in
directories of mode 0700, and never printed or logged.  ``cryptography`` is imported only
inside the functions that need it, so importing this module costs nothing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from controller.errors import ControllerError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

ROLES = ("admin", "viewer")
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CERT = "cert.pem"
KEY = "key.pem"
AGENTS = "agents"
CLIENTS = "clients"

#: how far back a new certificate's validity starts, for agents whose clocks run a little behind
_BACKDATE = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class CAError(ControllerError):
    """A fleet CA operation failed."""


class CAExistsError(CAError):
    """``init`` found a CA already there and was not told to replace it."""


class CANotFoundError(CAError):
    """No usable CA in the directory."""


class InvalidNameError(CAError):
    """A host, client name or role that cannot go in a certificate."""

    exit_code = 125


class CertificateFileError(CAError):
    """A certificate file that cannot be read or parsed."""


def default_dir() -> Path:
    """``$SKIFF_CA_DIR`` or ``~/.skiff/ca``."""
    return Path(os.environ.get("SKIFF_CA_DIR") or Path.home() / ".skiff" / "ca")


# --- names ------------------------------------------------------------------


def check_host(host: str) -> str:
    """``host`` as it goes in a SAN and a directory name: an IP address (in its canonical
    form) or a DNS name; anything else raises :class:`InvalidNameError`."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise InvalidNameError(f"invalid host {host!r}: a scoped IPv6 address cannot go in a certificate")
        return str(ip)
    if not host or len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in host.split(".")):
        raise InvalidNameError(f"invalid host {host!r}: expected a DNS name (letters, digits, '-', dots) "
                               "or an IP address")
    if host.rsplit(".", 1)[-1].isdigit():
        raise InvalidNameError(f"invalid host {host!r}: not an IP address, and a DNS name's last label "
                               "cannot be all digits")
    return host


def check_client_name(name: str) -> str:
    if not _CLIENT_NAME.fullmatch(name):
        raise InvalidNameError(f"invalid client name {name!r}: expected 1-64 of letters, digits, '.', '_', '@', "
                               "'-', starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidNameError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
    return role


# --- files ------------------------------------------------------------------


def _mkdir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing; a directory created here gets mode 0700."""
    if path.is_dir():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        if not path.is_dir():
            raise CAError(f"cannot create directory {path}: a file is in the way") from None
    except OSError as exc:
        raise CAError(f"cannot create directory {exc.filename or path}: {exc.strerror}") from exc


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, with ``mode`` regardless of the umask."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CAError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dirfd)
    except OSError:
        pass
    finally:
        os.close(dirfd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateFileError(f"cannot read {path}: {exc.strerror}") from exc


# --- certificates -------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    """(not_before, not_after) for a certificate valid ``days`` from now; ``days <= 0`` makes
    one that has already expired (for tests)."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if days > 0:
        return now - _BACKDATE, now + dt.timedelta(days=days)
    not_after = now + dt.timedelta(days=days) - dt.timedelta(minutes=1)
    return not_after - dt.timedelta(days=1), not_after


def init_ca(dir: Path | str, *, common_name: str = "skiff fleet CA", days: int = 3650, force: bool = False) -> Path:
    """Make a new CA in ``dir``: ``ca.pem`` and ``ca-key.pem``.  Refuses to replace an existing
    one unless ``force``.  Returns the directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    root = Path(dir)
    if not force:
        for name in (CA_CERT, CA_KEY):
            if (root / name).exists():
                raise CAExistsError(f"a CA already exists in {root} ({root / name}); use --force to replace it "
                                    "(certificates it issued will no longer be trusted)")
    if not common_name or len(common_name) > 64:
        raise InvalidNameError(f"invalid CA common name {common_name!r}: expected 1-64 characters")
    _mkdir(root)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(root / CA_KEY, _key_pem(key), 0o600)  # the key first: ca.pem existing implies a key
    _write(root / CA_CERT, _cert_pem(cert), 0o644)
    return root


def _load_ca(root: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path, key_path = root / CA_CERT, root / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CANotFoundError(f"no CA in {root}: {path} is missing (run `skiff ca init`, or pass --dir)")
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path))
    except ValueError as exc:
        raise CertificateFileError(f"{cert_path}: not a PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise CANotFoundError(f"{key_path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CANotFoundError(f"{key_path} does not match {cert_path}")
    return cert, key


def _issue(root: Path, subdir: Path, subject: x509.Name, extensions: Sequence[tuple[x509.ExtensionType, bool]],
           days: int) -> Path:
    """Sign a new key's certificate with the CA in ``root`` and write the three files to ``subdir``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    ca_cert, ca_key = _load_ca(root)
    key = _new_key()
    not_before, not_after = _validity(days)
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    cert = builder.sign(ca_key, hashes.SHA256())
    _mkdir(subdir.parent)
    _mkdir(subdir)
    _write(subdir / KEY, _key_pem(key), 0o600)
    _write(subdir / CERT, _cert_pem(cert), 0o644)
    _write(subdir / CA_CERT, _cert_pem(ca_cert), 0o644)
    return subdir


def issue_agent_cert(dir: Path | str, host: str, *, extra_names: Iterable[str] = (), days: int = 825) -> Path:
    """A server certificate for the agent on ``host`` (CN=host; SANs: host and ``extra_names``,
    each a DNS name or an IP address), in ``<dir>/agents/<host>/``.  Returns that directory."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    host = check_host(host)
    names: list[str] = []
    for name in (host, *(check_host(n) for n in extra_names)):
        if name not in names:
            names.append(name)
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    # CN is at most 64 characters; a longer host name lives in the SAN alone, which is then critical
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= 64 else []
    root = Path(dir)
    return _issue(root, root / AGENTS / host, x509.Name(attrs), [
        (x509.SubjectAlternativeName(sans), not attrs),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ], days)


def issue_client_cert(dir: Path | str, name: str, *, role: str, days: int = 825) -> Path:
    """A client certificate for ``name`` (CN=name, OU=role) in ``<dir>/clients/<name>/``.
    Returns that directory."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name, role = check_client_name(name), check_role(role)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    root = Path(dir)
    return _issue(root, root / CLIENTS / name, subject, [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ], days)


# --- reading certificates -------------------------------------------------------


def _load_cert(data: bytes) -> x509.Certificate:
    from cryptography import x509

    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def role_of(cert_pem_or_der: bytes) -> str | None:
    """The role a certificate carries (its subject's OU, when that is a role), or None, also for
    bytes that are not a certificate."""
    try:
        cert = _load_cert(cert_pem_or_der)
    except ValueError:
        return None
    return _role(cert)


def _role(cert: x509.Certificate) -> str | None:
    from cryptography.x509.oid import NameOID

    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    return next((str(u) for u in units if u in ROLES), None)


@dataclass(frozen=True)
class CertInfo:
    """What ``skiff ca show`` lists about one certificate."""

    path: Path
    kind: str  # "ca", "agent", "client" or "cert"
    subject: str
    common_name: str
    role: str | None
    sans: tuple[str, ...]
    not_after: dt.datetime
    serial: int
    is_ca: bool

    @property
    def expired(self) -> bool:
        return self.not_after <= dt.datetime.now(dt.UTC)


def _cert_file(path: Path) -> Path:
    """A certificate file, or the certificate in a CA or issued directory."""
    if path.is_dir():
        for name in (CERT, CA_CERT):
            if (path / name).is_file():
                return path / name
        raise CertificateFileError(f"no {CERT} or {CA_CERT} in {path}")
    return path


def describe(path: Path | str) -> CertInfo:
    """Subject, role, SANs, expiry and serial of the certificate at ``path`` (a PEM or DER file,
    or a directory holding ``cert.pem`` or ``ca.pem``)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    file = _cert_file(Path(path))
    try:
        cert = _load_cert(_read(file))
    except ValueError as exc:
        raise CertificateFileError(f"{file}: not a certificate") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple([f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
                     + [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)])
    except x509.ExtensionNotFound:
        sans = ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    parent = file.parent.parent.name
    kind = "ca" if is_ca else {AGENTS: "agent", CLIENTS: "client"}.get(parent, "cert")
    return CertInfo(path=file, kind=kind, subject=cert.subject.rfc4514_string(),
                    common_name=str(cns[0].value) if cns else "", role=_role(cert),
                    sans=sans, not_after=cert.not_valid_after_utc, serial=cert.serial_number, is_ca=is_ca)


def list_certs(dir: Path | str) -> list[CertInfo]:
    """The CA and every certificate issued into ``dir`` (agents, then clients, by name)."""
    root = Path(dir)
    if not (root / CA_CERT).is_file():
        raise CANotFoundError(f"no CA in {root}: {root / CA_CERT} is missing (run `skiff ca init`, or pass --dir)")
    out = [describe(root / CA_CERT)]
    for sub in (AGENTS, CLIENTS):
        base = root / sub
        if base.is_dir():
            out += [describe(d / CERT) for d in sorted(base.iterdir()) if (d / CERT).is_file()]
    return out
