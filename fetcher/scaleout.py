"""Scale-out over Redis Streams: the stream layout, ``enqueue`` and ``collect``.

A job entry holds two fields: ``job``, the job object as JSON with its resolved id, and ``line``,
its line (JSONL) or position (YAML) in the input. ``${NAME}`` references are stored unexpanded:
each worker expands them from its own environment, so secrets never sit in Redis. A result
entry holds one field, ``result``: the result line's JSON. The worker lives in ``worker.py``.

Delivery is at least once (a worker that dies after storing a result but before the pipeline
returns runs its job again elsewhere); ``collect`` makes the output exactly once by job id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .config import Settings
from .constants import DEFAULT_GROUP, DEFAULT_RESULTS, DEFAULT_STREAM
from .errors import FetcherError, SetupError
from .jobs import InvalidJob, JobParser, mask_url
from .resume import DoneIds, id_hash, prepare_resume
from .sink import JsonlWriter
from .sources import JobCheck, JobSource

__all__ = ["DEFAULT_GROUP", "DEFAULT_RESULTS", "DEFAULT_STREAM"]

log = logging.getLogger("fetcher")

ENQUEUE_BATCH = 1000
COLLECT_BATCH = 1000

#  Errors that mean "Redis is not there right now" (down, restarting, loading, unreachable):
#  retried with backoff. Anything else Redis answers is a real error.
TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, OSError)

#  redis-py spends ~35 us of client CPU per pipelined command; one script call per batch costs
#  ~4 us a job, which is what makes a million jobs a matter of seconds, not a minute.
_XADD_BATCH = """
for i = 1, #ARGV, 2 do
  redis.call('XADD', KEYS[1], '*', 'job', ARGV[i], 'line', ARGV[i + 1])
end
return #ARGV / 2
"""

T = TypeVar("T")


class RedisUnavailable(FetcherError):
    """Redis could not be reached or refused a command."""


def connect(url: str, *, reconnect_once: bool = False) -> aredis.Redis:
    """A client for ``url``; raises SetupError for a URL that cannot be used.

    ``reconnect_once``: a command that fails on a dead connection is sent once more, at once, on
    a fresh one, and then fails for good; the caller's own backoff does the waiting. (redis-py's
    default retries each command for seconds, which hides an outage from a worker's health and
    keeps reporting it after Redis is back.)
    """
    options: dict[str, Any] = {}
    if reconnect_once:
        options["retry"] = Retry(NoBackoff(), 1)
    try:
        return aredis.Redis.from_url(
            url,
            socket_connect_timeout=5,
            # Longer than any BLOCK we ask for, so a blocking read is not cut off as a timeout.
            socket_timeout=15,
            socket_keepalive=True,
            **options,
        )
    except ValueError as exc:
        raise SetupError(f"--redis {mask_url(url)}: {exc}") from None


def describe(exc: BaseException) -> str:
    """One line about a Redis failure, without the URL (it may hold a password)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Backoff:
    """Exponential backoff with full jitter for reconnecting, capped at ``cap`` seconds."""

    def __init__(self, *, base: float = 0.1, cap: float = 2.0) -> None:
        self._base = base
        self._cap = cap
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self._cap, self._base * 2.0 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


async def retrying(what: str, call: Callable[[], Awaitable[T]], backoff: Backoff) -> T:
    """``await call()`` until Redis answers, logging one line when it goes away and comes back."""
    while True:
        try:
            value = await call()
        except TRANSIENT as exc:
            if backoff.failures == 0:
                log.warning("redis unavailable (%s: %s); retrying", what, describe(exc))
            await asyncio.sleep(backoff.next())
            continue
        if backoff.failures:
            log.warning("redis reachable again (%s)", what)
            backoff.reset()
        return value


