"""JSON Schema (draft 2020-12) of a job line and of a result line.

The job schema is generated from the models jobs are validated with (``HttpJob``, ``MailJob``).
The result models below are the one declaration of a result line's fields; the handlers build
their result dicts to match, and the test suite validates every line the end-to-end tests produce
against the schema generated here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .errors import ErrorType
from .jobs import HttpJob, MailJob

DRAFT = "https://json-schema.org/draft/2020-12/schema"

_closed = ConfigDict(extra="forbid")


class ErrorInfo(BaseModel):
    model_config = _closed
    type: ErrorType
    message: str


class _Result(BaseModel):
    model_config = _closed
    id: str
    ok: bool
    attempts: int = Field(ge=0)
    started_at: str = Field(description="ISO 8601 UTC time of the first attempt (or of reading)")
    elapsed_ms: float = Field(ge=0)
    error: ErrorInfo | None
    meta: Any = Field(None, description="the job's own meta field, when it had one")
    line: int | None = Field(None, description="input line or position; refused jobs only")


class HttpResult(_Result):
    kind: Literal["http"]
    url: str
    final_url: str | None
    method: str
    status: int | None
    headers: dict[str, str] | None
    content_type: str | None
    bytes: int | None
    sha256: str | None
    redirects: int = Field(ge=0)
    body: Any = Field(None, description="only when the job asked for a body")
    body_error: str | None = Field(None, description="body mode json and a body that is not JSON")


class MailResult(_Result):
    kind: Literal["mail"]
    status: int | None
    message_id: str | None
    recipients: list[str]
    refused: dict[str, tuple[int, str]]


class RefusedResult(_Result):
    """A job refused before any attempt (``invalid_job``, ``invalid_url``, ``abandoned``)."""

    kind: Literal["http", "mail"] | None
    url: str | None = None


Result = Annotated[HttpResult | MailResult | RefusedResult, Field(union_mode="left_to_right")]


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
    return _finish(TypeAdapter(Result).json_schema(mode="serialization"), "fetcher result")
