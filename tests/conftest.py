"""For every test: skiff's client zygotes (controller.zygote) live in a directory of this session's.

Every ``skiff`` a test runs goes through the zygote, as a user's would; the session ends the
zygotes it started and removes their directory.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support.zygotes import stop_strays, stop_zygotes  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def client_zygotes() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="skiff-clients-"))
    before = os.environ.get("SKIFF_CLIENT_DIR")
    os.environ["SKIFF_CLIENT_DIR"] = str(directory)
    try:
        yield directory
    finally:
        if before is None:
            os.environ.pop("SKIFF_CLIENT_DIR", None)
        else:
            os.environ["SKIFF_CLIENT_DIR"] = before
        stop_zygotes(directory)
        shutil.rmtree(directory, ignore_errors=True)
        stop_strays()