class RedisHealth:
    """Whether Redis is reachable, as seen by every command of one process: one state for all
    of its connections, so one outage is one "unavailable" line and one "reachable again" line.

    A command takes a ``ticket()`` before it starts and reports with it. Only a command that
    started after the last change of state may change it again: one already under way when
    the state changed (a blocking read still waiting on a socket from before the outage, or a
    command that succeeded just as another one found Redis gone) brings old news, and its
    connection is simply made again. ``on_change(up)`` is called at each change.
    """

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self.up: bool | None = None  # None until the first command answers
        self.reason = "not reached yet"
        self._since = time.monotonic()
        self._epoch = 0
        self._on_change = on_change

    def ticket(self) -> int:
        return self._epoch

    def ok(self, ticket: int) -> None:
        if self.up or ticket != self._epoch:
            return
        if self.up is False:
            log.warning("redis reachable again after %.1f s", time.monotonic() - self._since)
        self._change(True, "")

    def failed(self, ticket: int, what: str, exc: BaseException) -> None:
        if self.up is False or ticket != self._epoch:
            log.debug("redis %s failed on an old connection: %s", what, describe(exc))
            return
        self.reason = f"{what}: {describe(exc)}"
        log.warning(
            "redis unavailable (%s); retrying with backoff, held jobs stay pending", self.reason
        )
        self._change(False, self.reason)

    def _change(self, up: bool, reason: str) -> None:
        self.up = up
        self.reason = reason
        self._since = time.monotonic()
        self._epoch += 1
        if self._on_change is not None:
            self._on_change(up)


class IdSet:
    """A grow-only set of job ids, kept as 64-bit hashes in one open-addressing table.

    About 16 bytes an id (the table stays at most half full), against ~100 for a set of
    strings; ids colliding in 64 bits are as unlikely as for ``--resume`` (resume.py).
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._table = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, job_id: str) -> bool:
        """Add ``job_id``; False when it was already there."""
        return self._insert(id_hash(job_id) or 1)  # 0 marks an empty slot

    def _insert(self, h: int) -> bool:
        table, mask = self._table, self._mask
        i = h & mask
        while (v := table[i]) != 0:
            if v == h:
                return False
            i = (i + 1) & mask
        table[i] = h
        self._len += 1
        if self._len * 2 > mask:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._table
        self._table = array("Q", bytes(16 * len(old)))
        self._mask = 2 * len(old) - 1
        self._len = 0
        for h in old:
            if h:
                self._insert(h)


# -- enqueue ---------------------------------------------------------------------------------


class _KeepRaw(JobParser):
    """A JobParser that remembers each valid job's input object, unexpanded, by line."""

    def __init__(self, *, smtp_profiles: Any) -> None:
        super().__init__(smtp_profiles=smtp_profiles)
        self.raw: dict[int, Any] = {}

    def parse(self, obj: Any, line: int, *, expand: bool = True) -> Any:
        item = super().parse(obj, line, expand=expand)
        if not isinstance(item, InvalidJob):
            self.raw[line] = obj
        return item


@dataclass(slots=True)
class EnqueueReport:
    added: int = 0
    invalid: int = 0


async def enqueue(
    jobs_path: str,
    *,
    url: str,
    stream: str,
    smtp_profiles: Any = None,
    settings: Settings | None = None,
    err: Any = sys.stderr,
) -> EnqueueReport:
    """Validate every job of ``jobs_path`` and add the valid ones to ``stream``.

    Invalid jobs (and repeated ids) are reported on ``err`` with their line numbers and left out.
    Batches go out while the next one is being parsed. Raises RedisUnavailable.
    """
    settings = settings or Settings()
    if smtp_profiles is None:
        smtp_profiles = settings.smtp.keys()
    parser = _KeepRaw(smtp_profiles=smtp_profiles)
    source = JobSource.for_settings(jobs_path, parser, settings)
    check = JobCheck(jobs_path, source, err)
    report = EnqueueReport()
    client = connect(url)
    script = client.register_script(_XADD_BATCH)
    sending: asyncio.Task[Any] | None = None
    batch: list[bytes | int] = []

    async def flush() -> None:
        nonlocal sending, batch
        if sending is not None:
            report.added += int(await sending)
            sending = None
        if batch:
            sending = asyncio.ensure_future(script(keys=[stream], args=batch))
            batch = []

    try:
        async for item in source:
            raw = parser.raw.pop(item.line, None)
            if not check.good(item):
                report.invalid += 1
                continue
            if raw.get("id") != item.id:
                raw = {**raw, "id": item.id}
            batch.append(orjson.dumps(raw, option=orjson.OPT_NON_STR_KEYS))
            batch.append(item.line)
            if len(batch) >= 2 * ENQUEUE_BATCH:
                await flush()
        await flush()
        await flush()
    except TRANSIENT as exc:
        raise RedisUnavailable(
            f"redis: {describe(exc)} ({report.added} jobs were added before it failed)"
        ) from None
    except rexc.RedisError as exc:
        raise RedisUnavailable(f"redis refused the jobs: {describe(exc)}") from None
    finally:
        if sending is not None:
            sending.cancel()
        source.close()
        await client.aclose()
    return report


