"""Ending the skiff client zygotes (controller.zygote) that tests and benchmarks start."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def zygote_pids(directory: Path) -> list[int]:
    """The live zygotes whose pid files are in ``directory`` (a ``$SKIFF_CLIENT_DIR``)."""
    pids = []
    for pidfile in directory.glob("client-*.sock.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"controller.zygote" in cmdline and not _zombie(pid):
            pids.append(pid)
    return pids


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def stop_zygotes(directory: Path, timeout: float = 5.0) -> list[int]:
    """SIGTERM every zygote of ``directory`` and wait for each to be gone; the pids ended."""
    return _end(zygote_pids(directory), timeout)


def _end(pids: list[int], timeout: float) -> list[int]:
    """SIGTERM ``pids`` and wait until each is gone (a zombie counts: nothing may reap it here)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while not _zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            os.waitpid(pid, os.WNOHANG)  # ours only when started by this process
        except ChildProcessError:
            pass
    return pids


def _start_ticks(pid: int | str) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def stop_strays(timeout: float = 5.0) -> list[int]:
    """End zygotes of this interpreter in the default directories ($XDG_RUNTIME_DIR/skiff,
    /tmp/skiff-UID) that started after this process: a test that ran skiff without
    ``$SKIFF_CLIENT_DIR`` started them."""
    since = _start_ticks("self")
    directories = [Path(f"/tmp/skiff-{os.getuid()}")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        directories.append(Path(os.environ["XDG_RUNTIME_DIR"], "skiff"))
    strays = []
    for directory in directories:
        for pid in zygote_pids(directory):
            try:
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                if argv0 == sys.executable and _start_ticks(pid) >= since:
                    strays.append(pid)
            except (OSError, IndexError, ValueError):
                continue
    return _end(strays, timeout)
