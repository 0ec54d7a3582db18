"""Reading a results file fast: the ids it holds (``--resume``), the ids it holds ok
(``--retry-failed``), and where each line is (``--since``, ``fetcher merge``).

Speed. A JSONL file is read in blocks of ``BLOCK_BYTES``. The writer (sink.py) starts every line
with ``{"id":"...",``; when every line of a block has that shape, one regular expression pulls
all of the block's ids at once, and no line is decoded. A block holding anything else (a line
written by another program, an escaped id, a blank line, two lines run together after a crash)
is decoded line by line with orjson instead, so odd lines cost time, never correctness. A line
is whole only when it ends in a newline: a torn last line is never counted.

Memory. Ids are kept as 64-bit hashes in an open-addressing table (``IdIndex``): 11-23 bytes
an id (twice that with an offset), so a million ids cost 16 MB and ten million 128 MB, not the
gigabytes a set of strings would. The hash is Python's own (SipHash of the id's UTF-8 bytes),
the same in a process and in the children it forks, and never written anywhere. Two ids
colliding in 64 bits is about one chance in 10^7 for ten million ids; such a job would be
skipped as done.
"""

from __future__ import annotations

import csv
import os
import re
from array import array
from collections.abc import Iterator
from typing import Any

import orjson

from .errors import OutputError

BLOCK_BYTES = 4 * 1024 * 1024
_LOAD = 0.7

#  What the writer puts at the start of a line: the id, then (in a full line, or a projection
#  that keeps them next) kind and ok. An id with a backslash (an escape) does not match.
#  Each pattern matches at every newline, with empty groups for a line of another shape, so
#  one scan both pulls the ids and tells whether every line had the writer's shape.
_FAST_ID = re.compile(rb'\n(?:\{"id":"([^"\\\n]*)")?')
_FAST_OK = re.compile(rb'\n(?:\{"id":"([^"\\\n]*)",(?:"kind":(?:"http"|"mail"|null),)?"ok":(t|f))?')


def id_hash(job_id: str) -> int:
    """An id's 64-bit hash, as an unsigned number (the same in this process and its forked
    children, different in another process)."""
    return hash(job_id.encode()) & 0xFFFF_FFFF_FFFF_FFFF


class IdIndex:
    """A compact set of ids, each optionally with one 64-bit value (an offset in a file).

    An open-addressing table of 64-bit hashes in an ``array('q')`` (0 marks a free slot),
    kept at most 70% full: 11-23 bytes an id (a power-of-two table; 128 MB for ten million).
    For an id added more than once, the value added last wins.
    """

    def __init__(self, expected: int = 0, *, values: bool = False) -> None:
        size = 1 << 10
        while size * _LOAD < expected:
            size <<= 1
        self._alloc(size, values)
        self._len = 0

    def _alloc(self, size: int, values: bool) -> None:
        self._mask = size - 1
        self._limit = int(size * _LOAD)
        self._keys = array("q", bytes(8 * size))
        self._values = array("q", bytes(8 * size)) if values else None

    def _grow(self) -> None:
        keys, values = self._keys, self._values
        self._alloc(2 * len(keys), values is not None)
        for slot, h in enumerate(keys):
            if h:
                self._put(h, values[slot] if values is not None else 0)

    def _put(self, h: int, value: int) -> bool:
        keys, mask = self._keys, self._mask
        i = h & mask
        while (k := keys[i]) and k != h:
            i = (i + 1) & mask
        if self._values is not None:
            self._values[i] = value
        if k:
            return False
        keys[i] = h
        return True

    def add_many(self, ids: list[bytes]) -> None:
        """Add ids (no values): the fast path of reading a file."""
        while self._len + len(ids) > self._limit:
            self._grow()
        keys, mask, added = self._keys, self._mask, 0
        for h in map(hash, ids):
            if not h:
                h = 1
            i = h & mask
            while (k := keys[i]) and k != h:
                i = (i + 1) & mask
            if not k:
                keys[i] = h
                added += 1
        self._len += added

    def add(self, job_id: bytes, value: int = 0) -> None:
        if self._len >= self._limit:
            self._grow()
        self._len += self._put(hash(job_id) or 1, value)

    def __len__(self) -> int:
        return self._len

    def _slot(self, h: int) -> int:
        keys, mask = self._keys, self._mask
        i = h & mask
        while k := keys[i]:
            if k == h:
                return i
            i = (i + 1) & mask
        return -1

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, str) and self._slot(hash(job_id.encode()) or 1) >= 0

    def contains_hash(self, h: int) -> bool:
        return self._slot(h or 1) >= 0

    def value(self, job_id: str | bytes) -> int | None:
        """The value kept with ``job_id``, or None when it is not in the index."""
        key = job_id.encode() if isinstance(job_id, str) else job_id
        i = self._slot(hash(key) or 1)
        if i < 0 or self._values is None:
            return None
        return self._values[i]

    def set_value(self, job_id: bytes, value: int) -> None:
        i = self._slot(hash(job_id) or 1)
        if i >= 0 and self._values is not None:
            self._values[i] = value


