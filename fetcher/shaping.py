"""Output shaping: which fields a result line keeps (``--fields``) and how it is encoded
(``--format jsonl`` or ``csv``).

A projection builds only the kept fields' dict and encodes that, so a narrow line costs less
to write than a full one, not more. A field the result does not carry is written as null
(an empty CSV cell), so every line of a file has the same keys in the same order.

Leaf module: imports nothing from the package.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from typing import Any

import orjson

#  Every field a result line can carry (docs/results.md: result lines, wire facts, bodies on
#  disk and reruns), and the two that --fields and CSV derive from ``error``.
RESULT_FIELDS = (
    "id",
    "kind",
    "ok",
    "attempts",
    "started_at",
    "elapsed_ms",
    "error",
    "line",
    "meta",
    "url",
    "final_url",
    "method",
    "status",
    "headers",
    "content_type",
    "bytes",
    "sha256",
    "redirects",
    "body",
    "body_error",
    "not_modified",
    "path",
    "warc",
    "remote_addr",
    "http_version",
    "timings",
    "redirect_chain",
    "tls",
    "message_id",
    "recipients",
    "refused",
)
DERIVED_FIELDS = ("error_type", "error_message")
KNOWN_FIELDS = frozenset(RESULT_FIELDS + DERIVED_FIELDS)

#  The default CSV columns (docs/cli.md, output shaping).
CSV_FIELDS = (
    "id",
    "kind",
    "ok",
    "status",
    "url",
    "final_url",
    "content_type",
    "bytes",
    "sha256",
    "path",
    "elapsed_ms",
    "attempts",
    "error_type",
    "error_message",
)

#  What a run itself reads from every result, whatever ``--fields`` keeps: the summary and
#  progress (ok, error, attempts, elapsed_ms), ``--metrics`` (kind, bytes), ``--since`` (status).
RUN_FIELDS = frozenset({"id", "kind", "ok", "attempts", "elapsed_ms", "error", "status", "bytes"})

FORMATS = ("jsonl", "csv")
Encoder = Callable[[dict[str, Any]], bytes]
_OPTS = orjson.OPT_APPEND_NEWLINE


def parse_fields(value: str | Sequence[str]) -> tuple[str, ...]:
    """``--fields`` as a tuple of names, ``id`` first and each name once.

    Raises ValueError naming the first name no result line can carry.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        if name not in KNOWN_FIELDS:
            raise ValueError(f"unknown field {name!r} (known: {', '.join(sorted(KNOWN_FIELDS))})")
    kept = ["id", *(n for n in names if n != "id")]
    return tuple(dict.fromkeys(kept))


def computed_fields(fields: Sequence[str] | None) -> frozenset[str] | None:
    """The result fields a run that writes only ``fields`` has to compute: those, and what the
    run itself reads (``RUN_FIELDS``). None (every field) when the whole line is written.

    A projection is how a user makes a run as lean as a hand-written script: a field no one
    reads (headers copied and lower-cased, a body's sha256, a formatted start time) is not made.
    """
    if fields is None:
        return None
    return RUN_FIELDS.union(fields)


def output_format(output: str, fmt: str | None) -> str:
    """The format asked for, else ``csv`` for an OUT ending in ``.csv``, else ``jsonl``."""
    if fmt is not None:
        return fmt
    return "csv" if output.lower().endswith(".csv") else "jsonl"


def _error_part(key: str) -> Callable[[dict[str, Any]], Any]:
    def get(result: dict[str, Any]) -> Any:
        error = result.get("error")
        return error.get(key) if isinstance(error, dict) else None

    return get


def _plain(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda result: result.get(name)


_DERIVED = {"error_type": _error_part("type"), "error_message": _error_part("message")}


def projector(fields: Sequence[str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function from a result to the dict of just ``fields``, in that order."""
    names = tuple(fields)
    if not any(name in _DERIVED for name in names):

        def project(result: dict[str, Any]) -> dict[str, Any]:
            get = result.get
            return {name: get(name) for name in names}

        return project
    getters = tuple((name, _DERIVED.get(name) or _plain(name)) for name in names)

    def project_derived(result: dict[str, Any]) -> dict[str, Any]:
        return {name: get(result) for name, get in getters}

    return project_derived


def jsonl_encoder(fields: Sequence[str] | None) -> Encoder:
    """Result -> one JSON line (all fields, or only ``fields``)."""
    dumps = orjson.dumps
    if fields is None:
        return lambda result: dumps(result, option=_OPTS)
    project = projector(fields)
    return lambda result: dumps(project(result), option=_OPTS)


def _cell(value: Any) -> Any:
    """A CSV cell: text and numbers as they are, booleans as true/false, null as an empty
    cell, nested values (headers, meta, timings, ...) as JSON text."""
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


class _LastWrite:
    """A file-like object keeping only the last string written: csv.writer writes one row
    with one call."""

    text = ""

    def write(self, text: str) -> int:
        self.text = text
        return len(text)


class CsvEncoder:
    """Result -> one RFC 4180 CSV record (CRLF line ends, quoted where needed), UTF-8."""

    def __init__(self, fields: Sequence[str] | None) -> None:
        self.fields = tuple(fields) if fields is not None else CSV_FIELDS
        self._project = projector(self.fields)
        self._out = _LastWrite()
        self._writer = csv.writer(self._out, lineterminator="\r\n")

    def header(self) -> bytes:
        self._writer.writerow(self.fields)
        return self._out.text.encode()

    def __call__(self, result: dict[str, Any]) -> bytes:
        self._writer.writerow([_cell(v) for v in self._project(result).values()])
        return self._out.text.encode()


def encoder(fmt: str, fields: Sequence[str] | None) -> tuple[Encoder, bytes]:
    """The encoder of a results file and the header it starts with (CSV's header row)."""
    if fmt == "csv":
        enc = CsvEncoder(fields)
        return enc, enc.header()
    return jsonl_encoder(fields), b""
