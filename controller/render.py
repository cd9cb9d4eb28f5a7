"""Human output: sizes and durations as docker prints them, and pull progress."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_DECIMAL = ("B", "kB", "MB", "GB", "TB", "PB")


def human_size(size: float, precision: int = 3) -> str:
    """docker's units.HumanSizeWithPrecision: decimal units, 3 significant digits (``4.26MB``)."""
    i = 0
    while size >= 1000 and i < len(_DECIMAL) - 1:
        size /= 1000.0
        i += 1
    return f"{size:.{precision}g}{_DECIMAL[i]}"


def human_duration(seconds: float) -> str:
    """docker's units.HumanDuration (``About a minute``, ``3 hours``, ``2 months``)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def ago(timestamp: float, now: float | None = None) -> str:
    if timestamp <= 0:
        return "N/A"
    return human_duration((now or time.time()) - timestamp) + " ago"


def progress_bar(current: int, total: int, width: int = 50) -> str:
    if total <= 0:
        return ""
    filled = min(width, int(width * current / total))
    arrow = ">" if filled < width else ""
    bar = "=" * max(0, filled - (1 if arrow else 0)) + arrow
    return f"[{bar:<{width}}] {human_size(current)}/{human_size(total)}"


class PullRenderer:
    """Docker-style per-layer lines; redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self, out: TextIO = sys.stdout, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.order: list[str] = []
        self.lines: dict[str, str] = {}
        self.last_status: dict[str, str] = {}
        self.drawn = 0

    def event(self, layer: str, status: str, current: int = 0, total: int = 0) -> None:
        if not layer:
            self._flush_line(status)
            return
        if layer not in self.lines:
            self.order.append(layer)
        text = f"{layer}: {status}"
        if status in ("Downloading", "Extracting") and total:
            text += " " + progress_bar(current, total)
        self.lines[layer] = text
        if self.tty:
            self._redraw()
        elif self.last_status.get(layer) != status:
            self.last_status[layer] = status
            self.out.write(f"{layer}: {status}\n")
            self.out.flush()

    def _flush_line(self, text: str) -> None:
        if self.tty and self.drawn:
            self._redraw()
            self.order, self.lines, self.drawn = [], {}, 0
        self.out.write(text + "\n")
        self.out.flush()

    def _redraw(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}A")
        for layer in self.order:
            self.out.write("\x1b[2K" + self.lines[layer] + "\n")
        self.drawn = len(self.order)
        self.out.flush()


class HostProgress:
    """``pull`` on many hosts: one line per host, redrawn in place on a terminal (at most ten times
    a second); elsewhere each host's line once, when it ends."""

    def __init__(self, hosts: list[str], out: TextIO = sys.stdout, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.hosts = hosts
        self.width = max((len(h) for h in hosts), default=0)
        self.text = {h: "Waiting" for h in hosts}
        self.layers: dict[str, dict[str, tuple[str, int, int]]] = {h: {} for h in hosts}
        self.drawn = 0
        self.last = 0.0

    def event(self, host: str, layer: str, status: str, current: int = 0, total: int = 0) -> None:
        if layer:
            self.layers[host][layer] = (status, current, total)
            layers = self.layers[host].values()
            done = sum(1 for st, _, _ in layers if st in ("Pull complete", "Already exists"))
            have = sum(c if st in ("Downloading", "Extracting") else t for st, c, t in layers)
            size = sum(t for _, _, t in layers)
            text = f"{status} {done}/{len(layers)} layers"
            if size:
                text += f" {human_size(have)}/{human_size(size)}"
            self.text[host] = text
        else:
            self.text[host] = status
        self._draw()

    def end(self, host: str, text: str) -> None:
        self.text[host] = text
        if self.tty:
            self._draw(force=True)
        else:
            self.out.write(f"{host:<{self.width}}  {text}\n")
            self.out.flush()

    def _draw(self, force: bool = False) -> None:
        import time

        now = time.monotonic()
        if not self.tty or (not force and now - self.last < 0.1):
            return
        self.last = now
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}A")
        for host in self.hosts:
            self.out.write(f"\x1b[2K{host:<{self.width}}  {self.text[host]}\n")
        self.drawn = len(self.hosts)
        self.out.flush()
