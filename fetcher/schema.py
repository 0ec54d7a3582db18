"""JSON Schema (draft 2020-12) of a job line and of a result line.

The job schema is generated from the models jobs are validated with (``HttpJob``, ``MailJob``).
The result models below are the one declaration of a result line's fields; the handlers build
their result dicts to match (``http._response_fields``, ``mail._outcome``, ``pool.run_job``,
``InvalidJob.to_result``, the scale-out worker's ``abandoned`` lines), and the test suite
validates every line the end-to-end tests produce against the schema generated here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, with_config

from .errors import ErrorInfo
from .jobs import HttpJob, MailJob

DRAFT = "https://json-schema.org/draft/2020-12/schema"

_closed = ConfigDict(extra="forbid")

#  What utc_now_iso() writes: 2026-11-25T04:37:11.123Z
_ISO_UTC = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"


# The error object is closed too (no other keys): the config is set on errors.py's TypedDict,
# which the model layer keeps free of pydantic.
with_config(_closed)(ErrorInfo)


class _Result(BaseModel):
    """The fields every result line carries."""

    model_config = _closed
    id: str
    ok: bool
    attempts: int = Field(ge=0, description="attempts started: 1 + retries used")
    started_at: str = Field(pattern=_ISO_UTC, description="ISO 8601 UTC time of the first attempt")
    elapsed_ms: float = Field(ge=0, description="first attempt's start to the result")
    error: ErrorInfo | None


class _Ran(_Result):
    """A job that ran through the pool: it may carry the job's ``meta``."""

    meta: Any = Field(default=None, description="the job's own meta field, when it had one")


class WarcRef(BaseModel):
    """Where a result's WARC response record is: gzip member at ``offset``, ``length`` bytes."""

    model_config = _closed
    file: str
    offset: int = Field(ge=0)
    length: int = Field(ge=1)


class Timings(BaseModel):
    """--trace: the phases of the final attempt's final hop, in ms; null for one that did not
    happen (no lookup, a reused connection, plain http, no response)."""

    model_config = _closed
    dns_ms: float | None = Field(ge=0)
    connect_ms: float | None = Field(ge=0)
    tls_ms: float | None = Field(ge=0)
    ttfb_ms: float | None = Field(ge=0, description="connection ready to status line and headers")
    download_ms: float | None = Field(ge=0, description="headers to the end of the body")


class Hop(BaseModel):
    """--trace: one response before the final one (a redirect)."""

    model_config = _closed
    url: str
    status: int


class Certificate(BaseModel):
    """--trace: the server's certificate (null when it was not verified)."""

    model_config = _closed
    subject: str = Field(description="RFC 4514 distinguished name")
    issuer: str = Field(description="RFC 4514 distinguished name")
    not_after: str | None = Field(pattern=_ISO_UTC)
    san: list[str] = Field(description="subjectAltName values (DNS names, IP addresses)")


class TlsInfo(BaseModel):
    """--trace, https: the TLS session of the final response."""

    model_config = _closed
    version: str | None = Field(description="TLSv1.2, TLSv1.3")
    cipher: str | None
    cert: Certificate | None


class HttpResult(_Ran):
    """An http job that ran (ok or not)."""

    kind: Literal["http"]
    url: str = Field(description="as requested, any password in it shown as ***")
    final_url: str | None = Field(description="after redirects; null without a response")
    method: str
    status: int | None = Field(description="the final response's status; null without one")
    headers: dict[str, str] | None = Field(description="the final response's, names lower-case")
    content_type: str | None
    bytes: int | None = Field(ge=0, description="body length after decompression")
    sha256: str | None = Field(pattern="^[0-9a-f]{64}$", description="hex digest of the body")
    redirects: int = Field(ge=0)
    path: str | None = Field(
        default=None, description="--save: the file holding the body (null when none was kept)"
    )
    warc: WarcRef | None = Field(
        default=None, description="--warc: where the response record is (file, offset, length)"
    )
    body: Any = Field(default=None, description="only when the job asked for a body")
    body_error: str | None = Field(
        default=None, description="body mode json and a body that is not JSON"
    )
    not_modified: bool | None = Field(
        default=None, description="--since: a 304, bytes and sha256 carried from PREV"
    )
    remote_addr: str | None = Field(
        default=None, description='"ip:port" of the connection of the final response'
    )
    http_version: str | None = Field(default=None, description='"1.1"; null without a response')
    timings: Timings | None = Field(default=None, description="--trace")
    redirect_chain: list[Hop] | None = Field(
        default=None, description="--trace: the hops before the final response"
    )
    tls: TlsInfo | None = Field(default=None, description="--trace: https only")


class MailResult(_Ran):
    """A mail job that ran (ok or not)."""

    kind: Literal["mail"]
    status: int | None = Field(description="SMTP reply to the end of DATA or the failing command")
    message_id: str | None
    recipients: list[str] = Field(description="accepted addresses")
    refused: dict[str, tuple[int, str]] = Field(description="address -> [code, message]")


class InternalResult(_Ran):
    """A job whose attempt raised unexpectedly (a bug in fetcher): the common fields only."""

    kind: Literal["http", "mail"]
    ok: Literal[False]
    error: ErrorInfo


class RefusedResult(_Result):
    """A job refused before any attempt (``invalid_job``, ``invalid_url``), or dead-lettered
    by the scale-out worker (``abandoned``, whose ``attempts`` are its deliveries)."""

    kind: Literal["http", "mail"] | None = Field(description="null when it cannot be told")
    ok: Literal[False]
    elapsed_ms: Literal[0]
    error: ErrorInfo
    line: int = Field(ge=0, description="1-based input line (JSONL) or position (YAML)")
    url: str | None = Field(
        default=None, description="an http job's URL, any password shown as ***"
    )


ResultModel = Annotated[
    HttpResult | MailResult | RefusedResult | InternalResult, Field(union_mode="left_to_right")
]
"""One result line: the models are disjoint, so exactly one of them matches a valid line."""


def _finish(schema: dict[str, Any], title: str) -> dict[str, Any]:
    return {"$schema": DRAFT, "title": title, **schema}


def job_schema() -> dict[str, Any]:
    """Schema of one job line: ``id`` may be left out (it defaults to the line number), and
    ``kind`` may be left out of an http job."""
    schema = TypeAdapter(HttpJob | MailJob).json_schema(by_alias=True, mode="validation")
    for name, model in schema.get("$defs", {}).items():
        required = model.get("required", [])
        model["required"] = [f for f in required if f != "id"]
        if name == "MailJob":
            model["required"].append("kind")
            # One address may be given as a plain string (the model's before-validator).
            for key in ("to", "cc", "bcc"):
                prop = model["properties"][key]
                as_list = {k: v for k, v in prop.items() if k not in ("title", "default")}
                model["properties"][key] = {
                    "anyOf": [{"type": "string"}, as_list],
                    **{k: v for k, v in prop.items() if k in ("title", "default")},
                }
    return _finish(schema, "fetcher job")


def result_schema() -> dict[str, Any]:
    """Schema of one result line (what ``fetcher run`` writes and ``Result.to_dict()`` holds)."""
    return _finish(TypeAdapter(ResultModel).json_schema(mode="serialization"), "fetcher result")
