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
