"""The inputs people already have, beside JSONL and YAML job files: URL lists and CSV / TSV.

Each reader turns a line or a row into the object a JSONL line would decode to
(``{"url": ..., "id": ..., "meta": {...}}``), so the job parser validates every format alike and
``job_defaults`` merge the same way. Everything streams: a URL list is read line by line with
the JSONL machinery (sources.py), a CSV file through the stdlib ``csv`` module fed with lines
cut from chunks, so a file of ten million rows costs what one of ten does.

Row and line data are never expanded for ``${NAME}``: a URL list or a spreadsheet is data, often
from elsewhere, and a cell saying ``${API_TOKEN}`` must not put a secret into a result line.

``JobCount`` counts the jobs of a file in a daemon thread, for the progress bar's total.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import os
import re
import stat
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .config import expand_env
from .errors import ConfigError, JobFileError
from .forecast import URL_AUTHORITY, HostForecast
from .jobs import HttpJob, InvalidJob, MailJob
from .resume import id_hash
from .timeutil import utc_now_iso

FORMATS = ("jsonl", "yaml", "urls", "csv", "tsv")
SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".txt": "urls",
    ".csv": "csv",
    ".tsv": "tsv",
}
#  A CSV field or line longer than this is refused, as a JSONL line is (sources.MAX_LINE_BYTES).
MAX_FIELD_CHARS = 4 * 1024 * 1024
READ_BYTES = 64 * 1024
#  The part of a .gz file decompressed to estimate its total from the compression ratio.
GZIP_SAMPLE_BYTES = 4 * 1024 * 1024
#  Counted a piece at a time: the regex holds the interpreter for about a millisecond each.
COUNT_CHUNK_BYTES = 256 * 1024

#  The csv module keeps one process-wide limit (131,072 characters by default).
csv.field_size_limit(MAX_FIELD_CHARS)

_JOB_KEYS = frozenset(
    name
    for model in (HttpJob, MailJob)
    for field_name, field in model.model_fields.items()
    for name in (field_name, field.alias or field_name)
) - {"json_body", "sender"}


def input_format(path: str, override: str | None = None) -> str:
    """The format of ``path``: ``override`` (``--input-format``) if given, else told by the
    name (a ``.gz`` after the suffix is looked through); ``-`` is JSONL on stdin."""
    if override is not None:
        if override not in FORMATS:
            raise JobFileError(f"--input-format must be one of {', '.join(FORMATS)}")
        return override
    if path == "-":
        return "jsonl"
    name = path[:-3] if path.endswith(".gz") else path
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise JobFileError(
        f"{path}: job files must end in .jsonl, .ndjson, .yaml, .yml, .txt, .csv or .tsv "
        "(optionally .gz), or be - (give the format of another name with --input-format)"
    )


def check_job_defaults(defaults: Mapping[str, Any], environ: Mapping[str, str]) -> None:
    """Refuse, before anything runs, ``job_defaults`` that would make every job invalid."""
    unknown = sorted(set(defaults) - _JOB_KEYS)
    if unknown:
        raise ConfigError(f"config error in job_defaults: unknown job field {unknown[0]!r}")
    if "id" in defaults:
        raise ConfigError("config error in job_defaults: id: every job has its own id")
    try:
        _expand_all(defaults, environ)
    except KeyError as exc:
        raise ConfigError(
            f"config error in job_defaults: environment variable {exc.args[0]} is not set"
        ) from None


def _expand_all(node: Any, environ: Mapping[str, str]) -> None:
    """Expand every ``${NAME}`` under ``node`` (raising KeyError for a missing one), to check."""
    if isinstance(node, str):
        if "${" in node:
            expand_env(node, environ)  # type: ignore[arg-type]
    elif isinstance(node, Mapping):
        for value in node.values():
            _expand_all(value, environ)
    elif isinstance(node, list):
        for value in node:
            _expand_all(value, environ)


def invalid_url(line: int, message: str, *, id: str | None = None) -> InvalidJob:
    return InvalidJob(
        id=id if id is not None else str(line),
        line=line,
        kind="http",
        type="invalid_url",
        message=message,
        read_at=utc_now_iso(),
    )


def url_object(lineno: int, raw: bytes | None, max_line: int) -> dict[str, Any] | InvalidJob | None:
    """The job object of one URL-list line; None for a comment; InvalidJob for a line that
    cannot hold a URL at all (the parser judges the URL itself)."""
    if raw is None:
        return invalid_url(lineno, f"line is longer than {max_line} bytes")
    text = raw.strip()
    if text.startswith(b"#"):
        return None
    try:
        url = text.decode()
    except UnicodeDecodeError:
        return invalid_url(lineno, "line is not UTF-8 text")
    return {"url": url}


# -- CSV / TSV ----------------------------------------------------------------------------------


class TextLines:
    """Lines of text (each with its newline) cut from the chunks ``read(n)`` returns.

    Fed to ``csv.reader``, which then sees a quoted newline as part of its field. ``drained``
    is true once every complete line read so far has been handed out: on a pipe, that is the
    moment to pass the rows on rather than block in a read for more.
    """

    def __init__(self, read: Callable[[int], bytes], path: str) -> None:
        self._read = read
        self._path = path
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("surrogateescape")
        self._lines: list[str] = []
        self._next = 0
        self._partial = ""
        self._ended = False
        self.drained = True

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while self._next >= len(self._lines):
            if self._ended:
                raise StopIteration
            self._fill()
        line = self._lines[self._next]
        self._next += 1
        self.drained = self._next >= len(self._lines)
        return line

    def _fill(self) -> None:
        try:
            chunk = self._read(READ_BYTES)
        except (OSError, EOFError, zlib.error) as exc:
            # A file can fail part way (a truncated .gz, an I/O error): the run stops with the
            # reason rather than end early as if the file were complete.
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
            raise JobFileError(f"cannot read job file {self._path}: {reason}") from None
        text = self._partial + self._decoder.decode(chunk, final=not chunk)
        if not chunk:
            self._ended = True
            self._lines, self._next, self._partial = ([text] if text else []), 0, ""
            return
        cut = text.rfind("\n") + 1
        self._lines, self._next, self._partial = text[:cut].splitlines(True), 0, text[cut:]
        if len(self._partial) > MAX_FIELD_CHARS:
            raise JobFileError(
                f"job file {self._path}: a line is longer than {MAX_FIELD_CHARS} characters"
            )


def _not_text(value: str) -> bool:
    """Whether ``value`` holds bytes that were not UTF-8 (kept as lone surrogates)."""
    if value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


Row = tuple[int, list[str] | str]


class CsvRows:
    """The rows of a CSV or TSV stream after its header, numbered from 1, blank rows skipped.

    The header is read when this is made, so that a missing URL column stops the run (exit 2)
    before anything runs (``url_column`` None: any header will do, for counting). A row the csv
    module refuses (a field past the size limit) comes out as its error message, for one
    invalid_url line.
    """

    def __init__(
        self, read: Callable[[int], bytes], *, path: str, tsv: bool, url_column: str | None
    ) -> None:
        self.lines = TextLines(read, path)
        self._rows = csv.reader(self.lines, "excel-tab" if tsv else "excel")
        self._path = path
        header: list[str] = []
        try:
            for row in self._rows:
                if any(cell.strip() for cell in row):
                    header = row
                    break
        except csv.Error as exc:
            raise JobFileError(f"job file {path}: header row: {exc}") from None
        self.empty = not header
        names = [name.strip() for name in header]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise JobFileError(f"job file {path}: column {name!r} appears twice in the header")
            seen.add(name)
        self.columns = names
        if header and url_column is not None and url_column not in seen:
            shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
            raise JobFileError(
                f"job file {path}: no column {url_column!r} for the URLs in the header "
                f"({shown}); name it with --url-column"
            )
        self._url = names.index(url_column) if url_column in seen else 0
        self.has_id = "id" in seen and url_column != "id"
        self._id = names.index("id") if self.has_id else -1
        self._meta = [(i, n) for i, n in enumerate(names) if i not in (self._url, self._id)]

    def __iter__(self) -> Iterator[Row]:
        if self.empty:
            return
        number = 0
        rows = self._rows
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:
                number += 1
                yield number, f"row is not valid CSV: {exc}"
                continue
            if not row or not any(row):
                continue  # a blank line: not a row
            if len(row) == 1 and not row[0].strip():
                continue
            number += 1
            yield number, row

    def job_object(self, number: int, row: list[str] | str) -> dict[str, Any] | InvalidJob:
        """The job object of row ``number``; InvalidJob for a row that has no usable URL cell."""
        width = len(self.columns)
        if isinstance(row, str):
            return invalid_url(number, row)
        if len(row) > width:
            return invalid_url(number, f"row has {len(row)} fields, the header {width}")
        if len(row) < width:
            row = row + [""] * (width - len(row))
        obj: dict[str, Any] = {"url": row[self._url].strip()}
        if self.has_id and (job_id := row[self._id].strip()):
            obj["id"] = job_id
        if self._meta:
            obj["meta"] = {name: row[i] for i, name in self._meta}
        for value in row:
            if _not_text(value):
                return invalid_url(number, "row is not UTF-8 text", id=obj.get("id"))
        return obj


#  Line numbers past this (four billion lines) are remembered as this.
MAX_LINE_NUMBER = 2**32 - 1


# -- ids already seen, for validate -----------------------------------------------------------


class FirstLines:
    """The first line of every job id seen, as a 64-bit hash and a 32-bit line number in two
    arrays of one open-addressing table: 24 bytes an id at most (it stays at most half full),
    against ~100 for a dict, so validating a million ids fits in tens of MB. Two ids colliding
    in 64 bits are as unlikely as for ``--resume`` (resume.py)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._hashes = array("Q", bytes(8 * capacity))
        self._lines = array("I", bytes(4 * capacity))
        self._mask = capacity - 1
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def first(self, job_id: str, line: int) -> int:
        """The line ``job_id`` was first seen at; ``line`` (now remembered) if never before."""
        return self._insert(id_hash(job_id) or 1, line)  # 0 marks an empty slot

    def _insert(self, h: int, line: int) -> int:
        hashes, mask = self._hashes, self._mask
        i = h & mask
        while (v := hashes[i]) != 0:
            if v == h:
                return self._lines[i]
            i = (i + 1) & mask
        hashes[i] = h
        self._lines[i] = min(line, MAX_LINE_NUMBER)
        self._len += 1
        if self._len * 2 > mask:
            self._grow()
        return line

    def _grow(self) -> None:
        hashes, lines = self._hashes, self._lines
        size = 2 * len(hashes)
        self._hashes = array("Q", bytes(8 * size))
        self._lines = array("I", bytes(4 * size))
        self._mask = size - 1
        self._len = 0
        for h, line in zip(hashes, lines, strict=True):
            if h:
                self._insert(h, line)


