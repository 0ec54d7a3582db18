"""Prometheus metrics and health endpoints for ``run`` and ``worker`` (``--metrics-port``).

``Metrics`` watches a run the way engine.RunObserver describes: it wraps each handler to time
every attempt and count retries and jobs in flight, and sees every result line. It keeps its own
CollectorRegistry, so nothing leaks in from (or out to) the process-wide default registry.

``serve()`` answers on an aiohttp.web server:

- ``/metrics``: the Prometheus text format.
- ``/healthz``: 200 while the event loop turns; a loop blocked for longer than
  ``STALL_SECONDS`` answers 503 once it runs again (and times out while it is blocked).
- ``/readyz``: 200 when every readiness check passes (the HTTP session is open; in worker mode,
  Redis is reachable, as the worker's own commands last found it), else 503 with the failing
  checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .errors import SetupError
from .results import Handler, Outcome

log = logging.getLogger("fetcher")

#  Attempt latency buckets, seconds: loopback milliseconds up to the default 30 s deadline.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
HEARTBEAT_SECONDS = 0.5
STALL_SECONDS = 5.0

Check = Callable[[], Awaitable[str | None]]
"""A readiness check: None when ready, else a short reason."""


class _TimedHandler:
    """Times each attempt of the handler it wraps; counts retries and jobs in flight."""

    def __init__(self, inner: Handler, kind: str, metrics: Metrics) -> None:
        self.inner = inner
        self._kind = kind
        self._metrics = metrics

    async def attempt(self, job: Any) -> Outcome:
        m = self._metrics
        active = m.active
        if job.id in active:
            m.retries.labels(self._kind).inc()
        else:
            active.add(job.id)
        t0 = time.perf_counter()
        try:
            return await self.inner.attempt(job)
        finally:
            m.attempt_seconds.labels(self._kind).observe(time.perf_counter() - t0)


class Metrics:
    """The metrics of one process. ``worker=True`` adds the queue and Redis series."""

    def __init__(self, *, worker: bool = False) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.active: set[str] = set()
        self.jobs = Counter(
            "fetcher_jobs",
            "Jobs finished, by kind and outcome (ok or the error type)",
            ["kind", "outcome"],
            registry=r,
        )
        self.in_flight = Gauge(
            "fetcher_jobs_in_flight", "Jobs started and not yet finished", registry=r
        )
        self.in_flight.set_function(lambda: len(self.active))
        self.retries = Counter(
            "fetcher_retries", "Attempts after a job's first", ["kind"], registry=r
        )
        self.attempt_seconds = Histogram(
            "fetcher_attempt_duration_seconds",
            "Wall time of one attempt, from its start to its outcome",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "fetcher_response_bytes",
            "Response body bytes received (after decompression)",
            registry=r,
        )
        self.loop_lag = Gauge(
            "fetcher_event_loop_lag_seconds", "How late the last loop heartbeat ran", registry=r
        )
        self.worker = worker
        if worker:
            self.queue_lag = Gauge(
                "fetcher_queue_lag_entries",
                "Job stream entries not yet delivered to the consumer group",
                registry=r,
            )
            self.queue_pending = Gauge(
                "fetcher_queue_pending_entries",
                "Job stream entries delivered to the group and not yet acknowledged",
                registry=r,
            )
            self.held = Gauge(
                "fetcher_worker_held_entries",
                "Entries this worker holds (read, not yet acknowledged)",
                registry=r,
            )
            self.claimed = Counter(
                "fetcher_claimed_entries", "Entries claimed from other consumers", registry=r
            )
            self.redis_up = Gauge(
                "fetcher_redis_up",
                "1 while Redis is reachable (0 from the failure that starts an outage to the "
                "first command that succeeds after it)",
                registry=r,
            )
            self.redis_errors = Counter(
                "fetcher_redis_errors",
                "Redis commands that failed (and were retried)",
                registry=r,
            )
        self._handlers: dict[str, Handler] = {}
        self._checks: list[tuple[str, Check]] = [("session", self._session_open)]
        self._lag = 0.0

    # -- engine.RunObserver ------------------------------------------------------------------

    def wrap(self, handlers: dict[str, Handler]) -> dict[str, Handler]:
        self._handlers = dict(handlers)
        return {kind: _TimedHandler(h, kind, self) for kind, h in handlers.items()}

    def result(self, result: dict[str, Any]) -> None:
        error = result.get("error")
        self.jobs.labels(result.get("kind") or "unknown", error["type"] if error else "ok").inc()
        self.active.discard(result["id"])
        size = result.get("bytes")
        if isinstance(size, int) and size > 0:
            self.bytes.inc(size)

    # -- readiness ---------------------------------------------------------------------------

    def add_check(self, name: str, check: Check) -> None:
        self._checks.append((name, check))

    async def _session_open(self) -> str | None:
        if not self._handlers:
            return "not started"
        for kind, handler in self._handlers.items():
            try:
                session = getattr(handler, "session", None)
            except RuntimeError:  # HttpHandler outside its `async with`
                return f"{kind} handler closed"
            if session is not None and session.closed:
                return f"{kind} session closed"
        return None

    async def failing(self) -> list[str]:
        """The readiness checks that fail, as ``name: reason``."""
        failed = []
        for name, check in self._checks:
            try:
                reason = await asyncio.wait_for(check(), 2.0)
            except Exception as exc:  # noqa: BLE001 - a check that breaks is a failing check
                reason = type(exc).__name__
            if reason is not None:
                failed.append(f"{name}: {reason}")
        return failed

    # -- serving -----------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        lag = self._lag
        if lag > STALL_SECONDS:
            return web.Response(status=503, text=f"event loop stalled for {lag:.1f} s\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        failed = await self.failing()
        if failed:
            return web.Response(status=503, text="\n".join(failed) + "\n")
        return web.Response(text="ready\n")

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + HEARTBEAT_SECONDS
            await asyncio.sleep(HEARTBEAT_SECONDS)
            self._lag = max(0.0, loop.time() - due)
            self.loop_lag.set(self._lag)

    @contextlib.asynccontextmanager
    async def serve(self, host: str, port: int) -> AsyncIterator[int]:
        """Serve the endpoints on ``host:port`` while the block runs; yields the bound port."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SetupError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        bound = int(runner.addresses[0][1]) if runner.addresses else port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        beat = asyncio.create_task(self._heartbeat(), name="fetcher-metrics-heartbeat")
        try:
            yield bound
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await runner.cleanup()


async def run_with_metrics(
    metrics: Metrics, host: str, port: int, work: Callable[[], Awaitable[int]]
) -> int:
    """Serve ``metrics`` while ``work()`` runs; returns its exit code."""
    async with metrics.serve(host, port):
        return await work()
