"""Result lines: what one attempt came to (``Outcome``), the handler protocol, and the one
builder of each kind of line (``ran``, ``refused``, ``abandoned``), so that every line's common
fields and its error object are made in one place. ``Result`` is the library's view of a line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ErrorInfo, JobError

ResultLine = dict[str, Any]
"""One result line as written: a JSON object."""


@dataclass(slots=True)
class Outcome:
    """What one attempt came to.

    ``fields`` are the kind-specific result fields (status, url, ...). ``retry`` says the failure
    is worth another attempt; ``retry_after`` is the server's requested wait, in seconds.
    """

    fields: dict[str, Any]
    error: JobError | None = None
    retry: bool = False
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Handler(Protocol):
    async def attempt(self, job: Any) -> Outcome:
        """Run one attempt of ``job``. Must not raise except CancelledError."""
        ...


def ran(
    job_id: str,
    kind: str,
    *,
    attempts: int,
    started_at: str | None,
    elapsed_ms: float,
    error: JobError | None,
    fields: dict[str, Any],
    meta: Any = None,
) -> ResultLine:
    """The line of a job that ran through the pool: the common fields, then the handler's.

    ``started_at`` is None only in a run whose written fields leave it out (shaping.py).
    """
    result: ResultLine = {
        "id": job_id,
        "kind": kind,
        "ok": error is None,
        "attempts": attempts,
        "started_at": started_at,
        "elapsed_ms": elapsed_ms,
        "error": None if error is None else error.to_dict(),
    }
    if started_at is None:
        del result["started_at"]
    result.update(fields)
    if meta is not None:
        result["meta"] = meta
    return result


def refused(
    job_id: str,
    kind: str | None,
    *,
    line: int,
    started_at: str,
    error: JobError,
    attempts: int = 0,
    url: str | None = None,
) -> ResultLine:
    """The line of a job refused before any attempt (``invalid_job``, ``invalid_url``) or
    dead-lettered (``abandoned``, whose attempts are its deliveries): ``elapsed_ms`` 0 and the
    input ``line``."""
    result: ResultLine = {
        "id": job_id,
        "kind": kind,
        "ok": False,
        "attempts": attempts,
        "started_at": started_at,
        "elapsed_ms": 0,
        "error": error.to_dict(),
        "line": line,
    }
    if url is not None:
        result["url"] = url
    return result


def abandoned(
    job_id: str, kind: str | None, *, line: int, deliveries: int, started_at: str, url: str | None
) -> ResultLine:
    """The line of a scale-out job delivered ``deliveries`` times that never finished."""
    error = JobError("abandoned", f"delivered {deliveries} times and never finished: dead-lettered")
    return refused(
        job_id,
        kind,
        line=line,
        started_at=started_at,
        error=error,
        attempts=deliveries,
        url=url,
    )


class Result(dict[str, Any]):
    """One job's result: the JSON line's object, with typed accessors for the common fields.

    It is a ``dict`` (what ``json.dumps``/``orjson.dumps`` write is the result line);
    ``to_dict()`` returns a plain copy.
    """

    __slots__ = ()

    @property
    def id(self) -> str:
        """The job's id (its 1-based position in the input when the job gave none)."""
        return str(self["id"])

    @property
    def kind(self) -> str | None:
        """``"http"`` or ``"mail"``; None for an invalid job whose kind cannot be told."""
        kind: str | None = self.get("kind")
        return kind

    @property
    def ok(self) -> bool:
        """The job did what it asked (http: a final status < 400; mail: accepted)."""
        return bool(self["ok"])

    @property
    def attempts(self) -> int:
        """Attempts started; 0 for a job refused before any (invalid_job, invalid_url)."""
        return int(self["attempts"])

    @property
    def error(self) -> ErrorInfo | None:
        """None when ok, else ``{"type": ..., "message": ...}``."""
        error: ErrorInfo | None = self.get("error")
        return error

    @property
    def status(self) -> int | None:
        """HTTP status, or the SMTP reply code; None when there was no response."""
        status: int | None = self.get("status")
        return status

    @property
    def elapsed_ms(self) -> float:
        """Milliseconds from the first attempt's start to the result."""
        return float(self["elapsed_ms"])

    @property
    def started_at(self) -> str:
        """ISO 8601 UTC time of the first attempt (of reading, for a refused job)."""
        return str(self["started_at"])

    @property
    def url(self) -> str | None:
        """The URL as requested, any password in it shown as ``***`` (http jobs)."""
        url: str | None = self.get("url")
        return url

    @property
    def final_url(self) -> str | None:
        """The URL of the final response, after redirects (http jobs)."""
        url: str | None = self.get("final_url")
        return url

    @property
    def headers(self) -> dict[str, str] | None:
        """The final response's headers, names lower-cased (http jobs with a response)."""
        headers: dict[str, str] | None = self.get("headers")
        return headers

    @property
    def body(self) -> Any:
        """The body the job asked for (text, base64 text or parsed JSON), else None."""
        return self.get("body")

    @property
    def meta(self) -> Any:
        """The job's own ``meta`` value, carried through untouched."""
        return self.get("meta")

    def to_dict(self) -> dict[str, Any]:
        """A plain ``dict`` copy: exactly the object ``fetcher run`` writes as the line."""
        return dict(self)
