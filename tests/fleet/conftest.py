"""Fixtures for fleet tests: a lab of five hosts (see ``tests/fleet/lab.py``), each with its own
network and mount namespace, skiffd (unix socket and mutual-TLS TCP) and sshd.

Every test here is marked ``integration`` and skipped, with the reason, unless we run as root
and sshd, docker-registry, skopeo and iproute2 are installed.  Self-contained: nothing from
``tests/integration``'s fixtures is used.

* ``lab``  module-scoped :class:`~tests.fleet.lab.Lab` with hosts ``host1``..``host5``, all
  with agents, and the lab registry holding ``busybox:1``.  After the module its teardown must
  leave nothing behind (``Lab.leftovers()``).  After each test that used it, agents that the
  test left stopped, killed or frozen run again and containers it left are removed, so one
  failing test does not take the next ones down with it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.fleet.lab import Lab, missing_requirements

_HERE = Path(__file__).resolve().parent
LAB_HOSTS = 5


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _fleet_requirements() -> None:
    missing = missing_requirements()
    if missing:
        pytest.skip("the fleet lab needs " + "; ".join(missing))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab(LAB_HOSTS, tmp_path_factory.mktemp("fleet-lab")) as started:
        yield started
    left = started.leftovers()
    assert not left, "the lab left behind:\n" + "\n".join(left)


@pytest.fixture(autouse=True)
def _lab_usable_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "lab" not in request.fixturenames:
        return
    lab: Lab = request.getfixturevalue("lab")
    lab.restore()
