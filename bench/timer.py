"""Whole-process timing for benchmarks: N runs of a command, wall and child CPU, medians."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Timing:
    label: str
    walls: list[float]
    cpus: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpus)

    @property
    def p90(self) -> float:
        if len(self.walls) < 2:
            return max(self.walls)
        return statistics.quantiles(self.walls, n=10, method="inclusive")[-1]

    def summary(self) -> dict[str, float | int | str]:
        return {"label": self.label, "n": len(self.walls), "median_s": self.median, "p90_s": self.p90,
                "min_s": min(self.walls), "max_s": max(self.walls), "cpu_median_s": self.cpu_median}

    def line(self) -> str:
        return (f"{self.label:<44} median {self.median * 1000:8.1f} ms  min {min(self.walls) * 1000:8.1f}"
                f"  max {max(self.walls) * 1000:8.1f}  cpu {self.cpu_median * 1000:8.1f} ms  (n={len(self.walls)})")


def run_once(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"{' '.join(cmd)} exited {code}: {err.strip()[-500:]}")
    if proc.stderr:
        proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def bench(label: str, cmd: Sequence[str], n: int, *, before: Callable[[], None] | None = None,
          after: Callable[[], None] | None = None, warmup: int = 1,
          env: dict[str, str] | None = None) -> Timing:
    walls: list[float] = []
    cpus: list[float] = []
    for i in range(warmup + n):
        if before:
            before()
        wall, cpu = run_once(cmd, env)
        if after:
            after()
        if i >= warmup:
            walls.append(wall)
            cpus.append(cpu)
    return Timing(label, walls, cpus)


@dataclass
class Case:
    """One command of an interleaved benchmark; ``cmd`` gets the run index (-warmup..n-1)."""

    label: str
    cmd: Callable[[int], Sequence[str]]
    env: dict[str, str] | None = None
    after: Callable[[int], None] | None = None


def interleave(cases: Sequence[Case], n: int, warmup: int = 2) -> list[Timing]:
    """Round-robin runs: round i runs every case once, starting at a different case each
    round, so machine drift (and cache state left by the previous tool) hits all equally."""
    timings = [Timing(case.label, [], []) for case in cases]
    for i in range(-warmup, n):
        for k in range(len(cases)):
            j = (i + k) % len(cases)
            case = cases[j]
            wall, cpu = run_once(case.cmd(i), case.env)
            if case.after:
                case.after(i)
            if i >= 0:
                timings[j].walls.append(wall)
                timings[j].cpus.append(cpu)
    return timings
