"""The wire between skiffd and a container's shim, over the shim's unix socket.

Each connection starts with one request: a JSON object on one line
(``{"op": "state"}``).  Plain requests get one JSON line back.  Streaming
requests (``attach``, ``exec``, ``wait``) switch the connection to frames:
a 5-byte header (kind: 1 byte, length: 4 bytes big-endian) and the payload.

Kept to the standard library's light modules: the shim imports it.
"""

from __future__ import annotations

import json
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">BI")

# shim -> client
STDOUT = 1
STDERR = 2
EXIT = 3        # payload: JSON {"exit_code": n, "oom_killed": bool, "finished_at": ns, "error": str}
STARTED = 4     # payload: JSON {"pid": n} (exec sessions)
# client -> shim
STDIN = 10
CLOSE_STDIN = 11
RESIZE = 12     # payload: JSON {"rows": r, "cols": c}

MAX_FRAME = 1 << 20
MAX_REQUEST = 1 << 20

#: the socket's name inside the container's runtime directory
SOCKET = "shim.sock"
#: the exit record a finished shim leaves behind (JSON), read by a restarted agent
EXIT_FILE = "exit.json"
#: the shim's pid, for the agent to check it is alive
PID_FILE = "shim.pid"


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def json_frame(kind: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def request(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class FrameReader:
    """Incremental frame decoder: feed bytes, take complete frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out: list[tuple[int, bytes]] = []
        while len(self.buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self.buf)
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            end = HEADER.size + length
            if len(self.buf) < end:
                break
            out.append((kind, bytes(self.buf[HEADER.size:end])))
            del self.buf[:end]
        return out


def read_json_lines(fd: int, timeout: float) -> list[dict[str, Any]]:
    """JSON lines from a pipe until EOF or ``timeout`` (an init's or exec helper's sync pipe)."""
    import os
    import select
    import time

    buf = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    out = []
    for line in buf.splitlines():
        try:
            out.append(dict(json.loads(line)))
        except (ValueError, TypeError):  # not JSON, or JSON that is not an object
            out.append({"error": f"garbled message {line!r}", "stage": "sync"})
    return out