# -- counting jobs, for the progress total -------------------------------------------------------

#  A line that yields a job: anything but whitespace (JSONL), and not a comment (URL lists).
_JOB_LINE = {
    "jsonl": re.compile(rb"^[ \t\r\f\v]*[^\s]", re.M),
    "urls": re.compile(rb"^[ \t\r\f\v]*[^\s#]", re.M),
}
#  A newline that ends a blank line (the line after it holds only white space up to the next).
_BLANK_AFTER_NEWLINE = re.compile(rb"\n[ \t\r\f\v]*(?=\n)")
_SPACE = b" \t\r\f\v"


def count_json_lines(chunk: bytes) -> int:
    """The lines of ``chunk`` (whole lines) that are not blank: ``_JOB_LINE["jsonl"]`` would
    try a match at every byte; counting newlines and the blank lines after them is searched
    from newline to newline, about a fifth of the time."""
    if not chunk:
        return 0
    lines = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
    first_end = chunk.find(b"\n")
    first = chunk if first_end < 0 else chunk[:first_end]
    blank = len(_BLANK_AFTER_NEWLINE.findall(chunk)) + (not first.strip(_SPACE))
    last_start = chunk.rfind(b"\n") + 1
    if 0 < last_start < len(chunk) and not chunk[last_start:].strip(_SPACE):
        blank += 1  # a blank last line with no newline after it
    return lines - blank


