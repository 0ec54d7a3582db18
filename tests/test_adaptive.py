"""Adaptive per-host concurrency against a local server that answers 429 past K requests in flight.

The server runs in the test's own event loop on 127.0.0.1 and a free port. The fetcher runs
through the library interface (``fetcher.Runner``), the same engine as ``fetcher run``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from fetcher.api import Runner
from fetcher.config import Settings

from .helpers import assert_valid_results

K = 4  # the server's capacity: requests in flight it serves; the next one gets a 429
CONCURRENCY = 16
JOBS = 240


@dataclass
class CappedServer:
    """Answers 200 after 20-50 ms, or 429 at once when more than ``capacity`` are in flight."""

    capacity: int
    retry_after: str | None = None
    retry_after_first_only: bool = False
    in_flight: int = 0
    # (arrival time, requests in flight counting this one, status answered)
    arrivals: list[tuple[float, int, int]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            now = time.monotonic()
            if self.in_flight > self.capacity or (
                self.retry_after_first_only and not self.arrivals
            ):
                self.arrivals.append((now, self.in_flight, 429))
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return web.Response(status=429, text="slow down\n", headers=headers)
            self.arrivals.append((now, self.in_flight, 200))
            await asyncio.sleep(self.rng.uniform(0.02, 0.05))
            return web.Response(text="ok\n")
        finally:
            self.in_flight -= 1

    def count(self, status: int) -> int:
        return sum(1 for _, _, s in self.arrivals if s == status)

    def max_in_flight_second_half(self) -> int:
        first, last = self.arrivals[0][0], self.arrivals[-1][0]
        middle = first + (last - first) / 2
        return max(n for t, n, _ in self.arrivals if t >= middle)


async def serve(server: CappedServer) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def capped() -> AsyncIterator[tuple[CappedServer, str]]:
    server = CappedServer(capacity=K)
    async for url in serve(server):
        yield server, url


async def run_jobs(url: str, n: int, **settings: Any) -> list[Any]:
    s = Settings(
        concurrency=settings.pop("concurrency", CONCURRENCY),
        retries=settings.pop("retries", 4),
        backoff_base=0.05,
        backoff_max=0.5,
        timeout=10,
        **settings,
    )
    jobs = [{"id": str(i), "url": f"{url}/item/{i}"} for i in range(n)]
    async with Runner(s) as runner:
        results = [r async for r in runner.run(jobs)]
    assert_valid_results(results)
    return results


def summary(server: CappedServer, results: list[Any]) -> str:
    return (
        f"max in flight (2nd half) {server.max_in_flight_second_half()}, "
        f"429s {server.count(429)}, 200s {server.count(200)}, "
        f"failed jobs {sum(1 for r in results if not r.ok)}"
    )


async def test_adaptive_converges_to_the_server_capacity_with_few_429s(
    capped: tuple[CappedServer, str],
) -> None:
    server, url = capped
    results = await run_jobs(url, JOBS, adaptive=True)
    adaptive = summary(server, results)
    adaptive_429 = server.count(429)
    adaptive_max = server.max_in_flight_second_half()
    adaptive_failed = sum(1 for r in results if not r.ok)

    plain_server = CappedServer(capacity=K)
    async for plain_url in serve(plain_server):
        plain_results = await run_jobs(plain_url, JOBS, adaptive=False)
    plain = summary(plain_server, plain_results)
    print(f"\nadaptive: {adaptive}\nplain:    {plain}")

    assert len(results) == JOBS == len(plain_results)
    assert server.count(200) == JOBS  # every job done, once
    assert adaptive_failed == 0, adaptive
    # Converged to about K: above K only while probing for more room, and not collapsed below.
    assert K - 1 <= adaptive_max <= K + 2, adaptive
    # Few 429s, where the same run without the controller earns many.
    assert adaptive_429 <= JOBS // 4, adaptive
    assert plain_server.count(429) >= 4 * max(adaptive_429, 10), f"{adaptive} / {plain}"


async def test_adaptive_respects_per_host_as_its_ceiling(
    capped: tuple[CappedServer, str],
) -> None:
    server, url = capped
    results = await run_jobs(url, 40, adaptive=True, per_host=2)
    assert all(r.ok for r in results)
    assert server.count(429) == 0
    assert max(n for _, n, _ in server.arrivals) <= 2


async def test_retry_after_pauses_every_job_to_the_host() -> None:
    # The first request gets "429, Retry-After: 1"; the other jobs to the host must wait too.
    server = CappedServer(capacity=100, retry_after="1", retry_after_first_only=True)
    async for url in serve(server):
        results = await run_jobs(url, 6, adaptive=True, concurrency=2)
    assert all(r.ok for r in results)
    t429 = next(t for t, _, s in server.arrivals if s == 429)
    # The job sent alongside the first went out before the 429 came back; every later one
    # (the retried job included) waited for the pause.
    later = [t - t429 for t, _, s in server.arrivals[2:]]
    assert len(later) == 5
    assert min(later) >= 0.9, later


async def test_without_adaptive_retry_after_holds_back_only_its_own_job() -> None:
    server = CappedServer(capacity=100, retry_after="1", retry_after_first_only=True)
    async for url in serve(server):
        results = await run_jobs(url, 6, adaptive=False, concurrency=2)
    assert all(r.ok for r in results)
    t429 = next(t for t, _, s in server.arrivals if s == 429)
    early = [t - t429 for t, _, s in server.arrivals[2:] if t - t429 < 0.5]
    assert early  # other jobs went on at once
