"""Job sources: a JSONL stream (plain, .gz or stdin) or a YAML document, as an async iterator.

JSONL is read in batches, one batch held at a time, so a ten-million-line file costs no more
memory than a short one. A file on disk is read on the loop itself, BATCH_LINES lines a batch
(the fastest way through a big file). A pipe or terminal is read in a thread, so a slow writer
never blocks the event loop, and gives whatever lines have arrived, so a job piped in runs at
once, not when 2048 more have come. YAML has no streaming form worth the name, so a YAML job
file is loaded whole (keep those small; use JSONL for big batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import queue
import stat
import sys
import threading
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any, BinaryIO

import orjson

from .errors import JobFileError
from .jobs import HttpJob, InvalidJob, JobParser, MailJob

SUFFIXES = (".jsonl", ".ndjson", ".yaml", ".yml")
BATCH_LINES = 2048
#  The most a pipe read asks for at once (a Linux pipe holds 64 KiB).
PIPE_READ_BYTES = 64 * 1024
#  A job line longer than this is refused (and skipped without being held in memory).
MAX_LINE_BYTES = 4 * 1024 * 1024

Item = HttpJob | MailJob | InvalidJob
Line = tuple[int, bytes | None]


def job_format(path: str) -> str:
    """``jsonl`` or ``yaml`` from the file name; ``-`` is JSONL on stdin."""
    if path == "-":
        return "jsonl"
    name = path[:-3] if path.endswith(".gz") else path
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return "yaml" if suffix in (".yaml", ".yml") else "jsonl"
    raise JobFileError(
        f"{path}: job files must end in .jsonl, .ndjson, .yaml or .yml (optionally .gz), or be -"
    )


def open_jobs(path: str) -> BinaryIO:
    """Open a job file for reading; raises JobFileError with the reason."""
    job_format(path)
    if path == "-":
        return sys.stdin.buffer
    try:
        if path.endswith(".gz"):
            gz = gzip.open(path, "rb")  # noqa: SIM115 - JobSource closes it
            gz.peek(1)  # fail now, not mid-run, on a file that is not gzip
            return gz  # type: ignore[return-value]
        return open(path, "rb")
    except (OSError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise JobFileError(f"cannot read job file {path}: {reason}") from None


class JobSource:
    """Reads a job file and yields validated jobs (or InvalidJob) with their line numbers."""

    def __init__(
        self, path: str, parser: JobParser, *, select: Callable[[int], bool] | None = None
    ) -> None:
        self.path = path
        self.format = job_format(path)
        self._parser = parser
        #  Which lines (1-based) to read at all: shards and process slices skip the rest unparsed.
        self._select = select
        self._file = open_jobs(path)
        self._yaml_items: list[Item] = []
        if self.format == "yaml":
            # Loaded now, so that a file that is not valid YAML stops the run before it starts
            # (exit 2, one line), not after the output was opened.
            try:
                self._yaml_items = self._load_yaml()
            finally:
                self.close()

    def close(self) -> None:
        if self._file is not sys.stdin.buffer:
            self._file.close()

    async def __aiter__(self) -> AsyncIterator[Item]:
        try:
            select = self._select
            if self.format == "yaml":
                for item in self._yaml_items:
                    if select is None or select(item.line):
                        yield item
            else:
                # Closed with the source, so that a stream's reader thread is told to end.
                async with contextlib.aclosing(self._batches()) as batches:
                    async for batch in batches:
                        for lineno, raw in batch:
                            if select is None or select(lineno):
                                yield self._parse_line(lineno, raw)
        finally:
            self.close()

    async def _batches(self) -> AsyncGenerator[list[Line], None]:
        descriptor = _descriptor(self._file)
        if descriptor is not None and descriptor[1]:
            # A file on disk (or its decompressor) answers at once: a batch is read on the
            # loop in about a millisecond, less than a thread per batch cost in handing the
            # interpreter back and forth between the thread and the loop.
            lines = self._lines()
            while batch := _take(lines, BATCH_LINES):
                yield batch
                # Between batches the loop gets a turn even when no job had to wait (a
                # file of refused lines): signals, progress and flushes are not held up.
                await asyncio.sleep(0)
            return
        if descriptor is None or self.path.endswith(".gz"):
            # A .gz decompressor already holds data read ahead of the descriptor: it is read in
            # batches in a thread (on a pipe, a batch then waits for its lines to come).
            lines = self._lines()
            while batch := await asyncio.to_thread(_take, lines, BATCH_LINES):
                yield batch
            return
        reader = _StreamReader(descriptor[0], self.path)
        try:
            while batch := await reader.batch():
                yield batch
        finally:
            reader.close()

    def __iter__(self) -> Iterator[Item]:
        """Synchronous reading, for ``fetcher validate`` and other callers without a loop."""
        try:
            if self.format == "yaml":
                yield from self._yaml_items
            else:
                for lineno, raw in self._lines():
                    yield self._parse_line(lineno, raw)
        finally:
            self.close()

    def _lines(self) -> Iterator[Line]:
        # A file can fail part way (a truncated .gz, an I/O error): stop the run with the
        # reason rather than end it early as if the file were complete.
        try:
            yield from _numbered_lines(self._file)
        except (OSError, EOFError, zlib.error) as exc:
            reason = getattr(exc, "strerror", None) or _first_line(str(exc))
            raise JobFileError(f"cannot read job file {self.path}: {reason}") from None

    def _parse_line(self, lineno: int, raw: bytes | None) -> Item:
        if raw is None:
            return self._parser.invalid(lineno, f"line is longer than {MAX_LINE_BYTES} bytes")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._parser.invalid(lineno, f"not valid JSON: {_first_line(str(exc))}")
        # Expanding ${NAME} walks the whole job; skip the walk when the line holds no reference.
        return self._parser.parse(obj, lineno, expand=b"${" in raw)

    def _load_yaml(self) -> list[Item]:
        from . import yamlload  # PyYAML is imported only by runs that read YAML

        try:
            doc = yamlload.load(self._file)
        except yamlload.YAMLError as exc:
            at, problem = yamlload.describe(exc)
            problem = problem or _first_line(str(exc))
            raise JobFileError(f"job file {self.path}{at}: not valid YAML: {problem}") from None
        except (OSError, EOFError) as exc:
            raise JobFileError(f"cannot read job file {self.path}: {exc}") from None
        except UnicodeDecodeError:
            raise JobFileError(f"job file {self.path}: not UTF-8 text") from None
        except RecursionError:
            raise JobFileError(f"job file {self.path}: nested too deeply") from None
        defaults: dict[str, Any] = {}
        if doc is None:
            jobs: list[Any] = []
        elif isinstance(doc, list):
            jobs = doc
        elif isinstance(doc, dict) and set(doc) <= {"defaults", "jobs"}:
            defaults = doc.get("defaults") or {}
            jobs = doc.get("jobs") or []
            if not isinstance(defaults, dict) or not isinstance(jobs, list):
                raise JobFileError(
                    f"job file {self.path}: 'defaults' must be a mapping and 'jobs' a list"
                )
        else:
            raise JobFileError(
                f"job file {self.path}: expected a list of jobs "
                "or a mapping with 'defaults' and 'jobs'"
            )
        return [
            self._parser.parse(merge_defaults(defaults, job) if defaults else job, pos)
            for pos, job in enumerate(jobs, 1)
        ]


def merge_defaults(defaults: dict[str, Any], job: Any) -> Any:
    """The job over its defaults; ``headers`` and ``params`` are merged one level deep."""
    if not isinstance(job, dict):
        return job
    merged = {**defaults, **job}
    for key in ("headers", "params"):
        if isinstance(defaults.get(key), dict) and isinstance(job.get(key), dict):
            merged[key] = {**defaults[key], **job[key]}
    return merged


def _numbered_lines(f: BinaryIO) -> Iterator[Line]:
    """(line number, line) for every non-blank line; None for a line too long to hold."""
    lineno = 0
    readline = f.readline
    while True:
        raw = readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := readline(io.DEFAULT_BUFFER_SIZE * 16)) and not rest.endswith(b"\n"):
                pass
            yield lineno, None
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.strip():
            yield lineno, raw


def _take(it: Iterator[Line], n: int) -> list[Line]:
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == n:
            break
    return batch


def _descriptor(f: BinaryIO) -> tuple[int, bool] | None:
    """The descriptor under ``f`` (under a decompressor too) and whether it is a regular file,
    read in full batches; else a pipe, terminal or socket, read as it comes. None without one."""
    try:
        fd = f.fileno()
        return fd, stat.S_ISREG(os.fstat(fd).st_mode)
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None


class _StreamReader:
    """Batches of the lines that have arrived on a pipe, read by a daemon thread on request.

    A blocked read of a pipe cannot be cancelled, and ``asyncio.to_thread`` threads are waited
    for when the loop closes: a run stopped by a signal would hang until the writer of stdin
    closed it. This thread is a daemon that nothing waits for, and it reads a duplicate of the
    descriptor, so closing the source never leaves it reading a reused one. It reads only when
    asked, so one batch at a time is in memory.
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd = os.dup(fd)
        self._path = path
        self._loop = asyncio.get_running_loop()
        self._lines = _LineSplitter()
        self._requests: queue.SimpleQueue[asyncio.Future[list[Line]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="fetcher-jobs", daemon=True)
        self._thread.start()

    async def batch(self) -> list[Line]:
        """The next lines: at least one, as many as one read brought; [] at the end."""
        future: asyncio.Future[list[Line]] = self._loop.create_future()
        self._requests.put(future)
        return await future

    def close(self) -> None:
        # The thread ends at its next request; one blocked in a read stays so until exit.
        self._requests.put(None)

    def _serve(self) -> None:
        try:
            while (future := self._requests.get()) is not None:
                try:
                    lines: list[Line] | BaseException = self._read_batch()
                except JobFileError as exc:
                    lines = exc
                try:
                    self._loop.call_soon_threadsafe(_settle, future, lines)
                except RuntimeError:
                    return  # the loop is closed: nobody is waiting any more
                if not lines or isinstance(lines, BaseException):
                    return
        finally:
            os.close(self._fd)

    def _read_batch(self) -> list[Line]:
        while True:
            try:
                chunk = os.read(self._fd, PIPE_READ_BYTES)
            except OSError as exc:
                raise JobFileError(f"cannot read job file {self._path}: {exc.strerror}") from None
            lines = self._lines.feed(chunk) if chunk else self._lines.end()
            if lines or not chunk:
                return lines


def _settle(future: asyncio.Future[list[Line]], outcome: list[Line] | BaseException) -> None:
    if future.done():
        return  # cancelled: the run stopped reading
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _LineSplitter:
    """Cuts a stream of chunks into numbered lines, exactly as ``_numbered_lines`` reads a file:
    blank lines counted but skipped, a BOM on line 1 dropped, None for a line too long to hold."""

    def __init__(self) -> None:
        self._lineno = 0
        self._partial = bytearray()
        #  Inside a line already reported as too long: drop bytes up to its newline.
        self._skipping = False

    def feed(self, chunk: bytes) -> list[Line]:
        out: list[Line] = []
        start = 0
        while (end := chunk.find(b"\n", start) + 1) > 0:
            piece = chunk[start:end]
            start = end
            if self._skipping:
                self._skipping = False
            elif self._partial:
                self._partial += piece
                self._line(bytes(self._partial), out)
                self._partial.clear()
            else:
                self._line(piece, out)
        if start < len(chunk) and not self._skipping:
            self._partial += chunk[start:]
            if len(self._partial) > MAX_LINE_BYTES:
                self._partial.clear()
                self._skipping = True
                self._lineno += 1
                out.append((self._lineno, None))
        return out

    def end(self) -> list[Line]:
        """The last line, when the stream did not end with a newline."""
        out: list[Line] = []
        if self._partial:
            self._line(bytes(self._partial), out)
            self._partial.clear()
        return out

    def _line(self, raw: bytes, out: list[Line]) -> None:
        self._lineno += 1
        if len(raw) - raw.endswith(b"\n") > MAX_LINE_BYTES:
            out.append((self._lineno, None))
            return
        if self._lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.strip():
            out.append((self._lineno, raw))


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text
