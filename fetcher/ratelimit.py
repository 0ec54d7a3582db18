"""Per-key politeness: a cap on concurrent attempts and a request rate, keyed by host or profile.

Both tables hold entries only for keys in use, so a run over a million hosts does not keep a
million semaphores or timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
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


# Server signals that say "too much, slow down". Other error statuses (404, 500, ...) are answers
# about the request, not about load, and count as a success for the controller.
PRESSURE_STATUSES = frozenset({429, 503})
# Error types (docs/results.md) that a struggling server typically causes: refused or reset
# connections and deadlines. dns, tls, blocked and the rest say nothing about load and are ignored.
PRESSURE_ERRORS = frozenset({"connect", "timeout"})


class _Host:
    """The controller state of one key. Plain slots: one of these per key in use."""

    __slots__ = (
        "base",
        "cut_at",
        "in_flight",
        "last_used",
        "limit",
        "next_start",
        "paused_until",
        "srtt",
        "users",
        "w_max",
        "waiters",
    )

    def __init__(self, limit: float) -> None:
        self.limit = limit  # the window: at most int(limit) attempts in flight
        self.in_flight = 0
        self.users = 0  # holders plus waiters: the entry is dropped only when idle
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.paused_until = 0.0  # Retry-After: no start before this time
        self.next_start = 0.0  # pacing: no start before this time
        self.cut_at = -math.inf  # time of the last decrease
        self.w_max = 0.0  # the window at the last decrease: growth slows near it
        self.srtt = 0.0  # smoothed latency of successful attempts
        self.base = 0.0  # a slowly rising floor of that latency: the unloaded latency
        self.last_used = 0.0


class AdaptiveSlots:
    """Per-key concurrency that follows the server: AIMD on overload signals.

    Each key starts with a window of ``ceiling`` (``--per-host``, or the global concurrency when
    that is 0), so a healthy host runs exactly as it would without the controller. After each
    attempt the caller reports what happened with :meth:`feedback`:

    - pressure (429, 503, a Retry-After, a refused/reset connection, a timeout) multiplies the
      window by ``BETA``, at most once per round trip: signals from attempts that started before
      the last decrease describe the old window and are ignored, as TCP does with losses;
    - a Retry-After also pauses the whole key until then, so the other jobs to that host wait
      instead of earning 429s of their own;
    - a success grows the window by one per window's worth of successes (additive increase),
      but only while the window is in use and latency has not risen well above its floor
      (rising latency is the server queueing: the first sign of overload, before any 429);
      near the window of the last decrease it grows ``PROBE`` times slower, so a host whose
      limit has been found is probed rarely instead of once every few round trips;
    - while the window is below the ceiling, starts are paced ``srtt / window`` apart, which
      spreads the window over a round trip instead of sending it in bursts.

    Entries exist for keys in use and for keys still below their ceiling or paused; the latter
    are forgotten ``FORGET_AFTER`` seconds after their last use. ``clock`` and ``sleep`` can be
    injected for tests.
    """

    BETA = 0.7
    PROBE = 8.0
    LATENCY_FACTOR = 2.0
    FORGET_AFTER = 300.0
    PRUNE_EVERY = 10_000
    #  At most this many keys keep learned state (a few hundred bytes each) however many hosts
    #  a run touches within FORGET_AFTER: past it, the least recently used idle ones go first.
    MAX_KEYS = 20_000

    def __init__(
        self,
        ceiling: int,
        *,
        max_pause: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if ceiling < 1:
            raise ValueError("ceiling must be >= 1")
        self.ceiling = ceiling
        self.max_pause = max_pause
        self._hosts: dict[str, _Host] = {}
        self._clock = clock
        self._sleep = sleep
        self._calls = 0

    async def acquire(self, key: str) -> None:
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(float(self.ceiling))
        host.users += 1
        self._calls += 1
        if self._calls % self.PRUNE_EVERY == 0:
            self._prune()
        try:
            await self._take_slot(host)
        except BaseException:
            self._leave(key, host)
            raise
        try:
            await self._wait_turn(host)
        except BaseException:
            self.release(key)
            raise

    async def _take_slot(self, host: _Host) -> None:
        if not host.waiters and host.in_flight < max(1, int(host.limit)):
            host.in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        host.waiters.append(waiter)
        try:
            await waiter  # _wake hands the slot over: in_flight already counts this attempt
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                host.in_flight -= 1  # handed a slot, then cancelled: pass it on
                self._wake(host)
            else:
                with contextlib.suppress(ValueError):
                    host.waiters.remove(waiter)
            raise

    async def _wait_turn(self, host: _Host) -> None:
        # Loop, not one sleep: a Retry-After that arrives meanwhile moves the time again.
        while True:
            now = self._clock()
            start = max(host.paused_until, host.next_start)
            if start <= now:
                break
            await self._sleep(start - now)
        if host.limit < self.ceiling and host.srtt:
            host.next_start = now + host.srtt / host.limit

    def release(self, key: str) -> None:
        host = self._hosts[key]
        host.in_flight -= 1
        self._wake(host)
        self._leave(key, host)

    def _wake(self, host: _Host) -> None:
        limit = max(1, int(host.limit))
        while host.waiters and host.in_flight < limit:
            waiter = host.waiters.popleft()
            if not waiter.done():
                host.in_flight += 1
                waiter.set_result(None)

    def _leave(self, key: str, host: _Host) -> None:
        host.users -= 1
        if host.users:
            return
        now = self._clock()
        if host.limit >= self.ceiling and host.paused_until <= now:
            del self._hosts[key]  # nothing learned worth keeping
        else:
            host.last_used = now
            if len(self._hosts) > self.MAX_KEYS:
                self._prune()

    def _prune(self) -> None:
        now = self._clock()
        old = now - self.FORGET_AFTER
        hosts = {
            k: h
            for k, h in self._hosts.items()
            if h.users or (h.last_used > old or h.paused_until > now)
        }
        if len(hosts) > self.MAX_KEYS:
            idle = sorted((h.last_used, k) for k, h in hosts.items() if not h.users)
            for _, k in idle[: len(hosts) - self.MAX_KEYS // 2]:
                del hosts[k]
        self._hosts = hosts

    def feedback(
        self,
        key: str,
        *,
        status: int | None = None,
        error: str | None = None,
        retry_after: float | None = None,
        latency: float = 0.0,
    ) -> None:
        """Report one attempt to ``key``: call it after the attempt, before ``release``.

        ``status`` is the response status (None without a response), ``error`` its error type
        (docs/results.md; None when ok), ``retry_after`` the server's Retry-After in seconds,
        ``latency`` the seconds the attempt took.
        """
        host = self._hosts.get(key)
        if host is None:
            return
        now = self._clock()
        if retry_after is not None and retry_after > 0:
            host.paused_until = max(host.paused_until, now + min(retry_after, self.max_pause))
        if status in PRESSURE_STATUSES or retry_after is not None or error in PRESSURE_ERRORS:
            if now - latency >= host.cut_at:  # started after the last cut: news, not an echo
                host.w_max = min(host.limit, float(max(host.in_flight, 1)))
                host.limit = max(1.0, host.w_max * self.BETA)
                host.cut_at = now
            return
        if status is None:
            return  # a failure that says nothing about load
        if host.srtt:
            host.srtt += (latency - host.srtt) / 8
            host.base = min(latency, host.base + (latency - host.base) / 64)
        else:
            host.srtt = host.base = latency
        limit = host.limit
        if (
            limit >= self.ceiling
            or host.in_flight < int(limit)  # window not in use: growing it proves nothing
            or host.srtt > self.LATENCY_FACTOR * host.base
        ):
            return
        step = 1.0 / limit
        if host.w_max - 1.0 <= limit < host.w_max + 1.0:
            step /= self.PROBE
        host.limit = min(float(self.ceiling), limit + step)
        self._wake(host)

    def limit(self, key: str) -> float:
        """The current window of ``key`` (the ceiling for a key with no entry)."""
        host = self._hosts.get(key)
        return float(self.ceiling) if host is None else host.limit

    def __len__(self) -> int:
        return len(self._hosts)
