"""The composition root of a run: job source -> pool(handlers) -> writer, with signals and drain.

Nothing here knows how a job is fetched or sent; it wires the parts together, decides which jobs
run (resume, shard), and turns the way the run ended into an exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from . import shutdown
from .config import Settings
from .engine import Runner, RunObserver
from .errors import (
    EXIT_FAILED_JOBS,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_PIPE,
    EXIT_SIGNAL,
    OutputClosed,
    OutputError,
    SetupError,
)
from .jobs import HttpJob, JobParser
from .pool import Pool
from .resume import DoneIds, IdIndex, done_job_lines, estimate_lines, prepare_resume, read_done
from .revalidate import Revalidator
from .shaping import CsvEncoder, Encoder, encoder
from .sink import JsonlWriter
from .sources import Item, JobSource
from .stats import Progress, Stats
from .tls import INSECURE_WARNING, check_tls

log = logging.getLogger("fetcher")

__all__ = ["Run", "RunObserver", "RunOptions"]


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
    #  Output shaping (--fields, --format) and reruns (--retry-failed, --since PREV).
    fields: tuple[str, ...] | None = None
    format: str = "jsonl"
    retry_failed: str | None = None
    since: str | None = None
    #  Also set by the --processes parent for its children: the lines of the job file known
    #  to be done (a bitmap, resume.done_job_lines) and the --since index.
    skip_lines: bytearray | None = None
    nothing_left: bool = False
    revalidate: Revalidator | None = None


def line_selector(
    shard: tuple[int, int] | None,
    slice: tuple[int, int] | None,
    skip: bytearray | None = None,
) -> Callable[[int], bool] | None:
    """Which 1-based input lines a process runs: position modulo N is K for ``--shard K/N``,
    and of those every P-th for slice ``k/P``; never a line marked in ``skip`` (done)."""
    if skip is not None:
        inner = line_selector(shard, slice)
        size = len(skip) * 8

        def not_done(line: int) -> bool:
            if line < size and skip[line >> 3] >> (line & 7) & 1:
                return False
            return inner is None or inner(line)

        return not_done
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


@dataclass(frozen=True, kw_only=True)
class Opened:
    """What a run found before starting: its writer and the jobs it skips or revalidates."""

    writer: FlushingWriter
    done: DoneIds | None  # ids not to run (--resume: in OUT; --retry-failed: ok in PREV)
    skip_lines: bytearray | None  # job file lines whose id is in ``done``
    nothing_left: bool = False  # every line of the job file is done
    revalidate: Revalidator | None  # --since


def _check_prev(path: str, flag: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SetupError(f"cannot read {flag} file {path}: {exc.strerror}") from None


def _skipped(settings: Settings, opts: RunOptions) -> DoneIds | None:
    """The ids --resume (in OUT) and --retry-failed (ok in PREV) leave out."""
    resume = opts.resume and opts.output != "-"
    if not resume and opts.retry_failed is None:
        return None
    expected = (estimate_lines(opts.output) if resume else 0) + (
        estimate_lines(opts.retry_failed) if opts.retry_failed else 0
    )
    done = IdIndex(expected)
    if resume:
        header = None
        if opts.format == "csv":
            header = list(CsvEncoder(opts.fields).fields)
        prepare_resume(opts.output, csv_header=header, into=done)
    if opts.retry_failed is not None:
        read_done(opts.retry_failed, ok_only=True, into=done, why="for --retry-failed")
    return done


def encoder_for(opts: RunOptions) -> tuple[Encoder | None, bytes]:
    """The results file's encoder (None: full JSON lines) and its header."""
    if opts.fields is None and opts.format == "jsonl":
        return None, b""
    return encoder(opts.format, opts.fields)


def _plain_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".ndjson"))


