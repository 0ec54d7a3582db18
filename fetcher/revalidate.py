"""``--since PREV``: conditional requests from what a previous run fetched ok.

For a GET job whose id has an ok line in PREV, and whose response headers there carry an
``etag`` or a ``last-modified``, the request gets ``If-None-Match`` / ``If-Modified-Since``
(as ``curl --etag-compare`` and ``wget -N`` do). A ``304 Not Modified`` answer is then the body
PREV already has: its result line says ``"not_modified": true`` and carries PREV's ``bytes``,
``sha256`` and ``path`` instead of the empty 304 body's. A job whose own headers already hold
a conditional header keeps it.

PREV is indexed once (resume.py: an id -> offset table); each job's PREV line is read back
when the job is about to run, so memory follows the jobs in flight, not PREV's size.
"""

from __future__ import annotations

from typing import Any

import orjson

from .jobs import HttpJob
from .resume import IdIndex, line_at, read_ok_offsets, sniff_format

#  The fields of PREV's line a 304 result takes over (the stored body is still valid).
CARRIED = ("bytes", "sha256", "path")
_CONDITIONAL = frozenset({"if-none-match", "if-modified-since"})


class Revalidator:
    def __init__(self, prev: str, index: IdIndex) -> None:
        self.prev = prev
        self._index = index
        self._csv = sniff_format(prev) == "csv"
        self._file = None if self._csv else open(prev, "rb")  # noqa: SIM115 - closed in close()
        #  Jobs sent conditionally and not finished yet: id -> the fields a 304 carries over.
        self._pending: dict[str, dict[str, Any]] = {}

    @classmethod
    def open(cls, prev: str) -> Revalidator:
        """Index PREV; raises OutputError when it cannot be read."""
        return cls(prev, read_ok_offsets(prev))

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _previous(self, offset: int) -> dict[str, Any] | None:
        if self._file is None:
            return line_at(self.prev, offset)
        self._file.seek(offset)
        try:
            obj = orjson.loads(self._file.readline())
        except orjson.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None

    def prepare(self, job: HttpJob) -> HttpJob:
        """The job with conditional headers when PREV has an ok line with validators."""
        if job.method != "GET":
            return job
        offset = self._index.value(job.id)
        if offset is None:
            return job
        prev = self._previous(offset)
        headers = _headers(prev.get("headers")) if prev is not None else None
        if prev is None or headers is None:
            return job
        conditional: dict[str, str] = {}
        etag, modified = headers.get("etag"), headers.get("last-modified")
        if isinstance(etag, str) and etag:
            conditional["If-None-Match"] = etag
        if isinstance(modified, str) and modified:
            conditional["If-Modified-Since"] = modified
        if not conditional or any(name.lower() in _CONDITIONAL for name in job.headers):
            return job
        self._pending[job.id] = {key: _carried(key, prev.get(key)) for key in CARRIED}
        if "path" not in prev:
            del self._pending[job.id]["path"]
        return job.model_copy(update={"headers": {**job.headers, **conditional}})

    def finish(self, result: dict[str, Any]) -> None:
        """Mark a 304 result of a conditional request and carry PREV's fields into it."""
        carried = self._pending.pop(result["id"], None)
        if carried is not None and result.get("status") == 304:
            result["not_modified"] = True
            result.update(carried)


def _headers(value: Any) -> dict[str, Any] | None:
    """PREV's ``headers``: an object in JSONL, JSON text in a CSV cell."""
    if isinstance(value, str) and value:
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def _carried(key: str, value: Any) -> Any:
    """A carried value as a result line holds it (CSV cells are text)."""
    if value == "":
        return None
    if key == "bytes" and isinstance(value, str):
        return int(value) if value.isdigit() else None
    return value
