"""Output of many hosts interleaved line by line, each line headed by its host (compose-style).

Lines are written whole, as they complete, so two hosts never mix within a
line; on a terminal each host's head gets a colour of its own.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

#: one colour per host, as compose gives one per service
COLOURS = (36, 33, 32, 35, 34, 31, 96, 93, 92, 95, 94, 91)


class Prefixer:
    def __init__(self, labels: list[str], colour: bool | None = None) -> None:
        self.labels = labels
        self.width = max((len(label) for label in labels), default=0)
        self.colour = sys.stdout.isatty() if colour is None else colour

    def head(self, label: str) -> bytes:
        text = f"{label:<{self.width}} | "
        if self.colour:
            index = self.labels.index(label) if label in self.labels else 0
            text = f"\x1b[{COLOURS[index % len(COLOURS)]}m{text}\x1b[0m"
        return text.encode()

    def lines(self, label: str) -> HostLines:
        return HostLines(self.head(label))


class HostLines:
    """One host's stdout and stderr, cut into prefixed lines."""

    def __init__(self, head: bytes, out: BinaryIO | None = None, err: BinaryIO | None = None) -> None:
        self.head = head
        self.out = out or sys.stdout.buffer
        self.err = err or sys.stderr.buffer
        self.partial = {False: b"", True: b""}
        self.count = 0

    def feed(self, data: bytes, *, stderr: bool = False, stamp: bytes = b"") -> None:
        *complete, self.partial[stderr] = (self.partial[stderr] + data).split(b"\n")
        target = self.err if stderr else self.out
        for line in complete:
            target.write(self.head + stamp + line + b"\n")
            self.count += 1
        if complete:
            target.flush()

    def close(self) -> None:
        """The last line of each stream, when it had no newline."""
        for stderr, rest in self.partial.items():
            if rest:
                target = self.err if stderr else self.out
                target.write(self.head + rest + b"\n")
                target.flush()
                self.count += 1
        self.partial = {False: b"", True: b""}
