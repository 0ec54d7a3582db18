"""Per-key politeness: a cap on concurrent attempts and a request rate, keyed by host or profile.

Both tables hold entries only for keys in use, so a run over a million hosts does not keep a
million semaphores or timestamps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class KeyedSlots:
    """At most ``limit`` holders per key at once (``limit`` 0: no cap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sems: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    async def acquire(self, key: str) -> None:
        if not self.limit:
            return
        entry = self._sems.get(key)
        if entry is None:
            entry = self._sems[key] = (asyncio.Semaphore(self.limit), [0])
        entry[1][0] += 1  # users: holders plus waiters, so the entry is dropped only when idle
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave(key, entry)
            raise

    def release(self, key: str) -> None:
        if not self.limit:
            return
        entry = self._sems[key]
        entry[0].release()
        self._leave(key, entry)

    def _leave(self, key: str, entry: tuple[asyncio.Semaphore, list[int]]) -> None:
        entry[1][0] -= 1
        if not entry[1][0]:
            del self._sems[key]

    def __len__(self) -> int:
        return len(self._sems)


class KeyedRate:
    """Spaces starts per key ``1/rate`` seconds apart (a token bucket of depth one).

    Each key keeps only the time its next start is allowed; keys whose time has passed are
    forgotten now and then.
    """

    PRUNE_EVERY = 10_000

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._next: dict[str, float] = {}
        self._clock = clock
        self._sleep = sleep
        self._calls = 0

    async def acquire(self, key: str) -> None:
        if not self.interval:
            return
        now = self._clock()
        start = max(now, self._next.get(key, now))
        self._next[key] = start + self.interval
        self._calls += 1
        if self._calls % self.PRUNE_EVERY == 0:
            self._next = {k: t for k, t in self._next.items() if t > now}
        if start > now:
            await self._sleep(start - now)

    def __len__(self) -> int:
        return len(self._next)
