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
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from typing import TYPE_CHECKING, Any, Protocol

from .config import Settings
from .http import HttpHandler
from .jobs import HttpJob, InvalidJob, JobParser, MailJob
from .pool import Handler, Outcome, Pool, RetryPolicy

if TYPE_CHECKING:
    # Only for annotations: the schema module builds the result models, which a run never uses.
    from .schema import ErrorInfo

JobInput = dict[str, Any] | HttpJob | MailJob
"""A job as a JSON-like dict (the job-file format) or a validated HttpJob / MailJob."""


class Result(dict[str, Any]):
    """One job's result: the JSON line's object, with typed accessors for the common fields.

    It is a ``dict`` (what ``json.dumps``/``orjson.dumps`` write is the result line);
    ``to_dict()`` returns a plain copy.
    """

    __slots__ = ()

    @property
    def id(self) -> str:
        """The job's id (its 1-based position in the input when the job gave none)."""
        return str(self["id"])

    @property
    def kind(self) -> str | None:
        """``"http"`` or ``"mail"``; None for an invalid job whose kind cannot be told."""
        kind: str | None = self.get("kind")
        return kind

    @property
    def ok(self) -> bool:
        """The job did what it asked (http: a final status < 400; mail: accepted)."""
        return bool(self["ok"])

    @property
    def attempts(self) -> int:
        """Attempts started; 0 for a job refused before any (invalid_job, invalid_url)."""
        return int(self["attempts"])

    @property
    def error(self) -> ErrorInfo | None:
        """None when ok, else ``{"type": ..., "message": ...}``."""
        error: ErrorInfo | None = self.get("error")
        return error

    @property
    def status(self) -> int | None:
        """HTTP status, or the SMTP reply code; None when there was no response."""
        status: int | None = self.get("status")
        return status

    @property
    def elapsed_ms(self) -> float:
        """Milliseconds from the first attempt's start to the result."""
        return float(self["elapsed_ms"])

    @property
    def started_at(self) -> str:
        """ISO 8601 UTC time of the first attempt (of reading, for a refused job)."""
        return str(self["started_at"])

    @property
    def url(self) -> str | None:
        """The URL as requested, any password in it shown as ``***`` (http jobs)."""
        url: str | None = self.get("url")
        return url

    @property
    def final_url(self) -> str | None:
        """The URL of the final response, after redirects (http jobs)."""
        url: str | None = self.get("final_url")
        return url

    @property
    def headers(self) -> dict[str, str] | None:
        """The final response's headers, names lower-cased (http jobs with a response)."""
        headers: dict[str, str] | None = self.get("headers")
        return headers

    @property
    def body(self) -> Any:
        """The body the job asked for (text, base64 text or parsed JSON), else None."""
        return self.get("body")

    @property
    def meta(self) -> Any:
        """The job's own ``meta`` value, carried through untouched."""
        return self.get("meta")

    def to_dict(self) -> dict[str, Any]:
        """A plain ``dict`` copy: exactly the object ``fetcher run`` writes as the line."""
        return dict(self)


class RunObserver(Protocol):
    """Watches a run from outside (metrics): may wrap the handlers, sees every result."""

    def wrap(self, handlers: dict[str, Handler]) -> dict[str, Handler]:
        """The handlers the run should use, given the real ones."""
        ...

    def result(self, result: dict[str, Any]) -> None:
        """Called with every result as it is emitted."""
        ...


async def build_handlers(
    settings: Settings, stack: contextlib.AsyncExitStack
) -> dict[str, Handler]:
    """One handler per job kind, each closed when ``stack`` closes."""
    return {
        "http": await stack.enter_async_context(HttpHandler(settings)),
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
        #  Result streams not yet finished: a consumer that broke out of its loop leaves its
        #  generator suspended until garbage collection; leaving the Runner closes it instead.
        self._streams: weakref.WeakSet[AsyncGenerator[Result, None]] = weakref.WeakSet()
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