#  The name --resume and --processes have always used for the ids already done.
DoneIds = IdIndex


def _is_ok(obj: dict[str, Any]) -> bool:
    """Whether a decoded result line says ok; a projection without ``ok`` is judged by
    ``error`` or ``error_type`` when it kept one of those, else not ok (run again)."""
    if "ok" in obj:
        return obj["ok"] is True or obj["ok"] in ("true", "True")
    if "error" in obj:
        return obj["error"] is None or obj["error"] == ""
    if "error_type" in obj:
        return not obj["error_type"]
    return False


# -- JSONL --------------------------------------------------------------------------------------


def _blocks(path: str) -> Iterator[tuple[int, bytearray, int]]:
    """(file offset of buf[1], buf, end): the whole lines of the next block are
    ``buf[1:end]``, with ``buf[0]`` the newline before the first of them and ``buf[end - 1]``
    the last one's. One buffer is read into and reused, so reading makes no garbage; a torn
    last line is left out."""
    buf = bytearray(BLOCK_BYTES + 1)
    buf[0] = 0x0A
    filled = 1  # buf[:filled] holds the newline and the start of a line not yet whole
    pos = 0  # file offset of buf[1]
    with open(path, "rb", buffering=0) as f:
        while True:
            if filled == len(buf):  # one line longer than the buffer
                buf.extend(bytes(len(buf)))
            with memoryview(buf) as view:
                got = f.readinto(view[filled:])
            if not got:
                return
            filled += got
            end = buf.rfind(b"\n", 0, filled) + 1
            if end <= 1:
                continue
            yield pos, buf, end
            rest = filled - end
            buf[: rest + 1] = buf[end - 1 : filled]
            del buf[BLOCK_BYTES + 1 :]  # back to its size after a long line
            if len(buf) < BLOCK_BYTES + 1:
                buf.extend(bytes(BLOCK_BYTES + 1 - len(buf)))
            filled = rest + 1
            pos += end - 1


def _decoded_lines(
    base: int, buf: bytearray, stop: int
) -> Iterator[tuple[dict[str, Any], int, int]]:
    """(result, offset, length) of each line of ``buf[1:stop]`` that is a result line."""
    start = 1
    find = buf.find
    while (end := find(b"\n", start, stop)) != -1:
        offset, length = base + start - 1, end - start + 1
        try:
            obj = orjson.loads(buf[start:end])
        except orjson.JSONDecodeError:
            obj = None  # not a result line; its job (if any) runs again
        start = end + 1
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            yield obj, offset, length


def _jsonl_ids(path: str, index: IdIndex, *, ok_only: bool) -> None:
    for base, buf, end in _blocks(path):
        if ok_only:
            pairs = _FAST_OK.findall(buf, 0, end)
            pairs.pop()  # the match at the block's last newline, after its last line
            if (b"", b"") not in pairs:
                index.add_many([i for i, ok in pairs if ok == b"t"])
                continue
        else:
            found = _FAST_ID.findall(buf, 0, end)
            found.pop()
            if b"" not in found:  # (an empty id too takes the careful way)
                index.add_many(found)
                continue
        for obj, _, _ in _decoded_lines(base, buf, end):
            if not ok_only or _is_ok(obj):
                index.add(obj["id"].encode())


