"""``fetcher run --processes P``: P child processes, one merged output.

Mechanism, chosen by measurement: every child reads the job file itself and keeps every P-th job
(a slice by position, skipped before parsing), and streams its result lines to the parent over a
pipe; the parent is the one writer of the output. The alternative — the parent parsing the file
and handing jobs out over pipes — costs the parent a JSON decode and encode per job on top of
the writing, and the parent then becomes the bottleneck on a two-core machine; reading a file
twice costs almost nothing by comparison (it is in the page cache). The cost of the slice
approach is that the job file must be a file: standard input can only be read once.

The children are forked from the parent once it has started up (settings checked, output
opened), before it runs an event loop: a child starts with every module already imported and
the collector's frozen start-up objects shared, instead of importing it all again (about a
quarter of a second of CPU each, which on a small machine is taken from the fetching).

The parent keeps the single-process guarantees: it writes only whole lines (a child's pipe is
split at the last newline), resumes by cutting a torn tail and letting each child skip the ids
already written, and forwards SIGINT/SIGTERM to the children, which drain as one process would.
Children run in their own session, so a Ctrl-C in the terminal reaches them once, through the
parent, not twice (a second signal means "stop now").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import traceback
from typing import Any

import orjson
import uvloop

from . import shutdown
from .config import Settings
from .errors import (
    EXIT_FAILED_JOBS,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_OUTPUT,
    FetcherError,
    OutputError,
    SetupError,
    report,
)
from .jobs import JobParser
from .run import (
    Opened,
    Run,
    RunOptions,
    early_exit_code,
    line_selector,
    make_progress,
    open_output,
)
from .sink import JsonlWriter
from .sources import JobSource
from .stats import Progress, Stats

log = logging.getLogger("fetcher")

READ_CHUNK = 256 * 1024
#  A child that fails outside any expected error (a bug): the exit code of sysexits' EX_SOFTWARE.


class Child:
    """A forked child: the read end of its result pipe, and its exit status once it ended."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self.returncode: int | None = None
        self.stdout: asyncio.StreamReader | None = None
        self._ended: asyncio.Future[os.waitid_result | None] | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK)
        pipe = os.fdopen(self.fd, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        self.stdout = reader

    async def wait(self) -> int:
        """The exit code (negative: the signal that killed it), once the child has ended."""
        if self._ended is None:
            # A thread waits for the exit without reaping the child; the loop reaps it below,
            # after setting returncode. Signals are sent only while returncode is None, so
            # none can reach another process that was given the pid once it was free.
            self._ended = asyncio.ensure_future(
                asyncio.to_thread(os.waitid, os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            )
        await asyncio.shield(self._ended)  # a wait that is cancelled leaves the thread be
        if self.returncode is None:
            _, status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 - it has ended
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ParallelRun:
    def __init__(self, settings: Settings, options: RunOptions) -> None:
        self.settings = settings
        self.options = options
        self.stats = Stats()
        self._signal: signal.Signals | None = None
        self._output_error: OutputError | None = None
        self._children: list[Child] = []
        self._writer: JsonlWriter | None = None
        self._opened: Opened | None = None  # the writer, and what the children skip
        self._progress: Progress | None = None
        self._source: JobSource | None = None

    def start(self) -> None:
        """Check the job file, open the output and fork the children; call before any event
        loop runs in this process (a forked child must not inherit one)."""
        opts = self.options
        if opts.jobs == "-":
            raise SetupError("--processes needs a job file: standard input can be read only once")
        # Open (and for YAML, parse; for CSV, read the header of) the file once here, so a bad
        # file stops the run with exit 2. It stays the parent's, for the progress total.
        parser = JobParser(smtp_profiles=self.settings.smtp.keys())
        self._source = JobSource.for_settings(
            opts.jobs, parser, self.settings, select=line_selector(opts.shard, None)
        )
        self._source.close()
        self._opened = open_output(self.settings, opts)
        self._writer = self._opened.writer
        # Flushed now, or a child would inherit, and print again, what is still buffered.
        sys.stdout.flush()
        sys.stderr.flush()
        count = self.settings.processes
        # Stop signals wait while children are forked: a child forgets the parent's pending
        # signal (the parent forwards it) and a signal sent to it meanwhile is delivered after.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, shutdown.STOP_SIGNALS)
        try:
            for k in range(count):
                self._children.append(self._fork(k, count, mask))
        except BaseException as exc:
            for child in self._children:
                child.kill()
                os.waitpid(child.pid, 0)
            if isinstance(exc, OSError):
                raise SetupError(f"cannot start {count} processes: {exc.strerror}") from None
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _fork(self, k: int, count: int, mask: set[int | signal.Signals]) -> Child:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid:
            os.close(write_fd)
            return Child(pid, read_fd)
        # The child: only its own pipe stays open, as its stdout; the parent's output and the
        # other children's pipes are closed, so that each pipe ends when its reader does.
        try:
            shutdown.pending.clear()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.setsid()
            os.close(read_fd)
            for child in self._children:
                os.close(child.fd)
            assert self._writer is not None
            os.close(self._writer.fd)
            os.dup2(write_fd, 1)
            os.close(write_fd)
            assert self._opened is not None
            code = _child_main(self.settings, self.options, k, count, self._opened)
        except BaseException:  # noqa: BLE001 - nothing may escape into the parent's code
            traceback.print_exc()
            code = EXIT_INTERNAL
        finally:
            sys.stderr.flush()
        os._exit(code)

    async def execute(self) -> int:
        opts = self.options
        assert self._writer is not None, "start() first"
        self._progress = make_progress(
            self.stats,
            self.settings,
            opts.progress,
            source=self._source,
            initial=len(self._opened.done or ()) if self._opened is not None else 0,
        )
        codes: list[int] = []
        try:
            with shutdown.stop_signals(self._on_signal):
                for child in self._children:
                    await child.connect()
                shutdown.replay(self._on_signal)  # a signal that came while children started
                codes = await asyncio.gather(*(self._drain(child) for child in self._children))
        finally:
            for child in self._children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
            self._progress.close()
            try:
                self._writer.close()
            except OutputError as exc:
                self._output_error = self._output_error or exc
            print(self.stats.summary(), file=sys.stderr, flush=True)
        return self._exit_code(codes)

    async def _drain(self, child: Child) -> int:
        """Copy a child's whole result lines to the output until it exits; its exit code."""
        assert child.stdout is not None and self._writer is not None
        read = child.stdout.read
        pending = b""
        while chunk := await read(READ_CHUNK):
            if self._output_error is not None:
                continue  # keep the pipe flowing so the child can exit
            data = pending + chunk
            cut = data.rfind(b"\n") + 1
            pending = data[cut:]
            if cut:
                (self._take_shaped if self._writer.shaped else self._take)(data[:cut])
        return await child.wait()

    def _take(self, lines: bytes) -> None:
        assert self._writer is not None and self._progress is not None
        try:
            self._writer.write_raw(lines)
        except OutputError as exc:
            self._output_error = exc
            for child in self._children:
                child.kill()
            return
        record, tick = self.stats.record, self._progress.tick
        for line in lines.splitlines():
            record(_summary_fields(line))
            tick()

    def _take_shaped(self, lines: bytes) -> None:
        """Whole full lines from a child, each shaped (--fields, --format) as it is written."""
        assert self._writer is not None and self._progress is not None
        record, tick, write = self.stats.record, self._progress.tick, self._writer.write
        for line in lines.splitlines():
            result = _summary_fields(line)
            try:
                write(result)
            except OutputError as exc:
                self._output_error = exc
                for child in self._children:
                    child.kill()
                return
            record(result)
            tick()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._signal is None:
            self._signal = sig
            log.warning(
                "%s: stopping %d processes (signal again to stop now)",
                sig.name,
                len(self._children),
            )
        else:
            log.warning("second signal: stopping now")
        for child in self._children:
            child.send_signal(sig)

    def _exit_code(self, codes: list[int]) -> int:
        early = early_exit_code(self._output_error, self._signal)
        if early is not None:
            return early
        broken = [(k, c) for k, c in enumerate(codes) if c not in (EXIT_OK, EXIT_FAILED_JOBS)]
        for k, code in broken:
            log.error("process %d of %d exited with code %d", k, len(codes), code)
        if broken:
            log.error("results are incomplete: rerun with --resume to finish")
            return EXIT_OUTPUT
        return EXIT_OK if self.stats.failed == 0 else EXIT_FAILED_JOBS


def _child_main(settings: Settings, options: RunOptions, k: int, count: int, opened: Opened) -> int:
    """Slice ``k`` of ``count``, run as one process would, its full result lines on stdout
    (the parent shapes them); the jobs the parent found done are skipped."""
    child_options = RunOptions(
        jobs=options.jobs,
        output="-",
        resume=False,
        overwrite=False,
        progress=False,
        shard=options.shard,
        slice=(k, count),
        skip_done=opened.done,
        skip_lines=opened.skip_lines,
        nothing_left=opened.nothing_left,
        revalidate=opened.revalidate,
        summary=False,
    )
    run = Run(settings.model_copy(update={"processes": 1}), child_options)
    try:
        return uvloop.run(run.execute())
    except FetcherError as exc:
        return report(exc)


def _summary_fields(line: bytes) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(line)
    return result
