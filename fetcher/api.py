"""The library interface: the same engine as ``fetcher run``, for Python programs.

::

    import fetcher

    settings = fetcher.Settings(concurrency=200, retries=3)
    async with fetcher.Runner(settings) as runner:
        async for result in runner.run([{"url": "http://127.0.0.1:8000/"}]):
            print(result.id, result.ok, result.status)

    results = fetcher.run_sync(jobs, settings)   # no event loop needed

``Runner`` owns the shared HTTP session and the SMTP connection pools for as long as it is open;
``run()`` streams results in completion order with back-pressure, so a million-job generator
never piles up in memory. The CLI's ``fetcher run`` is this engine plus a job file, a results
file, resume and signals (``runner.Run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol, TypedDict

from .config import Settings
from .http import HttpHandler
from .jobs import HttpJob, InvalidJob, JobParser, MailJob
from .pool import Handler, Pool, RetryPolicy

JobInput = dict[str, Any] | HttpJob | MailJob
"""A job as a JSON-like dict (the job-file format) or a validated HttpJob / MailJob."""


class ErrorInfo(TypedDict):
    type: str
    message: str


class Result(dict[str, Any]):
    """One job's result: the JSON line's object, with typed accessors for the common fields.

    It is a ``dict`` (what ``json.dumps``/``orjson.dumps`` write is the result line);
    ``to_dict()`` returns a plain copy.
    """

    __slots__ = ()

    @property
    def id(self) -> str:
        return str(self["id"])

    @property
    def kind(self) -> str | None:
        kind: str | None = self.get("kind")
        return kind

    @property
    def ok(self) -> bool:
        return bool(self["ok"])

    @property
    def attempts(self) -> int:
        return int(self["attempts"])

    @property
    def error(self) -> ErrorInfo | None:
        error: ErrorInfo | None = self.get("error")
        return error

    @property
    def status(self) -> int | None:
        """HTTP status, or the SMTP reply code; None when there was no response."""
        status: int | None = self.get("status")
        return status

    @property
    def elapsed_ms(self) -> float:
        return float(self["elapsed_ms"])

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


class RunObserver(Protocol):
    """Watches a run from outside (metrics): may wrap the handlers, sees every result."""

    def wrap(self, handlers: dict[str, Handler]) -> dict[str, Handler]: ...

    def result(self, result: dict[str, Any]) -> None: ...


async def build_handlers(
    settings: Settings, stack: contextlib.AsyncExitStack
) -> dict[str, Handler]:
    """One handler per job kind, each closed when ``stack`` closes."""
    from .mail import MailHandler

    return {
        "http": await stack.enter_async_context(HttpHandler(settings)),
        "mail": await stack.enter_async_context(MailHandler(settings)),
    }


def retry_policy(settings: Settings) -> RetryPolicy:
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
    """

    def __init__(
        self, settings: Settings | None = None, *, observer: RunObserver | None = None
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self._observer = observer
        self._stack: contextlib.AsyncExitStack | None = None
        self._handlers: dict[str, Handler] | None = None
        self._pools: set[Pool] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.parser = JobParser(smtp_profiles=self.settings.smtp.keys())

    async def __aenter__(self) -> Runner:
        stack = contextlib.AsyncExitStack()
        try:
            handlers = await build_handlers(self.settings, stack)
        except BaseException:
            await stack.aclose()
            raise
        if self._observer is not None:
            handlers = self._observer.wrap(handlers)
        self._stack, self._handlers = stack, handlers
        return self

    async def __aexit__(self, *exc: object) -> None:
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

    async def run(
        self, jobs: Iterable[JobInput] | AsyncIterable[JobInput]
    ) -> AsyncIterator[Result]:
        """Run ``jobs`` and yield each Result as it finishes (completion order).

        Dicts are validated as job-file lines (``${NAME}`` expanded, ids defaulting to the
        1-based position); a bad one yields an ``invalid_job`` Result, never an exception.
        """
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


def run_sync(jobs: Iterable[JobInput], settings: Settings | None = None) -> list[Result]:
    """Run ``jobs`` to completion and return their results (completion order).

    Works with or without a running event loop in the calling thread (in a notebook the jobs
    run on a private loop in a helper thread). Holds every result in memory: for big batches
    iterate ``Runner.run`` instead.
    """

    async def collect() -> list[Result]:
        async with Runner(settings) as runner:
            return [r async for r in runner.run(jobs)]

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(collect())
    box: list[list[Result] | BaseException] = []

    def in_thread() -> None:
        try:
            box.append(asyncio.run(collect()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            box.append(exc)

    thread = threading.Thread(target=in_thread, name="fetcher-run-sync")
    thread.start()
    thread.join()
    outcome = box[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
