"""Operation ids: a mutating call retried after its answer was lost is answered, not done again.

The controller numbers the unary calls of one host's work (metadata
``skiff-operation-id``: ``RUN/HOST-URL/N``) and repeats the same ids when it
retries that host.  The agent remembers each mutating call's answer for ten
minutes: a repeat while the first is still running waits for it; a repeat after
it succeeded gets the same answer; a call that failed is forgotten, so trying
again does it again.  Memory only: a restarted agent has forgotten, which
matches the controller's retries (seconds apart, within one command).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

HEADER = "skiff-operation-id"
TTL_SECONDS = 600.0
LIMIT = 10_000


class Operations:
    def __init__(self, ttl: float = TTL_SECONDS, limit: int = LIMIT) -> None:
        self.ttl = ttl
        self.limit = limit
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (expires, future) = next(iter(self._entries.items()))
            if expires > now and len(self._entries) <= self.limit:
                break
            if not future.done() and expires > now:
                break  # still running: keep it, even over the limit
            del self._entries[key]

    async def run(self, key: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()``'s answer, or the answer already given (or being given) for ``key``."""
        now = time.monotonic()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            return await asyncio.shield(entry[1])
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._entries[key] = (now + self.ttl, future)
        try:
            result = await call()
        except BaseException as exc:
            self._entries.pop(key, None)
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        future.set_result(result)
        return result


def operation_id(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == HEADER and value:
            return str(value)[:256]
    return None
