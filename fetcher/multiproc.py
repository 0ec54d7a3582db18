"""``fetcher run --processes P``: P child processes, one merged output.

Mechanism, chosen by measurement: every child reads the job file itself and keeps every P-th job
(a slice by position, skipped before parsing), and streams its result lines to the parent over a
pipe; the parent is the one writer of the output. The alternative — the parent parsing the file
and handing jobs out over pipes — costs the parent a JSON decode and encode per job on top of
the writing, and the parent then becomes the bottleneck on a two-core machine; reading a file
twice costs almost nothing by comparison (it is in the page cache). The cost of the slice
approach is that the job file must be a file: standard input can only be read once.

The parent keeps the single-process guarantees: it writes only whole lines (a child's pipe is
split at the last newline), resumes by cutting a torn tail and letting each child skip the ids
already written, and forwards SIGINT/SIGTERM to the children, which drain as one process would.
Children run in their own session, so a Ctrl-C in the terminal reaches them once, through the
parent, not twice (a second signal means "stop now").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import orjson

from . import shutdown
from .config import Settings
from .errors import OutputError, SetupError
from .jobs import JobParser
from .runner import (
    EXIT_FAILED_JOBS,
    EXIT_OK,
    EXIT_OUTPUT,
    RunOptions,
    early_exit_code,
    make_progress,
    open_output,
)
from .sink import JsonlWriter
from .sources import JobSource
from .stats import Progress, Stats

log = logging.getLogger("fetcher")

#  The child's settings travel in the environment, not argv, where `ps` would show secrets.
SETTINGS_ENV = "_FETCHER_CHILD_SETTINGS"
READ_CHUNK = 256 * 1024


def child_settings(settings: Settings) -> str:
    return settings.model_copy(update={"processes": 1}).model_dump_json()


class ParallelRun:
    def __init__(self, settings: Settings, options: RunOptions) -> None:
        self.settings = settings
        self.options = options
        self.stats = Stats()
        self._signal: signal.Signals | None = None
        self._output_error: OutputError | None = None
        self._children: list[asyncio.subprocess.Process] = []
        self._writer: JsonlWriter | None = None
        self._progress: Progress | None = None

    def _check(self) -> None:
        opts = self.options
        if opts.jobs == "-":
            raise SetupError("--processes needs a job file: standard input can be read only once")
        # Open (and for YAML, parse) the file once here, so a bad file stops the run with exit 2.
        JobSource(opts.jobs, JobParser(smtp_profiles=self.settings.smtp.keys())).close()

    async def execute(self) -> int:
        opts = self.options
        self._check()
        resume = opts.resume and opts.output != "-"
        self._writer, _ = open_output(self.settings, opts)
        self._progress = make_progress(self.stats, self.settings, opts.progress)
        loop = asyncio.get_running_loop()
        for sig in shutdown.STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        env = {**os.environ, SETTINGS_ENV: child_settings(self.settings)}
        count = self.settings.processes
        try:
            for k in range(count):
                argv = [
                    sys.executable,
                    "-m",
                    "fetcher",
                    "run",
                    opts.jobs,
                    "-o",
                    "-",
                    "--no-progress",
                    "--slice",
                    f"{k}/{count}",
                ]
                if opts.shard is not None:
                    argv += ["--shard", f"{opts.shard[0]}/{opts.shard[1]}"]
                if resume:
                    argv += ["--skip-done", opts.output]
                child = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.PIPE, env=env, start_new_session=True
                )
                self._children.append(child)
                if self._signal is not None:
                    child.send_signal(self._signal)  # the signal came while children started
            if shutdown.pending:
                self._on_signal(shutdown.pending[0])
            codes = await asyncio.gather(*(self._drain(child) for child in self._children))
        finally:
            for sig in shutdown.STOP_SIGNALS:
                loop.remove_signal_handler(sig)
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

    async def _drain(self, child: asyncio.subprocess.Process) -> int:
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
                self._take(data[:cut])
        return await child.wait()

    def _take(self, lines: bytes) -> None:
        assert self._writer is not None and self._progress is not None
        try:
            self._writer.write_raw(lines)
        except OutputError as exc:
            self._output_error = exc
            for child in self._children:
                if child.returncode is None:
                    child.kill()
            return
        record, tick = self.stats.record, self._progress.tick
        for line in lines.splitlines():
            record(_summary_fields(line))
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
            if child.returncode is None:
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


def _summary_fields(line: bytes) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(line)
    return result
