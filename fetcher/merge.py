"""``fetcher merge FILE... [-o OUT]``: result files in, one line per job id out.

For an id in several files the line from the last file wins (within one file, its last
line), so ``fetcher merge results.jsonl retry.jsonl -o final.jsonl`` replaces each retried
job's line. Lines come out in the order their ids first appear, each id once; torn lines (no
newline at the end of a file, a CSV record cut inside a quoted cell) and lines that are not
result lines are left out. Lines are copied as they are, never re-encoded.

Two passes, in bounded memory: the first indexes every id's winning line (resume.IdIndex:
file and offset, 16 bytes an id), the second streams the files again and writes each id's
winner the first time the id is met, reading it back from its file when it is a later one.
OUT is written to a temporary file beside it and renamed when complete, so an interrupted
merge never leaves a half-written OUT.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import BinaryIO

from .errors import SetupError
from .resume import IdIndex, csv_records, estimate_lines, records, sniff_format

#  A winner is kept as (file number << _FILE_SHIFT) | offset: files up to 1 TiB each.
_FILE_SHIFT = 40
_WRITTEN = -1


def merge_files(paths: list[str], output: str, *, overwrite: bool = False) -> int:
    """Merge ``paths`` into ``output`` (``-`` is stdout); the exit code (0).

    Raises SetupError (exit 2) for an unreadable input, inputs of mixed formats or CSV
    columns, an OUT that is one of the inputs, or an existing OUT without ``overwrite``.
    """
    formats = _check(paths, output, overwrite)
    index = IdIndex(sum(estimate_lines(p) for p in paths), values=True)
    for number, path in enumerate(paths):
        for job_id, _, offset, _ in records(path):
            index.add(job_id, (number << _FILE_SHIFT) | offset)
    header = _csv_header(paths[0]) if formats == {"csv"} else b""
    if output == "-":
        written = _write(paths, index, header, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        directory = os.path.dirname(os.path.abspath(output))
        fd, tmp = tempfile.mkstemp(prefix=".merge-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                written = _write(paths, index, header, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, output)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    print(f"fetcher: {written} results from {len(paths)} files", file=sys.stderr)
    return 0


def _check(paths: list[str], output: str, overwrite: bool) -> set[str]:
    formats: set[str] = set()
    headers: set[bytes] = set()
    for path in paths:
        try:
            fmt = sniff_format(path)
        except OSError as exc:
            raise SetupError(f"cannot read {path}: {exc.strerror}") from None
        if fmt is not None:
            formats.add(fmt)
        if fmt == "csv":
            headers.add(_csv_header(path))
    if len(formats) > 1:
        raise SetupError("merge: the files mix JSON lines and CSV; give files of one format")
    if len(headers) > 1:
        raise SetupError("merge: the CSV files have different columns")
    if output != "-":
        if os.path.exists(output) and any(os.path.samefile(p, output) for p in paths):
            raise SetupError(f"merge: OUT {output} is also an input; write to a new file")
        if not overwrite and os.path.exists(output) and os.path.getsize(output) > 0:
            raise SetupError(
                f"output {output} exists and is not empty: pass --overwrite to replace it"
            )
    return formats


def _csv_header(path: str) -> bytes:
    """The header row of a CSV results file, as its bytes."""
    for _, offset, length in csv_records(path):
        with open(path, "rb") as f:
            return os.pread(f.fileno(), length, offset)
    return b""


def _write(paths: list[str], index: IdIndex, header: bytes, out: BinaryIO) -> int:
    written = 0
    out.write(header)
    files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed below
    try:
        for number, path in enumerate(paths):
            for job_id, _, offset, length in records(path):
                winner = index.value(job_id)
                if winner is None or winner == _WRITTEN:
                    continue
                if winner == (number << _FILE_SHIFT) | offset:
                    out.write(os.pread(files[number].fileno(), length, offset))
                else:
                    out.write(_record_at(files[winner >> _FILE_SHIFT], bool(header), winner))
                index.set_value(job_id, _WRITTEN)
                written += 1
    finally:
        for f in files:
            f.close()
    return written


def _record_at(f: BinaryIO, csv: bool, winner: int) -> bytes:
    """The whole line (or CSV record) at the winner's offset in its file."""
    offset = winner & ((1 << _FILE_SHIFT) - 1)
    if not csv:
        f.seek(offset)
        return f.readline()
    for _, start, length in csv_records(f.name, offset):
        return os.pread(f.fileno(), length, start)
    return b""  # pragma: no cover - the first pass saw a whole record there
