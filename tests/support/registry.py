"""Run Debian's ``docker-registry`` (CNCF distribution 2.8) for tests.

    with Registry() as reg:                           # plain HTTP, no auth
        push(layout, "busybox", reg.ref("busybox:1"))
    with Registry(tls=True, basic_auth=True) as reg:  # test CA + htpasswd
        httpx.get(reg.url + "/v2/", verify=reg.ssl_context(), auth=reg.creds)
    with TokenServer() as ts, Registry(token_server=ts) as reg:
        ...                                           # Docker token auth

The registry listens on 127.0.0.1 only (or on ``address``, such as a test
bridge's), stores into its own directory and has delete enabled.  The config
file is written as JSON (YAML is a superset), and ``REGISTRY_*`` variables are
removed from the child's environment so the host cannot override it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support import ociimage
from tests.support.tokenserver import TokenServer

DOCKER_REGISTRY = "/usr/bin/docker-registry"
DEFAULT_USERNAME = "skiff"
DEFAULT_PASSWORD = "skiff-test-password"


class RegistryError(RuntimeError):
    """The registry failed to start (message carries the log tail)."""


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port on ``address`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def htpasswd_line(username: str, password: str) -> str:
    """A bcrypt htpasswd entry, via ``htpasswd -Bbn`` (apache2-utils)."""
    out = subprocess.run(["htpasswd", "-Bbn", username, password], check=True,
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() + "\n"


class Registry:
    """A ``docker-registry serve`` child process on 127.0.0.1:<free port> (or ``address``).

    Args:
        workdir: where config, data, certs and the log go (a private temp
            dir, removed on stop, when not given).
        tls: serve HTTPS with a trustme CA; the server cert is valid for
            127.0.0.1 and localhost.  See ``ca_pem_path`` / ``cert_dir``.
        basic_auth: htpasswd (bcrypt) auth with ``username`` / ``password``.
        token_server: Docker token auth against this running TokenServer.
        start_timeout: seconds to wait for ``/v2/`` to answer.
        address: the IPv4 address to listen on (127.0.0.1 unless given; a
            fleet lab passes its bridge's address so network namespaces
            behind the bridge reach the registry).
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, tls: bool = False,
                 basic_auth: bool = False, username: str = DEFAULT_USERNAME,
                 password: str = DEFAULT_PASSWORD, token_server: TokenServer | None = None,
                 start_timeout: float = 10.0, log_level: str = "info",
                 binary: str = DOCKER_REGISTRY, address: str = "127.0.0.1") -> None:
        if basic_auth and token_server is not None:
            raise ValueError("basic_auth and token_server are exclusive")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="skiff-test-registry-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.basic_auth = basic_auth
        self.username = username if basic_auth else ""
        self.password = password if basic_auth else ""
        self.token_server = token_server
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.binary = binary
        self.address = address
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.data_dir = self.workdir / "data"
        self.ca_pem_path: Path | None = None
        self.cert_dir: Path | None = None
        self._server_cert: Path | None = None
        self._server_key: Path | None = None
        self._htpasswd: Path | None = None

    # -- addresses -----------------------------------------------------------
    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def ref(self, name: str) -> str:
        """``ADDRESS:PORT/<name>`` (name may carry ``:tag`` / ``@digest``)."""
        return f"{self.host}/{name}"

    @property
    def creds(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.basic_auth else None

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What to pass as httpx ``verify=``: the test CA, or True for HTTP."""
        if self.ca_pem_path is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_pem_path))

    def client(self, *, auth: bool = True, timeout: float = 10.0) -> httpx.Client:
        """An httpx client on ``url`` trusting the test CA (and sending the
        basic-auth credentials when ``auth`` and the registry has them)."""
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), timeout=timeout,
                            auth=self.creds if (auth and self.creds) else None)

    # -- setup -------------------------------------------------------------
    def _prepare_tls(self) -> None:
        import trustme

        ca = trustme.CA(organization_name="skiff tests")
        cert = ca.issue_cert(*dict.fromkeys(("127.0.0.1", "localhost", self.address)))
        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(exist_ok=True)
        self.ca_pem_path = tls_dir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_pem_path))
        self._server_cert = tls_dir / "server.pem"
        self._server_key = tls_dir / "server.key"
        cert.private_key_pem.write_to_path(str(self._server_key))
        with open(self._server_cert, "wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        # skopeo/containers-image: *.crt files in a cert dir are CAs
        self.cert_dir = self.workdir / "certs.d"
        self.cert_dir.mkdir(exist_ok=True)
        shutil.copyfile(self.ca_pem_path, self.cert_dir / "ca.crt")

    def _config(self) -> dict[str, Any]:
        http: dict[str, Any] = {
            "addr": self.host,
            "secret": "skiff-test-secret",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls:
            http["tls"] = {"certificate": str(self._server_cert), "key": str(self._server_key)}
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": self.log_level, "accesslog": {"disabled": False},
                    "fields": {"service": "registry"}},
            "storage": {
                "cache": {"blobdescriptor": "inmemory"},
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.basic_auth:
            cfg["auth"] = {"htpasswd": {"realm": "skiff-test", "path": str(self._htpasswd)}}
        elif self.token_server is not None:
            ts = self.token_server
            cfg["auth"] = {"token": {"realm": ts.realm, "service": ts.service,
                                     "issuer": ts.issuer,
                                     "rootcertbundle": str(ts.root_cert_path)}}
        return cfg

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Registry:
        if self.proc is not None:
            return self
        if not os.path.exists(self.binary):
            raise RegistryError(f"{self.binary} not found (apt-get install docker-registry)")
        self.data_dir.mkdir(exist_ok=True)
        if self.tls and self.ca_pem_path is None:
            self._prepare_tls()
        if self.basic_auth and self._htpasswd is None:
            self._htpasswd = self.workdir / "htpasswd"
            self._htpasswd.write_text(htpasswd_line(self.username, self.password))
        last_error = ""
        for _attempt in range(3):
            self.port = free_port(self.address)
            self.config_path.write_text(json.dumps(self._config(), indent=2))
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "serve", str(self.config_path)], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, env=self._env(), cwd=self.workdir)
            ok, last_error = self._wait_ready()
            if ok:
                return self
            self._terminate()
            if "address already in use" not in self.log_tail(200):
                break
        tail = self.log_tail()
        self.stop()
        raise RegistryError(f"docker-registry on {self.host} did not come up: "
                            f"{last_error}\n--- registry log tail ---\n{tail}")

    def _wait_ready(self) -> tuple[bool, str]:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        err = "timeout"
        with httpx.Client(verify=self.ssl_context(), timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False, f"exited with status {self.proc.returncode}"
                try:
                    # any HTTP answer (200, or 401 with auth) means it is serving
                    client.get(self.url + "/v2/")
                    return True, ""
                except httpx.HTTPError as exc:
                    err = repr(exc)
                time.sleep(0.05)
        return False, f"/v2/ not answering after {self.start_timeout}s ({err})"

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def stop(self) -> None:
        """Terminate the registry (by PID) and remove a private workdir."""
        self._terminate()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- convenience -------------------------------------------------------
    def push(self, layout: str | os.PathLike[str] | ociimage.OciLayoutBuilder, tag: str,
             name: str, *, all_platforms: bool = False,
             creds: tuple[str, str] | None = None) -> str:
        """Push ``oci:<layout>:<tag>`` to ``<host>/<name>`` with this registry's
        TLS settings (and its basic-auth creds unless ``creds`` is given)."""
        ref = self.ref(name)
        ociimage.push(layout, tag, ref, creds=creds or self.creds, tls_verify=self.tls,
                      cert_dir=self.cert_dir, all_platforms=all_platforms)
        return ref

    def inspect_raw(self, name: str, *, creds: tuple[str, str] | None = None
                    ) -> dict[str, Any]:
        return ociimage.inspect_raw(self.ref(name), creds=creds or self.creds,
                                    tls_verify=self.tls, cert_dir=self.cert_dir)

    def __repr__(self) -> str:
        state = "running" if self.proc is not None else "stopped"
        return f"<Registry {self.url} {state} tls={self.tls} basic_auth={self.basic_auth} " \
               f"token={self.token_server is not None}>"
