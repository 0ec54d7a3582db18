"""``fetcher worker``: jobs from a Redis stream consumer group -> the pool -> the results stream.

The worker runs jobs with the same Pool, handlers and settings as ``run``. Around it:

- A reader takes entries with XREADGROUP, never more than the pool has free slots for: the
  entries a worker holds (read, not yet acknowledged) never pass ``concurrency``.
- Every few seconds it XAUTOCLAIMs entries idle for ``claim_idle`` (their worker died). An entry
  whose delivery count passes ``max_deliveries`` is not run again but dead-lettered: an
  ``abandoned`` result, and a copy of the job on the dead-letter stream.
- A refresher re-claims the entries this worker holds every ``claim_idle / 3`` (XCLAIM JUSTID:
  resets their idle time without counting a delivery), so a job that waits behind ``--rate`` or
  ``--per-host``, or simply runs long, is never taken from a live worker.
- A storer adds each result to the results stream and XACKs its entry in one MULTI/EXEC, so an
  entry is acknowledged only once its result is stored. Results wait in memory (at most
  ``concurrency`` of them) while Redis is away; their entries stay pending, so a worker killed
  meanwhile loses nothing: another one claims and runs those jobs again.

SIGTERM/SIGINT: stop reading, give jobs in flight ``shutdown_grace`` seconds, store what
finished, exit 0. Jobs not finished stay pending for another worker to claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aredis
import redis.exceptions as rexc

from . import shutdown
from .config import Settings
from .engine import Runner
from .errors import EXIT_OK, EXIT_OUTPUT, EXIT_PIPE, OutputClosed, OutputError
from .jobs import JobParser, mask_url
from .metrics import Metrics
from .pool import Pool
from .results import abandoned
from .scaleout import (
    DEFAULT_GROUP,
    DEFAULT_RESULTS,
    DEFAULT_STREAM,
    TRANSIENT,
    Backoff,
    RedisHealth,
    connect,
    describe,
)
from .sink import JsonlWriter
from .sources import Item
from .stats import Progress, Stats
from .timeutil import utc_now_iso
from .tls import INSECURE_WARNING, check_tls

log = logging.getLogger("fetcher")

STORE_BATCH = 200
REFRESH_BATCH = 500
QUEUE_STATS_SECONDS = 2.0

#  Reset the idle time of the entries this consumer still owns. The owner check keeps a worker
#  that was cut off for longer than claim_idle from taking back what another one has claimed.
_REFRESH = """
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    redis_url: str
    consumer: str
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    results_stream: str = DEFAULT_RESULTS
    dead_stream: str | None = None  # None: "<stream>:dead"
    claim_idle: float | None = None  # None: default_claim_idle(settings)
    max_deliveries: int = 5
    output: str | None = None
    drain: bool = False


def default_claim_idle(settings: Settings) -> float:
    """Longer than a job's worst case: every attempt timing out, with the longest backoffs."""
    return (settings.retries + 1) * settings.timeout + settings.retries * settings.backoff_max + 10


