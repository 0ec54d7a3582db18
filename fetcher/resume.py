"""What an existing results file already holds, for ``--resume``.

Ids are kept as 64-bit BLAKE2b digests in one sorted array: 8 bytes an id, so a million finished
jobs cost 8 MB, not the hundreds a set of strings would. Two ids colliding in 64 bits is about
one chance in 10^7 for ten million ids; the job would be skipped as done.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from bisect import bisect_left
from collections.abc import Iterator

import orjson

from .errors import OutputError


def id_hash(job_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8).digest(), "little")


class DoneIds:
    def __init__(self, hashes: list[int]) -> None:
        hashes.sort()
        self._sorted = array("Q", hashes)

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, job_id: object) -> bool:
        if not isinstance(job_id, str):
            return False
        h = id_hash(job_id)
        arr = self._sorted
        i = bisect_left(arr, h)
        return i < len(arr) and arr[i] == h


def _lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from f


def prepare_resume(path: str) -> DoneIds:
    """Cut a torn last line off ``path`` and return the ids of its complete result lines."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return DoneIds([])
    except OSError as exc:
        raise OutputError(f"cannot read {path} to resume: {exc.strerror}") from None
    try:
        _truncate_torn_tail(path, size)
    except OSError as exc:
        raise OutputError(f"cannot read {path} to resume: {exc.strerror}") from None
    return read_done(path)


def read_done(path: str) -> DoneIds:
    """The ids of the complete result lines in ``path``; the file is not changed."""
    try:
        hashes = []
        for line in _lines(path):
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # not a result line; its job (if any) runs again
            if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                hashes.append(id_hash(obj["id"]))
    except OSError as exc:
        raise OutputError(f"cannot read {path} to resume: {exc.strerror}") from None
    return DoneIds(hashes)


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