def _jsonl_records(path: str) -> Iterator[tuple[bytes, bool, int, int]]:
    """(id, ok, offset, length) of every whole result line."""
    for base, buf, end in _blocks(path):
        matches = list(_FAST_OK.finditer(buf, 0, end))
        matches.pop()
        if all(m.group(2) for m in matches):
            ends = [m.start() for m in matches[1:]] + [end - 1]
            for m, stop in zip(matches, ends, strict=True):
                start = m.start()
                yield bytes(m.group(1)), m.group(2) == b"t", base + start, stop - start
            continue
        for obj, offset, length in _decoded_lines(base, buf, end):
            yield obj["id"].encode(), _is_ok(obj), offset, length


#  A job line that starts with its id, as most job files are written (orjson, json.dumps);
#  like the patterns above it matches at every newline, with an empty id for other lines.
_JOB_ID = re.compile(rb'\n(?:\{ ?"id": ?"([^"\\\n]*)")?')


def done_job_lines(path: str, done: IdIndex) -> tuple[bytearray, bool]:
    """A bitmap of the 1-based lines of the JSONL job file ``path`` whose id is in ``done``,
    found without decoding them: a run skips those lines unread. Lines whose id cannot be
    told this way (an escaped or empty id, ``id`` not first, no id at all) are left
    unmarked, for the run to decode and check as usual. The flag says every line is marked:
    nothing is left to run, and the file need not be read again."""
    bits = bytearray(estimate_lines(path) // 8 + 1)
    keys, mask = done._keys, done._mask
    line = marked = covered = 0  # lines before this block, lines marked, bytes seen
    for base, buf, end in _blocks(path):
        found = _JOB_ID.findall(buf, 0, end)
        found.pop()  # the match at the block's last newline
        if (line + len(found)) // 8 >= len(bits):
            bits.extend(bytes((line + len(found)) // 8 - len(bits) + 1))
        for lineno, job_id in enumerate(found, line + 1):
            if not job_id:
                continue
            h = hash(bytes(job_id)) or 1
            i = h & mask
            while k := keys[i]:
                if k == h:
                    bits[lineno >> 3] |= 1 << (lineno & 7)
                    marked += 1
                    break
                i = (i + 1) & mask
        line += len(found)
        covered = base + end - 1
    return bits, marked == line and covered == os.path.getsize(path)


# -- CSV ----------------------------------------------------------------------------------------


class _CountingLines:
    """The lines of a binary file as text, counting the bytes handed out: ``csv.reader`` takes
    exactly the lines of one record before it yields it, so ``consumed`` is then its end."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.consumed = 0
        self.newline = True

    def __iter__(self) -> _CountingLines:
        return self

    def __next__(self) -> str:
        line: bytes = self._f.readline()
        if not line:
            raise StopIteration
        self.consumed += len(line)
        self.newline = line.endswith(b"\n")
        return line.decode("utf-8", errors="replace")


def csv_records(path: str, offset: int = 0) -> Iterator[tuple[list[str], int, int]]:
    """(row, offset, length) of every whole CSV record from ``offset`` (the header row first
    when from 0); a torn last record (cut mid-line or inside a quoted cell) is left out."""
    with open(path, "rb") as f:
        f.seek(offset)
        lines = _CountingLines(f)
        reader = csv.reader(lines, strict=True)
        start = offset
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:
                return  # the file ends inside a quoted cell: a torn record
            if not lines.newline:
                return  # the last line has no end: a torn record
            end = offset + lines.consumed
            if row:
                yield row, start, end - start
            start = end


def csv_row_at(path: str, offset: int) -> list[str] | None:
    for row, _, _ in csv_records(path, offset):
        return row
    return None


def _csv_ok(header: list[str], row: list[str]) -> bool:
    return _is_ok({name: row[i] for i, name in enumerate(header) if i < len(row)})


def _csv_records(path: str) -> Iterator[tuple[bytes, bool, int, int]]:
    records = csv_records(path)
    header = next(records, None)
    if header is None:
        return
    for row, offset, length in records:
        if row[0]:
            yield row[0].encode(), _csv_ok(header[0], row), offset, length


# -- what callers use ---------------------------------------------------------------------------


def sniff_format(path: str) -> str | None:
    """``jsonl`` or ``csv`` by a results file's first byte (``{`` or a header row); None when
    the file is empty."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head:
        return None
    return "jsonl" if head.startswith(b"{") else "csv"


def estimate_lines(path: str) -> int:
    """About how many lines ``path`` has, from its size and its first lines (0 if missing)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(256 * 1024)
    except OSError:
        return 0
    lines = head.count(b"\n")
    return size // (len(head) // lines) + 1 if lines else 1


def records(path: str) -> Iterator[tuple[bytes, bool, int, int]]:
    """(id, ok, offset, length) of every whole result line (or CSV record) of ``path``."""
    fmt = sniff_format(path)
    if fmt == "csv":
        yield from _csv_records(path)
    elif fmt == "jsonl":
        yield from _jsonl_records(path)


def _read_error(path: str, exc: OSError, why: str) -> OutputError:
    return OutputError(f"cannot read {path} {why}: {exc.strerror}")


def read_done(
    path: str, *, ok_only: bool = False, into: IdIndex | None = None, why: str = "to resume"
) -> IdIndex:
    """The ids of the complete result lines in ``path`` (only those that are ok with
    ``ok_only``), added to ``into`` when given; the file is not changed. A missing file
    holds none."""
    index = IdIndex(estimate_lines(path)) if into is None else into
    try:
        fmt = sniff_format(path)
        if fmt == "jsonl":
            _jsonl_ids(path, index, ok_only=ok_only)
        elif fmt == "csv":
            for job_id, ok, _, _ in _csv_records(path):
                if ok or not ok_only:
                    index.add(job_id)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _read_error(path, exc, why) from None
    return index


def read_ok_offsets(path: str) -> IdIndex:
    """Each id with an ok line in ``path``, with that line's offset (the last ok line's)."""
    index = IdIndex(estimate_lines(path), values=True)
    try:
        for job_id, ok, offset, _ in records(path):
            if ok:
                index.add(job_id, offset)
    except OSError as exc:
        raise _read_error(path, exc, "for --since") from None
    return index


def line_at(path: str, offset: int) -> dict[str, Any] | None:
    """The result at ``offset`` of ``path`` (JSONL or CSV, whose cells stay text)."""
    if sniff_format(path) == "csv":
        header = next(csv_records(path), None)
        row = csv_row_at(path, offset)
        if header is None or row is None:
            return None
        return dict(zip(header[0], row, strict=False))
    with open(path, "rb") as f:
        f.seek(offset)
        try:
            obj = orjson.loads(f.readline())
        except orjson.JSONDecodeError:
            return None
    return obj if isinstance(obj, dict) else None


def prepare_resume(
    path: str, *, csv_header: list[str] | None = None, into: IdIndex | None = None
) -> IdIndex:
    """Cut a torn last line (or CSV record) off ``path`` and return the ids of its complete
    result lines. With ``csv_header`` the file is CSV and must have that header row."""
    index = IdIndex(estimate_lines(path)) if into is None else into
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return index
    except OSError as exc:
        raise _read_error(path, exc, "to resume") from None
    try:
        if csv_header is not None:
            _prepare_csv(path, size, csv_header, index)
            return index
        _truncate_torn_tail(path, size)
    except OSError as exc:
        raise _read_error(path, exc, "to resume") from None
    return read_done(path, into=index)


def _prepare_csv(path: str, size: int, header: list[str], index: IdIndex) -> None:
    end = 0
    rows = csv_records(path)
    first = next(rows, None)
    if first is not None:
        if first[0] != header:
            raise OutputError(
                f"cannot resume {path}: its columns ({','.join(first[0])}) are not the ones "
                f"this run writes ({','.join(header)})"
            )
        end = first[1] + first[2]
        for row, offset, length in rows:
            if row[0]:
                index.add(row[0].encode())
            end = offset + length
    if end < size:
        os.truncate(path, end)


def _truncate_torn_tail(path: str, size: int) -> None:
    """A file that does not end in a newline was cut mid-line: drop the partial line."""
    if size == 0:
        return
    with open(path, "r+b") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(pos - step + nl + 1)
                return
            pos -= step
        f.truncate(0)
