"""``skiff logs`` end to end: the real CLI against a real skiffd, the shim's json-file log.

Every test leaves no container, mount, cgroup or process behind (the
``clean`` fixture of test_containers.py counts them before and after).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from tests.integration.test_containers import clean, image  # busybox pulled; nothing left behind
from tests.support.agent import BIN, AgentProcess

#: what ``logs -t`` puts before each line: docker's RFC3339Nano with a fixed 9-digit fraction
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z) (.*)$")

__all__ = ["clean", "image"]  # the fixtures of test_containers.py, shared


def _inspect(agent: AgentProcess, name: str) -> dict:
    return json.loads(agent.ok("inspect", "--type", "container", name))[0]


def _follow(agent: AgentProcess, *args: str) -> subprocess.Popen[bytes]:
    """``skiff logs -f …`` in the background (stdout and stderr captured)."""
    return subprocess.Popen([str(BIN / "skiff"), "logs", "-f", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "SKIFF_HOST": agent.host})


def _numbers(text: str) -> list[int]:
    return [int(line) for line in text.splitlines()]


def _gaps(numbers: list[int]) -> str:
    gaps = [(a, b) for a, b in zip(numbers, numbers[1:]) if b != a + 1]
    return f"{len(numbers)} lines, {len(gaps)} gaps, the first ones: {gaps[:5]}"


def test_logs_of_a_finished_container_keep_stdout_and_stderr_apart(agent: AgentProcess, image: str,
                                                                    clean: None) -> None:
    agent.ok("run", "--name", "done", image, "sh", "-c", "echo o1; echo e1 >&2; echo o2; echo e2 >&2")
    logs = agent.cli("logs", "done")
    assert logs.code == 0, logs.err
    assert logs.out == "o1\no2\n"
    assert logs.err == "e1\ne2\n"


def test_timestamps_tail_since_and_until(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "--name", "counted", image, "sh", "-c",
             "for i in 1 2 3 4 5 6; do echo $i; sleep 0.05; done")
    stamped = agent.ok("logs", "-t", "counted").splitlines()
    assert len(stamped) == 6
    stamps = []
    for i, line in enumerate(stamped, 1):
        m = _STAMP.match(line)
        assert m, f"not an RFC3339Nano prefix: {line!r}"
        assert m[2] == str(i)
        stamps.append(m[1])
    assert stamps == sorted(stamps) and len(set(stamps)) == 6

    assert agent.ok("logs", "--tail", "3", "counted") == "4\n5\n6\n"
    assert agent.ok("logs", "-n", "1", "counted") == "6\n"
    assert agent.ok("logs", "--tail", "0", "counted") == ""
    assert agent.ok("logs", "--tail", "100", "counted") == "1\n2\n3\n4\n5\n6\n"

    # both bounds are inclusive, as in docker
    assert agent.ok("logs", "--since", stamps[2], "counted") == "3\n4\n5\n6\n"
    assert agent.ok("logs", "--until", stamps[1], "counted") == "1\n2\n"
    assert agent.ok("logs", "--since", stamps[1], "--until", stamps[3], "counted") == "2\n3\n4\n"
    assert agent.ok("logs", "--since", "1h", "counted") == "1\n2\n3\n4\n5\n6\n"
    assert agent.ok("logs", "--until", "1h", "counted") == ""


def test_follow_returns_after_the_container_exits(agent: AgentProcess, image: str, clean: None) -> None:
    agent.ok("run", "-d", "--name", "ticker", image, "sh", "-c",
             "i=1; while [ $i -le 20 ]; do echo line $i; i=$((i+1)); sleep 0.1; done")
    started = time.monotonic()
    follow = agent.cli("logs", "-f", "ticker", timeout=30)
    elapsed = time.monotonic() - started
    assert follow.code == 0, follow.err
    assert follow.out == "".join(f"line {i}\n" for i in range(1, 21))
    assert elapsed < 15
    assert _inspect(agent, "ticker")["State"]["Status"] == "exited"


def test_rotation_keeps_at_most_max_file_files_and_a_contiguous_suffix(agent: AgentProcess, image: str,
                                                                        clean: None) -> None:
    result = agent.cli("run", "--name", "rotor", "--log-opt", "max-size=10k", "--log-opt", "max-file=3",
                       image, "seq", "20000")
    assert result.code == 0, result.err
    assert _numbers(result.out) == list(range(1, 20001))
    log_path = Path(_inspect(agent, "rotor")["LogPath"])
    files = sorted(p.name for p in log_path.parent.iterdir() if p.name.startswith(log_path.name))
    assert log_path.name in files
    assert len(files) <= 3, files
    assert set(files) <= {log_path.name, f"{log_path.name}.1", f"{log_path.name}.2"}
    for name in files:
        assert (log_path.parent / name).stat().st_size <= 10 * 1024
    numbers = _numbers(agent.ok("logs", "rotor"))
    assert numbers, "rotation left nothing to read"
    assert numbers[-1] == 20000
    assert numbers == list(range(numbers[0], 20001)), "not a contiguous suffix"
    assert len(numbers) > 100  # more than one file's worth survives
    assert _numbers(agent.ok("logs", "--tail", "5", "rotor")) == list(range(19996, 20001))


def test_follow_across_rotations_paced(agent: AgentProcess, image: str, clean: None) -> None:
    """A writer a follower can keep up with: many rotations, every line exactly once."""
    script = ("sleep 1; i=0; while [ $i -lt 80 ]; do seq $((i*50+1)) $((i*50+50)); i=$((i+1)); "
              "sleep 0.02; done")  # a rotation every ~3 batches: far fewer than max-file per poll
    agent.ok("run", "-d", "--name", "paced", "--log-opt", "max-size=10k", "--log-opt", "max-file=3",
             image, "sh", "-c", script)
    follow = _follow(agent, "paced")
    try:
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 0, err.decode()
    assert _numbers(out.decode()) == list(range(1, 4001)), _gaps(_numbers(out.decode()))
    assert _numbers(agent.ok("logs", "paced"))[0] > 1  # the early files were rotated away meanwhile


def test_follow_during_a_rotating_flood(agent: AgentProcess, image: str, clean: None) -> None:
    """``logs -f`` started before a flood of numbered lines with rotation.

    docker does not promise every line here: a writer may rotate a file away
    (max-file) before a follower reaches it, and moby's follower then logs
    "file rotations were missed while following logs; some log messages have
    been skipped over".  What it does promise: the first file whole, then
    lines in order, never twice, up to the last one; and ``logs`` afterwards
    is a contiguous suffix.  (``test_follow_across_rotations_paced`` checks
    every line when the follower can keep up.)
    """
    agent.ok("run", "-d", "--name", "flood", "--log-opt", "max-size=10k", "--log-opt", "max-file=3",
             image, "sh", "-c", "sleep 1; seq 20000")
    follow = _follow(agent, "flood")
    try:
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 0, err.decode()
    numbers = _numbers(out.decode())
    assert numbers == sorted(set(numbers)), "duplicates or out of order"
    assert numbers[:100] == list(range(1, 101)), _gaps(numbers)  # the first file (~140 lines) whole
    assert numbers[-1] == 20000, _gaps(numbers)
    after = _numbers(agent.ok("logs", "flood"))
    assert after == list(range(after[0], 20001))
    assert set(after) <= set(numbers), "the follower skipped lines that were still on disk at the end"


def test_a_flood_without_detach_loses_no_line(agent: AgentProcess, image: str, clean: None) -> None:
    result = agent.cli("run", "--name", "seq", image, "seq", "500000", timeout=120)
    assert result.code == 0, result.err
    expected = "".join(f"{i}\n" for i in range(1, 500001))
    assert result.out == expected
    logs = agent.cli("logs", "seq", timeout=120)
    assert logs.code == 0, logs.err
    assert logs.out == expected


def test_a_100_kib_line_comes_back_whole(agent: AgentProcess, image: str, clean: None) -> None:
    expected = "a" * 102400 + "\n"
    result = agent.cli("run", "--name", "long", image, "sh", "-c", "head -c 102400 /dev/zero | tr '\\0' a; echo")
    assert result.code == 0, result.err
    assert result.out == expected
    assert agent.ok("logs", "long") == expected


def test_unknown_log_opt_is_refused(agent: AgentProcess, image: str, clean: None) -> None:
    result = agent.cli("run", "--rm", "--log-opt", "foo=bar", image, "true")
    assert result.code == 125, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "foo" in result.err
    assert agent.ok("ps", "-aq") == ""


def test_logs_of_an_unknown_container(agent: AgentProcess, clean: None) -> None:
    result = agent.cli("logs", "no-such-container")
    assert result.code != 0
    assert result.out == ""
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "no-such-container" in result.err