# -- collect ---------------------------------------------------------------------------------


@dataclass(slots=True)
class CollectReport:
    written: int = 0
    duplicates: int = 0
    trimmed: int = 0


class Collector:
    """Writes a results stream as JSON lines, each job id once; ``stop()`` ends a ``follow``."""

    def __init__(
        self,
        *,
        url: str,
        results_stream: str,
        output: str,
        follow: bool = False,
        trim: bool = False,
        fsync_interval: float | None = None,
    ) -> None:
        self._url = url
        self._stream = results_stream
        self._output = output
        self._follow = follow
        self._trim = trim
        self._fsync_interval = fsync_interval
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.report = CollectReport()

    def stop(self) -> None:
        """End the collection; what was written so far is flushed. Safe from a signal handler."""
        self._stopping = True
        if self._task is not None:
            # Lines are written between awaits, so cancelling at any await leaves none torn.
            self._task.cancel()

    async def execute(self) -> CollectReport:
        # Ids already in OUT are skipped, so collecting into the same file twice adds nothing.
        done = prepare_resume(self._output) if self._output != "-" else DoneIds()
        if len(done):
            log.info("%s already holds %d results; appending the rest", self._output, len(done))
        writer = JsonlWriter.open(self._output, append=True, fsync_interval=self._fsync_interval)
        client = connect(self._url)
        self._task = asyncio.current_task()
        try:
            await self._copy(client, writer, done)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            self._task = None
            writer.close()
            await client.aclose()
        return self.report

    async def _copy(self, client: aredis.Redis, writer: JsonlWriter, done: DoneIds) -> None:
        seen = IdSet()
        last = b"0-0"
        backoff = Backoff()
        report = self.report
        while not self._stopping:
            block = 500 if self._follow else None

            async def read(last: bytes = last, block: int | None = block) -> Any:
                return await client.xread({self._stream: last}, count=COLLECT_BATCH, block=block)

            try:
                reply = await (retrying("collect", read, backoff) if self._follow else read())
            except TRANSIENT as exc:
                raise RedisUnavailable(f"redis: {describe(exc)}") from None
            entries = reply[0][1] if reply else []
            if not entries:
                if self._follow:
                    continue
                return
            for entry_id, fields in entries:
                raw = fields.get(b"result")
                try:
                    result = orjson.loads(raw) if raw is not None else None
                except orjson.JSONDecodeError:
                    result = None
                if not isinstance(result, dict) or not isinstance(result.get("id"), str):
                    log.warning("results entry %s is not a result line; skipped", entry_id.decode())
                    continue
                job_id = result["id"]
                if job_id in done or not seen.add(job_id):
                    report.duplicates += 1
                    continue
                writer.write(result)
                report.written += 1
            last = entries[-1][0]
            if self._trim:
                # Only what is safely on disk leaves Redis.
                writer.flush()
                writer.fsync()
                report.trimmed += await self._trim_through(client, last, backoff)

    async def _trim_through(self, client: aredis.Redis, last: bytes, backoff: Backoff) -> int:
        ms, _, seq = last.decode().partition("-")
        minid = f"{ms}-{int(seq) + 1}"  # entries below minid go: everything up to `last`

        async def trim() -> int:
            return int(await client.xtrim(self._stream, minid=minid, approximate=False))

        return await retrying("trim", trim, backoff)
