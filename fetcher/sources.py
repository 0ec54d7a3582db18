"""Job sources: a job file of any input format (plain, .gz or stdin), as an async iterator.

JSONL and URL lists are read in batches of lines, one batch held at a time, so a ten-million-line
file costs no more memory than a short one; CSV / TSV in batches of rows (inputs.py parses them).
A file on disk is read on the loop itself, BATCH_LINES lines a batch (the fastest way through a
big file). A pipe or terminal is read in a thread, so a slow writer never blocks the event loop,
and gives whatever lines have arrived, so a job piped in runs at once, not when 2048 more have
come. YAML has no streaming form worth the name, so a YAML job file is loaded whole (keep those
small; use JSONL for big batches).

Every format's job objects are merged over the config's ``job_defaults`` (a YAML file's own
``defaults`` sit between the two) before the parser validates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import queue
import re
import stat
import sys
import threading
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, TextIO, TypeVar

from .errors import JobFileError
from .forecast import URL_AUTHORITY, HostForecast
from .inputs import CsvRows, FirstLines, JobCount, check_job_defaults, input_format, url_object
from .jobs import HttpJob, InvalidJob, JobParser, MailJob, merge_defaults

if TYPE_CHECKING:
    from .config import Settings

BATCH_LINES = 2048
#  The most a pipe read asks for at once (a Linux pipe holds 64 KiB).
PIPE_READ_BYTES = 64 * 1024
#  A job line longer than this is refused (and skipped without being held in memory).
MAX_LINE_BYTES = 4 * 1024 * 1024

Item = HttpJob | MailJob | InvalidJob
Line = tuple[int, bytes | None]
#  A line (JSONL, URL lists) or a row (CSV, TSV: its cells, or why it is not a row).
Record = tuple[int, Any]
R = TypeVar("R")


def job_format(path: str, override: str | None = None) -> str:
    """``jsonl``, ``yaml``, ``urls``, ``csv`` or ``tsv``: ``override`` if given, else told by
    the file name; ``-`` is JSONL on stdin."""
    return input_format(path, override)


def open_jobs(path: str) -> BinaryIO:
    """Open a job file for reading; raises JobFileError with the reason."""
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
    """Reads a job file and yields validated jobs (or InvalidJob) with their line numbers.

    ``input_format`` overrides the format the name tells; ``url_column`` is the CSV / TSV column
    of the URLs; ``defaults`` (the config's ``job_defaults``) are merged under every job.
    """

    def __init__(
        self,
        path: str,
        parser: JobParser,
        *,
        select: Callable[[int], bool] | None = None,
        input_format: str | None = None,
        url_column: str = "url",
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.format = job_format(path, input_format)
        self._parser = parser
        #  Which lines (1-based) to read at all: shards and process slices skip the rest unparsed.
        self._select = select
        self._defaults = dict(defaults or {})
        if self._defaults:
            check_job_defaults(self._defaults, parser.environ)
        #  ${NAME} in the defaults is expanded job by job (unexpanded in what enqueue stores).
        self._expand_defaults = _has_reference(self._defaults)
        self._count: JobCount | None = None
        self._forecast: HostForecast | None = None
        self._yielded = 0
        self._file = open_jobs(path)
        #  A pipe's descriptor, duplicated, when CSV rows are read from it (see _StreamReader).
        self._pipe_fd: int | None = None
        self._rows: CsvRows | None = None
        self._yaml_items: list[Item] = []
        try:
            if self.format == "yaml":
                # Loaded now, so that a file that is not valid YAML stops the run before it
                # starts (exit 2, one line), not after the output was opened.
                try:
                    self._yaml_items = self._load_yaml()
                finally:
                    self.close()
            elif self.format in ("csv", "tsv"):
                # The header is read now: a missing URL column is a usage error, exit 2.
                self._rows = self._open_rows(url_column)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_settings(
        cls,
        path: str,
        parser: JobParser,
        settings: Settings,
        *,
        select: Callable[[int], bool] | None = None,
    ) -> JobSource:
        """A source read as ``settings`` say (input_format, url_column, job_defaults)."""
        return cls(
            path,
            parser,
            select=select,
            input_format=settings.input_format,
            url_column=settings.url_column,
            defaults=settings.job_defaults,
        )

    @property
    def ids_are_positions(self) -> bool:
        """Whether every id is its line or row number, so none can repeat."""
        return self.format == "urls" or (self._rows is not None and not self._rows.has_id)

    def count(self) -> JobCount:
        """The number of jobs this source will yield, counted in the background."""
        if self._count is None:
            known = None
            if self.format == "yaml":
                select = self._select
                known = sum(1 for i in self._yaml_items if select is None or select(i.line))
            self._count = JobCount(
                self.path, self.format, select=self._select, known=known, forecast=self._forecast
            )
        return self._count

    def forecast(self) -> HostForecast | None:
        """Each host's requests still to come (forecast.py), counted in the same background pass
        as the jobs: for a JSONL file or a URL list on disk, asked for before ``count``."""
        if self._count is None and self.format in URL_AUTHORITY:
            descriptor = _descriptor(self._file)
            if descriptor is not None and descriptor[1]:  # a pipe is not read twice
                self._forecast = HostForecast(os.fstat(descriptor[0]).st_size)
                self.count()
        return self._forecast

    def close(self) -> None:
        if self._file is not sys.stdin.buffer:
            self._file.close()
        if self._pipe_fd is not None:
            os.close(self._pipe_fd)
            self._pipe_fd = None

    async def __aiter__(self) -> AsyncIterator[Item]:
        try:
            select = self._select
            if self.format == "yaml":
                for item in self._yaml_items:
                    if select is None or select(item.line):
                        yield item
            else:
                decode = self._decoder()
                # Closed with the source, so that a stream's reader thread is told to end.
                async with contextlib.aclosing(self._batches()) as batches:
                    async for batch in batches:
                        for lineno, raw in batch:
                            if select is None or select(lineno):
                                job = decode(lineno, raw)
                                if job is not None:
                                    self._yielded += 1
                                    yield job
                if self._count is not None:
                    self._count.settle(self._yielded)
        finally:
            self.close()

    async def _batches(self) -> AsyncGenerator[list[Record], None]:
        descriptor = _descriptor(self._file)
        if descriptor is not None and descriptor[1] and self._pipe_fd is None:
            # A file on disk (or its decompressor) answers at once: a batch is read on the
            # loop in about a millisecond, less than a thread per batch cost in handing the
            # interpreter back and forth between the thread and the loop.
            records = self._records()
            while batch := _take(records, BATCH_LINES):
                yield batch
                # Between batches the loop gets a turn even when no job had to wait (a
                # file of refused lines): signals, progress and flushes are not held up.
                await asyncio.sleep(0)
            return
        if self._rows is not None:
            reader: _StreamReader[Record] = _StreamReader(self._row_batches(), self._take_pipe_fd())
        elif descriptor is None or self.path.endswith(".gz"):
            # A .gz decompressor already holds data read ahead of the descriptor: it is read in
            # batches in a thread (on a pipe, a batch then waits for its lines to come).
            lines = self._lines()
            while batch := await asyncio.to_thread(_take, lines, BATCH_LINES):
                yield batch
            return
        else:
            fd = os.dup(descriptor[0])
            reader = _StreamReader(_pipe_line_batches(fd, self.path), fd)
        try:
            while batch := await reader.batch():
                yield batch
        finally:
            reader.close()

    def __iter__(self) -> Iterator[Item]:
        """Synchronous reading, for ``fetcher validate`` and other callers without a loop."""
        try:
            select = self._select
            if self.format == "yaml":
                for item in self._yaml_items:
                    if select is None or select(item.line):
                        yield item
            else:
                decode = self._decoder()
                for lineno, raw in self._records():
                    if select is None or select(lineno):
                        job = decode(lineno, raw)
                        if job is not None:
                            yield job
        finally:
            self.close()

    def _records(self) -> Iterator[Record]:
        return self._lines() if self._rows is None else iter(self._rows)

    def _lines(self) -> Iterator[Line]:
        # A file can fail part way (a truncated .gz, an I/O error): stop the run with the
        # reason rather than end it early as if the file were complete.
        try:
            yield from _numbered_lines(self._file)
        except (OSError, EOFError, zlib.error) as exc:
            reason = getattr(exc, "strerror", None) or _first_line(str(exc))
            raise JobFileError(f"cannot read job file {self.path}: {reason}") from None

    def _decoder(self) -> Callable[[int, Any], Item | None]:
        if self.format == "jsonl":
            return self._parse_line
        if self.format == "urls":
            return self._parse_url_line
        return self._parse_row

    def _parse_line(self, lineno: int, raw: bytes | None) -> Item:
        if raw is None:
            return self._parser.invalid(lineno, f"line is longer than {MAX_LINE_BYTES} bytes")
        return self._parser.parse_json(
            raw, lineno, defaults=self._defaults, expand_defaults=self._expand_defaults
        )

    def _parse_url_line(self, lineno: int, raw: bytes | None) -> Item | None:
        obj = url_object(lineno, raw, MAX_LINE_BYTES)
        if obj is None or isinstance(obj, InvalidJob):
            return obj
        return self._parse_data(obj, lineno)

    def _parse_row(self, number: int, row: Any) -> Item:
        assert self._rows is not None
        obj = self._rows.job_object(number, row)
        if isinstance(obj, InvalidJob):
            return obj
        return self._parse_data(obj, number)

    def _parse_data(self, obj: dict[str, Any], lineno: int) -> Item:
        """A job object of a URL list or CSV row: data, never expanded; under the defaults."""
        if not self._defaults:
            return self._parser.parse(obj, lineno, expand=False)
        if self._expand_defaults:
            # The defaults' references are expanded, the data's kept literal ($${ is ${).
            obj = _escape_references(obj)
        return self._parser.parse(
            merge_defaults(self._defaults, obj), lineno, expand=self._expand_defaults
        )

    def _open_rows(self, url_column: str) -> CsvRows:
        read: Callable[[int], bytes]
        descriptor = _descriptor(self._file)
        if self.path == "-" and descriptor is not None and not descriptor[1]:
            # A pipe: read through a duplicate of its descriptor, by a thread once the run
            # starts (see _StreamReader); the header is read from it here, before any thread.
            self._pipe_fd = fd = os.dup(descriptor[0])

            def read(n: int) -> bytes:
                return os.read(fd, n)
        else:
            read = self._file.read1  # type: ignore[attr-defined]  # buffered files and gzip
        where = "<stdin>" if self.path == "-" else self.path
        try:
            return CsvRows(read, path=where, tsv=self.format == "tsv", url_column=url_column)
        except (EOFError, zlib.error) as exc:
            raise JobFileError(f"cannot read job file {self.path}: {exc}") from None

    def _take_pipe_fd(self) -> int | None:
        fd, self._pipe_fd = self._pipe_fd, None
        return fd

    def _row_batches(self) -> Iterator[list[Record]]:
        """Batches of rows for a thread to read: a batch ends at BATCH_LINES rows, or sooner
        when no complete line is left to parse (so rows piped in run as they arrive)."""
        assert self._rows is not None
        lines = self._rows.lines
        batch: list[Record] = []
        try:
            for record in self._rows:
                batch.append(record)
                if len(batch) >= BATCH_LINES or lines.drained:
                    yield batch
                    batch = []
        except (OSError, EOFError, zlib.error) as exc:
            reason = getattr(exc, "strerror", None) or _first_line(str(exc))
            raise JobFileError(f"cannot read job file {self.path}: {reason}") from None
        if batch:
            yield batch

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
        if self._defaults:
            # The file's own defaults win over the config's, the job's own fields over both.
            defaults = merge_defaults(self._defaults, defaults)
        return [
            self._parser.parse(merge_defaults(defaults, job) if defaults else job, pos)
            for pos, job in enumerate(jobs, 1)
        ]


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


class _StreamReader(Generic[R]):
    """Batches read from a pipe by a daemon thread, one on each request.

    A blocked read of a pipe cannot be cancelled, and ``asyncio.to_thread`` threads are waited
    for when the loop closes: a run stopped by a signal would hang until the writer of stdin
    closed it. This thread is a daemon that nothing waits for, and it reads a duplicate of the
    descriptor (``fd``, closed by the thread when it ends), so closing the source never leaves
    it reading a reused one. It reads only when asked, so one batch at a time is in memory.
    """

    def __init__(self, batches: Iterator[list[R]], fd: int | None) -> None:
        self._batches = batches
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._requests: queue.SimpleQueue[asyncio.Future[list[R]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="fetcher-jobs", daemon=True)
        self._thread.start()

    async def batch(self) -> list[R]:
        """The next records: at least one, as many as one read brought; [] at the end."""
        future: asyncio.Future[list[R]] = self._loop.create_future()
        self._requests.put(future)
        return await future

    def close(self) -> None:
        # The thread ends at its next request; one blocked in a read stays so until exit.
        self._requests.put(None)

    def _serve(self) -> None:
        try:
            while (future := self._requests.get()) is not None:
                try:
                    batch: list[R] | BaseException = next(self._batches, [])
                except JobFileError as exc:
                    batch = exc
                try:
                    self._loop.call_soon_threadsafe(_settle, future, batch)
                except RuntimeError:
                    return  # the loop is closed: nobody is waiting any more
                if not batch or isinstance(batch, BaseException):
                    return
        finally:
            if self._fd is not None:
                os.close(self._fd)


def _pipe_line_batches(fd: int, path: str) -> Iterator[list[Line]]:
    """The lines that each read of a pipe brings (reads that end no line are read past)."""
    splitter = _LineSplitter()
    while True:
        try:
            chunk = os.read(fd, PIPE_READ_BYTES)
        except OSError as exc:
            raise JobFileError(f"cannot read job file {path}: {exc.strerror}") from None
        lines = splitter.feed(chunk) if chunk else splitter.end()
        if lines:
            yield lines
        if not chunk:
            return


#  What the expansion would replace (config.expand_env); a $ before it makes it literal.
_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def _escape_references(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with every ``${NAME}`` in its strings kept literal through the expansion."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, str):
            out[key] = _REFERENCE.sub(r"$\g<0>", value) if "${" in value else value
        elif isinstance(value, dict):
            out[key] = _escape_references(value)
        else:
            out[key] = value
    return out


def _has_reference(node: Any) -> bool:
    if isinstance(node, str):
        return "${" in node
    if isinstance(node, Mapping):
        return any(_has_reference(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_reference(v) for v in node)
    return False


def _settle(future: asyncio.Future[list[R]], outcome: list[R] | BaseException) -> None:
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


class JobCheck:
    """What ``validate`` and ``enqueue`` say about a job file: one ``FILE:LINE: TYPE: message``
    line for each bad job and each repeated id, and the counts."""

    def __init__(self, jobs_path: str, source: JobSource, out: TextIO) -> None:
        self.where = "<stdin>" if jobs_path == "-" else jobs_path
        self.total = self.bad = 0
        self._out = out
        #  Line numbers as ids cannot repeat: a URL list is checked in constant memory.
        self._seen = None if source.ids_are_positions else FirstLines()

    def good(self, item: Item) -> bool:
        """Whether ``item`` is a valid job with an id not seen before; reports it if not."""
        self.total += 1
        if isinstance(item, InvalidJob):
            return self._report(item.line, item.type, item.message)
        if self._seen is not None:
            first = self._seen.first(item.id, item.line)
            if first != item.line:
                return self._report(
                    item.line, "invalid_job", f"id {item.id!r} repeats line {first}"
                )
        return True

    def _report(self, line: int, type: str, message: str) -> bool:
        self.bad += 1
        print(f"{self.where}:{line}: {type}: {message}", file=self._out)
        return False