def open_output(settings: Settings, opts: RunOptions) -> Opened:
    """The checks that can still refuse a run (OUT, PREV, TLS files), the jobs it skips, and
    the opened results writer. Logged once per run: a --processes parent logs, its children not.

    An OUT that cannot be read to resume, a PREV that cannot be read, an OUT that cannot be
    opened: each is a setup error (exit 2), and nothing ran yet.
    """
    check_output(opts)
    check_tls(settings)
    for path, flag in ((opts.retry_failed, "--retry-failed"), (opts.since, "--since")):
        if path is not None and opts.slice is None:
            _check_prev(path, flag)
    encode, header = encoder_for(opts)
    try:
        if opts.slice is None:
            done = _skipped(settings, opts)
            skip_lines, nothing_left = (
                done_job_lines(opts.jobs, done)
                if done and _plain_jsonl(opts.jobs)
                else (None, False)
            )
            revalidate = Revalidator.open(opts.since) if opts.since is not None else None
        else:
            done, skip_lines, revalidate = opts.skip_done, opts.skip_lines, opts.revalidate
            nothing_left = opts.nothing_left
        writer = FlushingWriter.open(
            opts.output,
            append=opts.resume,
            fsync_interval=settings.fsync_interval,
            encode=encode,
            header=header,
        )
    except OutputError as exc:
        raise SetupError(str(exc)) from None
    assert isinstance(writer, FlushingWriter)  # open() builds its own class
    if opts.slice is None:
        if done is not None and opts.resume:
            log.info("resuming %s: %d jobs already have a result", opts.output, len(done))
        elif done is not None:
            log.info("retrying what failed in %s: %d jobs were ok", opts.retry_failed, len(done))
        if revalidate is not None:
            log.info("revalidating against %s: %d ok lines", opts.since, len(revalidate))
        if not settings.tls.verify:
            log.warning(INSECURE_WARNING)
    return Opened(
        writer=writer,
        done=done,
        skip_lines=skip_lines,
        nothing_left=nothing_left,
        revalidate=revalidate,
    )


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


async def _nothing() -> AsyncIterator[Item]:
    return
    yield  # an async generator that yields nothing


async def _to_run(
    source: JobSource, done: DoneIds | None, revalidate: Revalidator | None
) -> AsyncIterator[Item]:
    """The jobs of ``source`` not done, with --since's conditional headers."""
    async for item in source:
        if done is not None and item.id in done:
            continue
        if revalidate is not None and isinstance(item, HttpJob):
            item = revalidate.prepare(item)
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
        self._output_error: OutputError | None = None
        self._pool: Pool | None = None
        self._writer: JsonlWriter | None = None
        self._progress: Progress | None = None
        self._grace = shutdown.Grace(settings.shutdown_grace)
        self._revalidate: Revalidator | None = None

    async def execute(self) -> int:
        opts = self.options
        # Everything that can refuse the run happens before any network use.
        parser = JobParser(smtp_profiles=self.settings.smtp.keys())
        source = JobSource.for_settings(
            opts.jobs, parser, self.settings, select=line_selector(opts.shard, opts.slice)
        )
        try:
            opened = open_output(self.settings, opts)
            if opened.skip_lines is not None:
                # A JSONL file (never stdin): opened again, to skip the lines done unread.
                source.close()
                select = line_selector(opts.shard, opts.slice, opened.skip_lines)
                source = JobSource.for_settings(opts.jobs, parser, self.settings, select=select)
        except BaseException:
            source.close()
            raise
        self._writer, done = opened.writer, opened.done
        # Asked for first: the pass that counts the jobs for the progress counts their hosts.
        forecast = source.forecast()
        revalidate = self._revalidate = opened.revalidate
        self._progress = make_progress(
            self.stats, self.settings, opts.progress, source=source, initial=len(done or ())
        )
        # Results are counted (for progress and the summary) as their lines are flushed.
        unflushed = self._unflushed = Stats()
        self._writer.on_flush = lambda: self.stats.absorb(unflushed)
        try:
            with shutdown.stop_signals(self._on_signal):
                # Only the fields --fields writes are computed for each result (engine.py).
                async with Runner(
                    self.settings, observer=self.observer, forecast=forecast, fields=opts.fields
                ) as runner:
                    self._pool = runner.pool(emit=self._emit)
                    shutdown.replay(self._on_signal)
                    if opened.nothing_left:  # every job is done: the file is not read again
                        source.close()
                        jobs: AsyncIterator[Item] | JobSource = _nothing()
                    elif done is None and revalidate is None:
                        jobs = source
                    else:
                        jobs = _to_run(source, done, revalidate)
                    await runner.execute(self._pool, jobs)
        finally:
            self._grace.cancel()
            self._close_writer()  # first: the bar's last draw counts the last flushed lines
            self._progress.close()
            if opts.summary:
                print(self.stats.summary(), file=sys.stderr, flush=True)
        return self._exit_code()

    def _emit(self, result: dict[str, Any]) -> None:
        if self._output_error is not None:
            return
        assert self._writer is not None
        if self._revalidate is not None:
            self._revalidate.finish(result)
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
        if self._grace.take(sig, self._pool):
            assert self._pool is not None
            self._grace.begin(self._pool)

    def _exit_code(self) -> int:
        early = early_exit_code(self._output_error, self._grace.signal)
        if early is not None:
            return early
        return EXIT_OK if self.stats.failed == 0 else EXIT_FAILED_JOBS
