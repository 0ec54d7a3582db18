"""The composition root of a run: job source -> pool(handlers) -> writer, with signals and drain.

Nothing here knows how a job is fetched or sent; it wires the parts together, decides which jobs
run (resume, shard), and turns the way the run ended into an exit code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from . import shutdown
from .api import Runner, RunObserver, build_handlers
from .config import Settings
from .errors import EXIT_OUTPUT, EXIT_PIPE, OutputClosed, OutputError, SetupError
from .http import INSECURE_WARNING, check_tls
from .jobs import JobParser
from .pool import Pool
from .resume import DoneIds, prepare_resume
from .sink import JsonlWriter
from .sources import Item, JobSource
from .stats import Progress, Stats

log = logging.getLogger("fetcher")

__all__ = ["Run", "RunObserver", "RunOptions", "build_handlers"]

EXIT_OK = 0
EXIT_FAILED_JOBS = 1
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    jobs: str
    output: str = "-"
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal
    shard: tuple[int, int] | None = None
    #  Set for the child processes of --processes: which slice of the (sharded) jobs is theirs,
    #  and the ids the parent found in the results file it owns and appends to (read once, by
    #  the parent, before it forked them).
    slice: tuple[int, int] | None = None
    skip_done: DoneIds | None = None
    summary: bool = True


def line_selector(
    shard: tuple[int, int] | None, slice: tuple[int, int] | None
) -> Callable[[int], bool] | None:
    """Which 1-based input lines a process runs: position modulo N is K for ``--shard K/N``,
    and of those every P-th for slice ``k/P``."""
    if shard is None and slice is None:
        return None
    k_shard, n_shard = shard or (0, 1)
    k_slice, n_slice = slice or (0, 1)

    def select(line: int) -> bool:
        position, rest = divmod(line - 1, n_shard)
        return rest == k_shard and position % n_slice == k_slice

    return select


def make_progress(
    stats: Stats,
    settings: Settings,
    progress: bool | None,
    *,
    source: JobSource | None = None,
    initial: int = 0,
) -> Progress:
    """A bar when asked for, or by default when stderr is a terminal; else periodic log lines
    (none at all with ``--no-progress``). The jobs of ``source`` are counted for the total."""
    bar = sys.stderr.isatty() if progress is None else progress
    interval = settings.progress_interval if progress is not False else None
    total = source.count().get if source is not None and (bar or interval) else None
    return Progress(stats, bar=bar, log_interval=interval, total=total, initial=initial)


def early_exit_code(error: OutputError | None, sig: signal.Signals | None) -> int | None:
    """The exit code of a run that the output or a signal ended early, logged; else None."""
    if isinstance(error, OutputClosed):
        return EXIT_PIPE
    if error is not None:
        log.error("%s", error)
        return EXIT_OUTPUT
    if sig is not None:
        log.warning("stopped by %s: rerun with --resume to finish", sig.name)
        return EXIT_SIGNAL[sig]
    return None


class FlushingWriter(JsonlWriter):
    """The results writer, telling ``on_flush`` each time its buffered lines reached the output.

    A line handed to the writer is only buffered; if the output fails before the next flush,
    it is never written. A run counts its results once they are flushed, so that the summary
    after a failed write counts only lines that are in the output.
    """

    on_flush: Callable[[], None] | None = None

    def flush(self) -> None:
        super().flush()
        if self.on_flush is not None:
            self.on_flush()


def open_output(settings: Settings, opts: RunOptions) -> tuple[FlushingWriter, DoneIds | None]:
    """The checks that can still refuse a run (OUT, TLS files), the ids ``--resume`` skips, and
    the opened results writer. Logged once per run: a --processes parent logs, its children not.

    An OUT that cannot be read to resume, or opened, is a setup error (exit 2): nothing ran yet.
    """
    check_output(opts)
    check_tls(settings)
    try:
        done = prepare_resume(opts.output) if opts.resume and opts.output != "-" else None
        if opts.skip_done is not None:
            done = opts.skip_done
        writer = FlushingWriter.open(
            opts.output, append=opts.resume, fsync_interval=settings.fsync_interval
        )
    except OutputError as exc:
        raise SetupError(str(exc)) from None
    assert isinstance(writer, FlushingWriter)  # open() builds its own class
    if opts.slice is None:
        if done is not None:
            log.info("resuming %s: %d jobs already have a result", opts.output, len(done))
        if not settings.tls.verify:
            log.warning(INSECURE_WARNING)
    return writer, done


def check_output(options: RunOptions) -> None:
    """Refuse to clobber or silently extend an existing results file."""
    if options.output == "-" or options.resume or options.overwrite:
        return
    try:
        size = os.path.getsize(options.output)
    except OSError:
        return
    if size > 0:
        raise SetupError(
            f"output {options.output} exists and is not empty: "
            "pass --resume to finish it or --overwrite to replace it"
        )


async def _skip_done(source: JobSource, done: DoneIds | None) -> AsyncIterator[Item]:
    if done is None:
        async for item in source:
            yield item
        return
    async for item in source:
        if item.id not in done:
            yield item


class Run:
    """One ``fetcher run``. ``await Run(...).execute()`` returns the exit code."""

    def __init__(
        self, settings: Settings, options: RunOptions, *, observer: RunObserver | None = None
    ) -> None:
        self.settings = settings
        self.options = options
        self.observer = observer
        self.stats = Stats()
        self._signal: signal.Signals | None = None
        self._output_error: OutputError | None = None
        self._pool: Pool | None = None
        self._writer: JsonlWriter | None = None
        self._progress: Progress | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    async def execute(self) -> int:
        opts = self.options
        # Everything that can refuse the run happens before any network use.
        parser = JobParser(smtp_profiles=self.settings.smtp.keys())
        source = JobSource.for_settings(
            opts.jobs, parser, self.settings, select=line_selector(opts.shard, opts.slice)
        )
        try:
            self._writer, done = open_output(self.settings, opts)
        except BaseException:
            source.close()
            raise
        self._progress = make_progress(
            self.stats, self.settings, opts.progress, source=source, initial=len(done or ())
        )
        # Results are counted (for progress and the summary) as their lines are flushed.
        unflushed = self._unflushed = Stats()
        self._writer.on_flush = lambda: self.stats.absorb(unflushed)
        loop = asyncio.get_running_loop()
        for sig in shutdown.STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            async with Runner(self.settings, observer=self.observer) as runner:
                self._pool = runner.pool(emit=self._emit)
                if shutdown.pending:
                    self._on_signal(shutdown.pending[0])
                jobs = source if done is None else _skip_done(source, done)
                await runner.execute(self._pool, jobs)
        finally:
            for sig in shutdown.STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            self._close_writer()  # first: the bar's last draw counts the last flushed lines
            self._progress.close()
            if opts.summary:
                print(self.stats.summary(), file=sys.stderr, flush=True)
        return self._exit_code()

    def _emit(self, result: dict[str, Any]) -> None:
        if self._output_error is not None:
            return
        assert self._writer is not None
        # Recorded first, as unflushed: a write() that flushes counts this line with its batch,
        # and a flush that fails drops it with the rest of the lines that were never written.
        self._unflushed.record(result)
        try:
            self._writer.write(result)
        except OutputError as exc:
            self._output_error = exc
            assert self._pool is not None
            self._pool.abort()
            return
        assert self._progress is not None
        self._progress.tick()

    def _close_writer(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close()
        except OutputError as exc:
            self._output_error = self._output_error or exc

    def _on_signal(self, sig: signal.Signals) -> None:
        pool = self._pool
        if pool is None:
            shutdown.pending[:] = [sig]
            return
        if self._signal is not None:
            log.warning("second signal: stopping now")
            pool.abort()
            return
        self._signal = sig
        grace = self.settings.shutdown_grace
        log.warning(
            "%s: no new jobs; waiting up to %g s for %d in flight (signal again to stop now)",
            sig.name,
            grace,
            pool.counters.in_flight,
        )
        pool.stop()
        self._grace_timer = asyncio.get_running_loop().call_later(grace, pool.abort)

    def _exit_code(self) -> int:
        early = early_exit_code(self._output_error, self._signal)
        if early is not None:
            return early
        return EXIT_OK if self.stats.failed == 0 else EXIT_FAILED_JOBS
