"""Fixtures for integration tests: OCI layouts, real registries, fakes.

Every test in this directory is marked ``integration`` and skipped, with the
reason, unless we run as root and ``docker-registry`` and ``skopeo`` exist.

Session fixtures (built/started once, stopped at session end):

* ``oci_layout``     Path of an OCI layout holding the ready-made images under
  tags ``busybox``, ``multi``, ``zstd``, ``multiarch`` (see
  ``tests.support.ociimage``).
* ``oci_layout_big`` Path of a layout with only ``big`` (busybox + 4x30 MiB),
  built on first use (a few seconds).
* ``registry``       plain HTTP, no auth; holds ``busybox:1``, ``multi:1``
  (100 layers), ``zstd:1`` and ``multiarch:1`` (index, 3 platforms).
* ``tls_registry``   HTTPS with a test CA (``.ca_pem_path``, ``.cert_dir``,
  ``.ssl_context()``) and htpasswd basic auth (``.username``, ``.password``,
  ``.creds``); holds ``busybox:1``.
* ``token_server``   Docker token issuer (``.creds``, ``.requests``).
* ``token_registry`` registry using it; holds ``public/busybox:1`` (anonymous
  pull allowed) and ``private/busybox:1`` (needs ``token_server.creds``).
  ``token_server.requests`` is cleared once these are pushed.

Function fixture:

* ``hostile_registry`` a fresh, empty ``HostileRegistry`` per test.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support import ociimage  # noqa: E402
from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.hostile import HostileRegistry  # noqa: E402
from tests.support.registry import DOCKER_REGISTRY, Registry  # noqa: E402
from tests.support.tokenserver import TokenServer  # noqa: E402

_HERE = Path(__file__).resolve().parent

#: what the ``registry`` fixture holds: repository:tag -> (layout tag, --all)
REGISTRY_IMAGES: dict[str, tuple[str, bool]] = {
    "busybox:1": (ociimage.TAG_BUSYBOX, False),
    "multi:1": (ociimage.TAG_MULTI, False),
    "zstd:1": (ociimage.TAG_ZSTD, False),
    "multiarch:1": (ociimage.TAG_MULTIARCH, True),
}


def missing_requirements() -> list[str]:
    """Why the registry-backed tests cannot run here (empty when they can)."""
    missing: list[str] = []
    if not os.access(DOCKER_REGISTRY, os.X_OK):
        missing.append(f"{DOCKER_REGISTRY} missing (apt-get install docker-registry)")
    if shutil.which("skopeo") is None:
        missing.append("skopeo missing (apt-get install skopeo)")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _integration_requirements() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root (real namespaces, mounts, cgroups)")


def _need_registry_tools() -> None:
    missing = missing_requirements()
    if missing:
        pytest.skip("needs docker-registry and skopeo: " + "; ".join(missing))


@pytest.fixture(scope="session")
def oci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_registry_tools()
    path = tmp_path_factory.mktemp("oci-layout")
    ociimage.build_all(path)
    return path


@pytest.fixture(scope="session")
def oci_layout_big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_registry_tools()
    path = tmp_path_factory.mktemp("oci-layout-big")
    ociimage.build_big(path)
    return path


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, oci_layout: Path) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        for name, (tag, all_platforms) in REGISTRY_IMAGES.items():
            reg.push(oci_layout, tag, name, all_platforms=all_platforms)
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory,
                 oci_layout: Path) -> Iterator[Registry]:
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd missing (apt-get install apache2-utils)")
    with Registry(tmp_path_factory.mktemp("tls-registry"), tls=True, basic_auth=True) as reg:
        reg.push(oci_layout, ociimage.TAG_BUSYBOX, "busybox:1")
        yield reg


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    with TokenServer(workdir=tmp_path_factory.mktemp("token-server")) as ts:
        yield ts


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory, oci_layout: Path,
                   token_server: TokenServer) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("token-registry"), token_server=token_server) as reg:
        for name in ("public/busybox:1", "private/busybox:1"):
            reg.push(oci_layout, ociimage.TAG_BUSYBOX, name, creds=token_server.creds)
        token_server.clear_requests()
        yield reg


@pytest.fixture
def hostile_registry() -> Iterator[HostileRegistry]:
    with HostileRegistry() as reg:
        yield reg


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """A real skiffd shared by the tests of one module (private data, exec root and socket)."""
    proc = AgentProcess(tmp_path_factory.mktemp("agent"))
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture
def fresh_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """A real skiffd of this test's own."""
    proc = AgentProcess(tmp_path / "agent")
    try:
        yield proc.start()
    finally:
        proc.stop()