class Worker:
    """One ``fetcher worker``. ``await Worker(...).execute()`` returns the exit code."""

    def __init__(
        self, settings: Settings, options: WorkerOptions, *, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.options = options
        self.metrics = metrics
        self.stats = Stats()
        self.claim_idle = options.claim_idle or default_claim_idle(settings)
        self._dead_stream = options.dead_stream or f"{options.stream}:dead"
        self._concurrency = settings.concurrency
        self._parser = JobParser(smtp_profiles=settings.smtp.keys())
        self._redis: aredis.Redis | None = None
        self._pool: Pool | None = None
        self._writer: JsonlWriter | None = None
        self._progress = Progress(self.stats, bar=False, log_interval=settings.progress_interval)
        # entry id -> job id, for every entry read and not yet acknowledged
        self._held: dict[bytes, str] = {}
        # job id -> its entries waiting for a result (more than one when a job was enqueued twice)
        self._by_job: dict[str, list[bytes]] = {}
        self._inbox: asyncio.Queue[Item | None] = asyncio.Queue()
        # (entry id, result JSON, job JSON when dead-lettered) waiting to be stored
        self._store: list[tuple[bytes, bytes, bytes | None]] = []
        self._store_wake = asyncio.Event()
        self._freed = asyncio.Event()
        self._claim_cursor: bytes | str = "0-0"
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_at = 0.0
        self._grace = shutdown.Grace(settings.shutdown_grace)
        self.health = RedisHealth(self._redis_changed)
        self._exit = EXIT_OK

    @property
    def redis(self) -> aredis.Redis:
        assert self._redis is not None
        return self._redis

    async def execute(self) -> int:
        opts = self.options
        # As `fetcher run` does: unusable TLS files stop the worker (exit 2) before it touches
        # Redis or the network, and turning verification off is never silent.
        check_tls(self.settings)
        if not self.settings.tls.verify:
            log.warning(INSECURE_WARNING)
        if opts.output is not None:
            # A worker that restarts adds to its file rather than replace what it wrote before.
            self._writer = JsonlWriter.open(
                opts.output, append=True, fsync_interval=self.settings.fsync_interval
            )
        tasks: list[asyncio.Task[None]] = []
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.enter_context(shutdown.stop_signals(self._on_signal))
                self._redis = connect(opts.redis_url, reconnect_once=True)
                stack.push_async_callback(self._redis.aclose)
                # A worker adds to its WARC file as to its OUT: restarts append (resume).
                appending = self.settings.model_copy(update={"resume": True})
                runner = await stack.enter_async_context(Runner(appending, observer=self.metrics))
                if self.metrics is not None:
                    self.metrics.add_check("redis", self._redis_ready)
                    self.metrics.held.set_function(lambda: len(self._held))
                self._pool = runner.pool(emit=self._emit)
                log.info(
                    "worker %s: group %s on %s (concurrency %d, claim-idle %g s, "
                    "max-deliveries %d)",
                    opts.consumer,
                    opts.group,
                    opts.stream,
                    self._concurrency,
                    self.claim_idle,
                    opts.max_deliveries,
                )
                self._reader = asyncio.create_task(self._read_loop(), name="fetcher-reader")
                tasks = [
                    self._reader,
                    asyncio.create_task(self._store_loop(), name="fetcher-storer"),
                    asyncio.create_task(self._refresh_loop(), name="fetcher-refresher"),
                ]
                if self.metrics is not None:
                    tasks.append(asyncio.create_task(self._queue_stats_loop()))
                shutdown.replay(self._on_signal)
                await runner.execute(self._pool, self._jobs())
                await self._flush_store()
        finally:
            self._grace.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._close_writer()
            self._progress.close()
            print(self.stats.summary(), file=sys.stderr, flush=True)
        if self._store:
            log.warning(
                "%d results were not stored; their jobs stay pending and run again elsewhere",
                len(self._store),
            )
        return self._exit

    # -- the pool's side ---------------------------------------------------------------------

    async def _jobs(self) -> AsyncIterator[Item]:
        get = self._inbox.get
        while (item := await get()) is not None:
            yield item

    def _emit(self, result: dict[str, Any]) -> None:
        job_id = result["id"]
        entries = self._by_job.get(job_id)
        if not entries:
            log.error("result for job %s matches no entry held; not stored", job_id)
            return
        entry_id = entries.pop(0)
        if not entries:
            del self._by_job[job_id]
        self._finish(entry_id, result, None)

    def _finish(self, entry_id: bytes, result: dict[str, Any], dead: bytes | None) -> None:
        self._store.append((entry_id, orjson.dumps(result), dead))
        self._store_wake.set()
        self.stats.record(result)
        if self.metrics is not None and dead is not None:
            self.metrics.result(result)  # the pool's results reach the metrics through Runner
        self._progress.tick()
        if self._writer is not None:
            try:
                self._writer.write(result)
            except OutputError as exc:
                self._output_failed(exc)

    # -- reading and claiming ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        opts = self.options
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        group_ready = False
        claim_every = min(max(self.claim_idle / 2, 0.05), 30.0)
        # A draining worker polls faster: its exit waits for one empty read.
        block_ms = max(10, int(min(0.1 if opts.drain else 1.0, claim_every) * 1000))
        next_claim = 0.0
        while not self._stopping:
            free = self._concurrency - len(self._held)
            if free <= 0:
                self._freed.clear()
                await self._freed.wait()
                continue
            ticket = self.health.ticket()
            try:
                if not group_ready:
                    await self._ensure_group()
                    group_ready = True
                if loop.time() >= next_claim:
                    next_claim = loop.time() + claim_every
                    await self._claim(free)
                    free = self._concurrency - len(self._held)
                    if free <= 0:
                        continue
                reply: Any = await self.redis.xreadgroup(
                    opts.group, opts.consumer, {opts.stream: ">"}, count=free, block=block_ms
                )
                entries = reply[0][1] if reply else []
                for entry_id, fields in entries:
                    self._accept(entry_id, fields)
                if opts.drain and not entries and await self._drained():
                    log.info("no jobs left in %s: worker done", opts.stream)
                    self._inbox.put_nowait(None)
                    return
                self.health.ok(ticket)
                backoff.reset()
            except rexc.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("consumer group %s is gone: creating it again", opts.group)
                    group_ready = False
                    continue
                self._fatal(f"redis refused a read: {describe(exc)}")
                return
            except TRANSIENT as exc:
                self._redis_failed(ticket, "read", exc)
                await asyncio.sleep(backoff.next())

    async def _ensure_group(self) -> None:
        opts = self.options
        for key in (opts.stream, opts.results_stream, self._dead_stream):
            kind = _text(await self.redis.type(key))
            if kind not in ("stream", "none"):
                raise rexc.ResponseError(f"key {key} holds a {kind}, not a stream")
        try:
            await self.redis.xgroup_create(opts.stream, opts.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", opts.group, opts.stream)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _drained(self) -> bool:
        """Nothing undelivered (the last read came back empty) and nothing pending anywhere."""
        if self._held or self._store:
            return False
        summary = await self.redis.xpending(self.options.stream, self.options.group)
        return int(summary["pending"]) == 0

    async def _claim(self, free: int) -> None:
        opts = self.options
        reply = await self.redis.xautoclaim(
            opts.stream,
            opts.group,
            opts.consumer,
            min_idle_time=int(self.claim_idle * 1000),
            start_id=self._claim_cursor,
            count=free,
        )
        self._claim_cursor = reply[0]
        # Entries deleted from the stream come back without fields; ours are running already.
        entries = [(eid, f) for eid, f in reply[1] if f and eid not in self._held]
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(opts.stream, opts.group, min=entry_id, max=entry_id, count=1)
        pending = await pipe.execute()
        claimed = abandoned = 0
        for (entry_id, fields), info in zip(entries, pending, strict=True):
            if not info or info[0]["consumer"].decode() != opts.consumer:
                continue  # acknowledged or taken by another worker in the meantime
            claimed += 1
            deliveries = int(info[0]["times_delivered"])
            if deliveries > opts.max_deliveries:
                abandoned += 1
                self._abandon(entry_id, fields, deliveries - 1)
            else:
                self._accept(entry_id, fields)
        if self.metrics is not None:
            self.metrics.claimed.inc(claimed)
        if claimed:
            log.info(
                "claimed %d entries idle for over %g s (%d abandoned)",
                claimed,
                self.claim_idle,
                abandoned,
            )

    def _accept(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        raw = fields.get(b"job")
        line = _line(fields)
        item = self._parse(raw, line)
        self._held[entry_id] = item.id
        self._by_job.setdefault(item.id, []).append(entry_id)
        self._inbox.put_nowait(item)

    def _parse(self, raw: bytes | None, line: int) -> Item:
        if raw is None:
            return self._parser.invalid(line, "stream entry has no 'job' field")
        return self._parser.parse_json(raw, line)

    def _abandon(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        raw = fields.get(b"job") or b"{}"
        line = _line(fields)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        job = obj if isinstance(obj, dict) else {}
        raw_id = job.get("id")
        job_id = raw_id if isinstance(raw_id, str) else str(line)
        kind = job.get("kind") or ("http" if "url" in job else None)
        kind = kind if kind in ("http", "mail") else None
        url = job.get("url")
        result = abandoned(
            job_id,
            kind,
            line=line,
            deliveries=deliveries,
            started_at=utc_now_iso(),
            url=mask_url(url) if kind == "http" and isinstance(url, str) else None,
        )
        log.warning("job %s abandoned after %d deliveries", job_id, deliveries)
        self._held[entry_id] = job_id
        self._finish(entry_id, result, raw)

    # -- storing, refreshing, watching the queue ---------------------------------------------

    async def _store_loop(self) -> None:
        opts = self.options
        backoff = Backoff()
        while True:
            if not self._store:
                self._store_wake.clear()
                await self._store_wake.wait()
                continue
            batch = self._store[:STORE_BATCH]
            pipe = self.redis.pipeline(transaction=True)
            for entry_id, data, dead in batch:
                pipe.xadd(opts.results_stream, {"result": data})
                if dead is not None:
                    pipe.xadd(self._dead_stream, {"job": dead, "entry": entry_id})
            # One XACK for the batch: half the commands, and the same all-or-nothing EXEC.
            pipe.xack(opts.stream, opts.group, *(entry_id for entry_id, _, _ in batch))
            ticket = self.health.ticket()
            try:
                await pipe.execute()
            except TRANSIENT as exc:
                # Whether EXEC ran is unknown; running it again may store a result twice,
                # which collect removes. Acknowledging without storing cannot happen.
                self._redis_failed(ticket, "store", exc)
                await asyncio.sleep(backoff.next())
                continue
            except rexc.ResponseError as exc:
                self._fatal(f"redis refused to store results: {describe(exc)}")
                return
            self.health.ok(ticket)
            backoff.reset()
            del self._store[: len(batch)]
            for entry_id, _, _ in batch:
                self._held.pop(entry_id, None)
            self._freed.set()

    async def _flush_store(self) -> None:
        """Wait for the storer to empty the store; after a signal, for ``shutdown_grace`` only."""
        while self._store:
            if self._stopping and time.monotonic() > self._stop_at + self.settings.shutdown_grace:
                return
            await asyncio.sleep(0.02)

    async def _refresh_loop(self) -> None:
        opts = self.options
        script = self.redis.register_script(_REFRESH)
        every = max(self.claim_idle / 3, 0.02)
        while True:
            await asyncio.sleep(every)
            held = list(self._held)
            ticket = self.health.ticket()
            try:
                for i in range(0, len(held), REFRESH_BATCH):
                    chunk = held[i : i + REFRESH_BATCH]
                    await script(keys=[opts.stream], args=[opts.group, opts.consumer, *chunk])
            except TRANSIENT as exc:
                self._redis_failed(ticket, "refresh", exc)
            except rexc.ResponseError as exc:
                log.debug("refresh refused: %s", describe(exc))

    async def _queue_stats_loop(self) -> None:
        assert self.metrics is not None
        opts = self.options
        while True:
            try:
                groups = await self.redis.xinfo_groups(opts.stream)
            except (*TRANSIENT, rexc.ResponseError):
                groups = []
            for g in groups:
                if g["name"].decode() == opts.group:
                    self.metrics.queue_pending.set(int(g["pending"]))
                    if g.get("lag") is not None:
                        self.metrics.queue_lag.set(int(g["lag"]))
            await asyncio.sleep(QUEUE_STATS_SECONDS)

    async def _redis_ready(self) -> str | None:
        # The state the worker's own commands found, not a PING of its own: /readyz and
        # fetcher_redis_up tell one story, and change once each way per outage.
        return None if self.health.up else self.health.reason

    # -- state changes -----------------------------------------------------------------------

    def _redis_changed(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.redis_up.set(1 if up else 0)

    def _redis_failed(self, ticket: int, what: str, exc: BaseException) -> None:
        self.health.failed(ticket, what, exc)
        if self.metrics is not None:
            self.metrics.redis_errors.inc()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._grace.take(sig, self._pool, second_note="; unfinished jobs stay pending"):
            self._stop()

    def _stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_at = time.monotonic()
        if self._reader is not None:
            self._reader.cancel()
        # Entries read and not started stay pending; ending the inbox ends the pool's feed even
        # when it has not started yet (a signal during start-up).
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._inbox.put_nowait(None)
        if self._pool is not None:
            self._grace.begin(self._pool)

    def _fatal(self, message: str) -> None:
        log.error("%s", message)
        self._exit = EXIT_OUTPUT
        self._stop()

    def _output_failed(self, exc: OutputError) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(OutputError):
                writer.close()
        if isinstance(exc, OutputClosed):
            self._exit = EXIT_PIPE
            self._stop()
        else:
            self._fatal(str(exc))

    def _close_writer(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close()
        except OutputError as exc:
            log.error("%s", exc)
            self._exit = EXIT_OUTPUT


def _line(fields: dict[bytes, bytes]) -> int:
    raw = fields.get(b"line", b"")
    return int(raw) if raw.isdigit() else 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
