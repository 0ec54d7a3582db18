"""The worker pool: a fixed set of tasks draining one bounded queue, with retries and backoff.

The pool knows nothing of HTTP or mail. It is given a handler per job kind (``Handler``), runs one
attempt at a time through it, retries what the handler marks retryable, and hands every finished
job's result to ``emit``. Memory is bounded by the queue (``concurrency`` jobs) plus the jobs in
flight, whatever the size of the input.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import JobError
from .results import Handler, Outcome, ResultLine, ran
from .timeutil import utc_now_iso

log = logging.getLogger("fetcher")


class PoolJob(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def retries(self) -> int | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rand: Callable[[], float]) -> float:
        """Seconds to wait before attempt ``attempt + 1``: Retry-After when given, capped,
        otherwise exponential backoff with full jitter."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max)
        return float(rand() * min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1)))


@dataclass(slots=True)
class PoolCounters:
    in_flight: int = 0
    retries: int = 0
    started: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class Pool:
    def __init__(
        self,
        *,
        handlers: Mapping[str, Handler],
        emit: Callable[[ResultLine], Awaitable[None] | None],
        concurrency: int,
        policy: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        fields: Collection[str] | None = None,
    ) -> None:
        """``fields``: the result fields that will be read (None: all); ``started_at`` is
        formatted only when it is one of them."""
        self._handlers = handlers
        self._emit = emit
        self._concurrency = concurrency
        self._policy = policy
        self._sleep = sleep
        self._rand = rand
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency)
        self._feeder: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._stopped = False
        self.counters = PoolCounters()
        self._stamp = fields is None or "started_at" in fields

    async def run(self, jobs: AsyncIterable[Any]) -> None:
        """Run every job from ``jobs``; items with ``to_result()`` (refused jobs) are emitted as is.

        Returns when every job has been emitted, or when ``stop()``/``abort()`` ended the run early.
        """
        if self._stopped:
            return  # stopped before it started (a signal during start-up)
        self._workers = [
            asyncio.create_task(self._work(), name=f"fetcher-worker-{i}")
            for i in range(self._concurrency)
        ]
        self._feeder = asyncio.create_task(self._feed(jobs), name="fetcher-feeder")
        try:
            await self._feeder
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                self.abort()
                raise  # run() itself was cancelled, not just the feeder by stop()
        finally:
            # Also when the source failed: jobs in flight finish before the caller closes
            # the connections under them.
            await self._close_queue()
            await asyncio.gather(*self._workers, return_exceptions=True)

    async def _feed(self, jobs: AsyncIterable[Any]) -> None:
        queue = self._queue
        put, put_nowait = queue.put, queue.put_nowait
        # Whether a job type is a refused job (has to_result), looked up once per type:
        # hasattr on a pydantic model that lacks the name is slow (a raised AttributeError).
        refused: dict[type, bool] = {}
        async for job in jobs:
            cls = type(job)
            is_refused = refused.get(cls)
            if is_refused is None:
                is_refused = refused[cls] = hasattr(cls, "to_result")
            if is_refused:
                pending = self._emit(job.to_result())
                if pending is not None:
                    await pending
            else:
                try:
                    put_nowait(job)
                except asyncio.QueueFull:
                    await put(job)

    async def _close_queue(self) -> None:
        for _ in self._workers:
            await self._queue.put(None)

    def stop(self) -> None:
        """Stop taking new jobs; jobs already queued are dropped unrun, jobs in flight finish."""
        self._stopped = True
        if self._feeder is not None:
            self._feeder.cancel()
        while not self._queue.empty():
            self._queue.get_nowait()

    def abort(self) -> None:
        """Cancel jobs in flight; they get no result line."""
        self.stop()
        for task in self._workers:
            task.cancel()

    async def _work(self) -> None:
        get = self._queue.get
        emit = self._emit
        while (job := await get()) is not None:
            # An emit that returns an awaitable (a bounded consumer) holds this worker back.
            pending = emit(await self.run_job(job))
            if pending is not None:
                await pending

    async def run_job(self, job: Any) -> ResultLine:
        """All attempts of one job, retries and backoff included; returns its result line."""
        handler = self._handlers[job.kind]
        retries = self._policy.retries if job.retries is None else job.retries
        counters = self.counters
        started_at = utc_now_iso() if self._stamp else None
        t0 = time.monotonic()
        attempts = 0
        counters.in_flight += 1
        try:
            while True:
                attempts += 1
                counters.started += 1
                try:
                    outcome = await handler.attempt(job)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("internal error in job %s", job.id)
                    outcome = Outcome(
                        {}, JobError("internal", f"internal error: {type(exc).__name__}")
                    )
                if not (outcome.retry and attempts <= retries):
                    break
                counters.retries += 1
                await self._sleep(self._policy.delay(attempts, outcome.retry_after, self._rand))
        finally:
            counters.in_flight -= 1
        return ran(
            job.id,
            job.kind,
            attempts=attempts,
            started_at=started_at,
            elapsed_ms=round((time.monotonic() - t0) * 1000, 3),
            error=outcome.error,
            fields=outcome.fields,
            meta=job.meta,
        )