class JobCount:
    """The number of jobs in a job file, counted in a daemon thread (never waited for).

    ``value`` is None until known, and ``exact`` false when it is an estimate: a ``.gz`` file is
    not decompressed twice, its total is the jobs in its first few MB scaled by the file's size.
    A source that has read its file to the end knows the exact figure and says so (``settle``).
    With ``forecast``, the same pass counts each host's requests into it (forecast.py).
    """

    def __init__(
        self,
        path: str,
        fmt: str,
        *,
        select: Callable[[int], bool] | None = None,
        known: int | None = None,
        forecast: HostForecast | None = None,
    ) -> None:
        self.value: int | None = known
        self.exact = known is not None
        self._path = path
        self._format = fmt
        self._select = select
        self._forecast = forecast if fmt in URL_AUTHORITY else None
        self._ended = threading.Event()
        if known is None and _regular_file(path):
            threading.Thread(target=self._count, name="fetcher-count", daemon=True).start()
        else:
            self._ended.set()

    def settle(self, value: int) -> None:
        self.value, self.exact = value, True

    def get(self) -> tuple[int | None, bool]:
        return self.value, self.exact

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the count has ended (known, or given up on) within ``timeout`` seconds."""
        return self._ended.wait(timeout)

    def _count(self) -> None:
        try:
            self._count_now()
        finally:
            self._ended.set()

    def _count_now(self) -> None:
        try:
            if self._path.endswith(".gz"):
                value, exact = self._estimate_gzip()
            else:
                with open(self._path, "rb") as f:
                    value, exact = self._count_chunks(_chunks(f.read)), True
                if self._forecast is not None:
                    self._forecast.complete = True
        except (OSError, EOFError, ValueError, csv.Error, JobFileError):
            return  # the source reports the file's problems; the bar just has no total
        if not self.exact:
            self.value, self.exact = value, exact

    def _estimate_gzip(self) -> tuple[int, bool]:
        size = os.path.getsize(self._path)
        with gzip.open(self._path, "rb") as gz:
            sample = gz.read(GZIP_SAMPLE_BYTES)
            ended = not gz.read(1)
            consumed = gz.fileobj.tell()  # type: ignore[union-attr]
        if ended:
            return self._count_chunks(iter([sample])), True
        whole = sample[: sample.rfind(b"\n") + 1]
        counted = self._count_chunks(iter([whole]))
        return round(counted * size / max(consumed, 1)), False

    def _count_chunks(self, chunks: Iterator[bytes]) -> int:
        if self._format in ("csv", "tsv"):
            return self._count_rows(chunks)
        pattern = _JOB_LINE[self._format]
        select = self._select
        forecast = self._forecast
        authorities = URL_AUTHORITY[self._format]
        count = 0
        if select is None:
            # One regex pass per 256 KiB, in C: the loop this thread shares the interpreter with
            # hardly notices it.
            jsonl = self._format == "jsonl"
            for chunk in _whole_lines(chunks):
                count += count_json_lines(chunk) if jsonl else len(pattern.findall(chunk))
                if forecast is not None:
                    forecast.add(authorities.findall(chunk))
            return count
        lineno = 0
        for chunk in _whole_lines(chunks):
            for line in chunk.split(b"\n")[:-1] if chunk.endswith(b"\n") else chunk.split(b"\n"):
                lineno += 1
                if select(lineno) and pattern.match(line):
                    count += 1
                    if forecast is not None:
                        forecast.add(authorities.findall(line))
        return count

    def _count_rows(self, chunks: Iterator[bytes]) -> int:
        def read(_: int) -> bytes:
            return next(chunks, b"")

        # The header's URL column is the source's to check; counting takes any header.
        rows = CsvRows(read, path=self._path, tsv=self._format == "tsv", url_column=None)
        select = self._select
        return sum(1 for number, _ in rows if select is None or select(number))


def _regular_file(path: str) -> bool:
    """Whether ``path`` can be read a second time: a named pipe or ``<(command)`` cannot, and
    counting it would take the lines from the run."""
    try:
        return path != "-" and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _chunks(read: Callable[[int], bytes]) -> Iterator[bytes]:
    while chunk := read(COUNT_CHUNK_BYTES):
        yield chunk


def _whole_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks re-cut at their last newline, so no line is split between two."""
    rest = b""
    for chunk in chunks:
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        if cut:
            yield data[:cut]
    if rest:
        yield rest
