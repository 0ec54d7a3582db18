"""The engine: one shared HTTP session and pooled SMTP connections running jobs through the pool.

``Runner`` is what every command runs jobs with: ``fetcher run`` (run.py's ``Run``), each
``--processes`` child, the Redis worker, and Python programs (api.py). It builds one handler
per job kind, the retry policy, and pools over them; leaving it stops what still runs and
closes every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
)
from typing import Any, Protocol

from .config import Settings
from .forecast import HostForecast
from .http import HttpHandler
from .jobs import HttpJob, InvalidJob, JobParser, MailJob
from .pool import Pool, RetryPolicy
from .results import Handler, Outcome, Result
from .shaping import computed_fields

JobInput = dict[str, Any] | HttpJob | MailJob
"""A job as a JSON-like dict (the job-file format) or a validated HttpJob / MailJob."""


class RunObserver(Protocol):
    """Watches a run from outside (metrics): may wrap the handlers, sees every result."""

    def wrap(self, handlers: dict[str, Handler]) -> dict[str, Handler]:
        """The handlers the run should use, given the real ones."""
        ...

    def result(self, result: dict[str, Any]) -> None:
        """Called with every result as it is emitted."""
        ...


async def build_handlers(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    *,
    forecast: HostForecast | None = None,
    fields: frozenset[str] | None = None,
) -> dict[str, Handler]:
    """One handler per job kind, each closed when ``stack`` closes; ``fields``: the result
    fields they need to fill in (None: all)."""
    return {
        "http": await stack.enter_async_context(
            HttpHandler(settings, forecast=forecast, fields=fields)
        ),
        "mail": _MailOnFirstUse(settings, stack),
    }


class _MailOnFirstUse:
    """The mail handler, built when the first mail job arrives.

    Most runs hold no mail job at all: they are spared importing aiosmtplib and starting the
    SMTP pools' reaper task.
    """

    def __init__(self, settings: Settings, stack: contextlib.AsyncExitStack) -> None:
        self._settings = settings
        self._stack = stack
        self._handler: Handler | None = None
        self._opening: asyncio.Lock | None = None

    async def attempt(self, job: Any) -> Outcome:
        handler = self._handler
        if handler is None:
            handler = await self._open()
        return await handler.attempt(job)

    async def _open(self) -> Handler:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # many workers may meet their first mail job at once
            if self._handler is None:
                from .mail import MailHandler

                mail: Handler = await self._stack.enter_async_context(MailHandler(self._settings))
                self._handler = mail
                return mail
            return self._handler


def retry_policy(settings: Settings) -> RetryPolicy:
    """The pool's retry policy from the settings' retry and backoff keys."""
    return RetryPolicy(
        retries=settings.retries,
        backoff_base=settings.backoff_base,
        backoff_max=settings.backoff_max,
        retry_after_max=settings.retry_after_max,
    )


class Runner:
    """Runs jobs with one shared HTTP session and pooled SMTP connections.

    Use as ``async with Runner(settings) as runner``. Leaving the block stops any run still in
    progress (its jobs in flight are cancelled) and closes every connection.

    ``fields`` (``fetcher run --fields``): the only result fields that will be written; the
    results then carry those and what a run reads itself (``shaping.computed_fields``), and
    the others are never computed. None, the default: every field.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        observer: RunObserver | None = None,
        forecast: HostForecast | None = None,
        fields: Collection[str] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self._observer = observer
        #  The job file's requests per host still to come, for the idle pool (forecast.py).
        self._forecast = forecast
        self._fields = computed_fields(tuple(fields)) if fields is not None else None
        self._stack: contextlib.AsyncExitStack | None = None
        self._handlers: dict[str, Handler] | None = None
        self._pools: set[Pool] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #  Result streams not yet finished: a consumer that broke out of its loop leaves its
        #  generator suspended until garbage collection; leaving the Runner closes it instead.
        self._streams: weakref.WeakSet[AsyncGenerator[Result, None]] = weakref.WeakSet()
        self.parser = JobParser(smtp_profiles=self.settings.smtp.keys())

    async def __aenter__(self) -> Runner:
        stack = contextlib.AsyncExitStack()
        try:
            handlers = await build_handlers(
                self.settings, stack, forecast=self._forecast, fields=self._fields
            )
        except BaseException:
            await stack.aclose()
            raise
        if self._observer is not None:
            handlers = self._observer.wrap(handlers)
        self._stack, self._handlers = stack, handlers
        return self

    async def __aexit__(self, *exc: object) -> None:
        for stream in list(self._streams):
            if not getattr(stream, "ag_running", False):  # one being iterated ends by itself
                await stream.aclose()
        for pool in list(self._pools):
            pool.abort()
        # Runs left behind by a consumer that stopped iterating unwind before connections close.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = self._handlers = None

    def pool(self, emit: Callable[[dict[str, Any]], Awaitable[None] | None]) -> Pool:
        """A pool over this runner's handlers, emitting each result to ``emit``."""
        if self._handlers is None:
            raise RuntimeError("Runner used outside 'async with'")
        observer = self._observer
        if observer is not None:
            inner = emit

            def emit(result: dict[str, Any]) -> Awaitable[None] | None:
                observer.result(result)
                return inner(result)

        return Pool(
            handlers=self._handlers,
            emit=emit,
            concurrency=self.settings.concurrency,
            policy=retry_policy(self.settings),
            fields=self._fields,
        )

    async def execute(
        self,
        pool: Pool,
        jobs: AsyncIterable[HttpJob | MailJob | InvalidJob],
    ) -> None:
        """Run already-validated jobs through ``pool`` (see ``pool()``) until done or stopped."""
        self._pools.add(pool)
        try:
            await pool.run(jobs)
        finally:
            self._pools.discard(pool)

    def run(
        self, jobs: Iterable[JobInput] | AsyncIterable[JobInput]
    ) -> AsyncGenerator[Result, None]:
        """Run ``jobs`` and yield each Result as it finishes (completion order).

        Dicts are validated as job-file lines (``${NAME}`` expanded, ids defaulting to the
        1-based position); a bad one yields an ``invalid_job`` Result, never an exception.
        ``jobs`` is read lazily, as the pool has room, so a generator of any length runs in
        bounded memory. Breaking out of the loop, or leaving the Runner, stops the run: jobs
        in flight are cancelled and get no result.
        """
        if self._handlers is None:
            raise RuntimeError("Runner used outside 'async with'")
        stream = self._run(jobs)
        self._streams.add(stream)
        return stream

    async def _run(
        self, jobs: Iterable[JobInput] | AsyncIterable[JobInput]
    ) -> AsyncGenerator[Result, None]:
        results: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(
            maxsize=self.settings.concurrency
        )
        pool = self.pool(emit=results.put)

        async def produce() -> None:
            try:
                await self.execute(pool, self._validated(jobs))
            finally:
                await results.put(None)

        task = asyncio.create_task(produce(), name="fetcher-runner")
        self._tasks.add(task)
        try:
            while (result := await results.get()) is not None:
                yield Result(result)
        finally:
            if not task.done():
                pool.abort()
                while not results.empty():
                    results.get_nowait()  # unblock workers waiting to hand over a result
            try:
                await task
            finally:
                self._tasks.discard(task)

    async def _validated(
        self, jobs: Iterable[JobInput] | AsyncIterable[JobInput]
    ) -> AsyncIterator[HttpJob | MailJob | InvalidJob]:
        parse = self.parser.parse
        position = 0
        if isinstance(jobs, AsyncIterable):
            async for job in jobs:
                position += 1
                yield parse(_as_dict(job), position)
        else:
            for job in jobs:
                position += 1
                yield parse(_as_dict(job), position)


def _as_dict(job: JobInput) -> Any:
    if isinstance(job, HttpJob | MailJob):
        # Re-validated like a job-file line, so a constructed job gets the same checks.
        return job.model_dump(by_alias=True, exclude_unset=True) | {"id": job.id}
    return job
