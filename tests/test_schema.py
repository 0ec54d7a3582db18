"""The JSON Schemas of a job line and of a result line, and the data they describe.

Job side: every example job file validates, and the schema agrees with the parser on a corpus of
good and bad jobs. Result side: a mixed job file (every outcome a local peer can produce, mail
included) runs through the real ``fetcher run`` and every line validates; so do the lines of the
end-to-end modules (conftest.py's ``_results_match_the_schema``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

from fetcher import InvalidJob, JobParser, Runner, Settings, job_schema, result_schema
from fetcher.errors import JobError
from fetcher.jobs import merge_defaults
from fetcher.pool import Pool, RetryPolicy
from fetcher.results import Outcome

from . import smtp_peer as peers
from .app import ServerThread
from .helpers import assert_valid_result
from .smtp_peer import Peer

smtp_peer = peers.smtp_peer
tls_certs = peers.tls_certs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
Validator = jsonschema.Draft202012Validator


@pytest.fixture(scope="module")
def jobs_validator() -> jsonschema.Draft202012Validator:
    return Validator(job_schema())


def test_both_are_valid_draft_2020_12_schemas() -> None:
    for schema in (job_schema(), result_schema()):
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Validator.check_schema(schema)
        # Closed: a field the code does not know is an error, not silently allowed.
        for name, model in schema["$defs"].items():
            if model.get("type") == "object" and "properties" in model:
                assert model.get("additionalProperties") is False, name


def fetcher_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fetcher", *map(str, args)],
        capture_output=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(("which", "build"), [("jobs", job_schema), ("results", result_schema)])
def test_schema_command_prints_the_schema(which: str, build: Any) -> None:
    proc = fetcher_cli("schema", which)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    assert json.loads(proc.stdout) == build()
    # Pretty, with sorted keys: diffs between versions stay readable.
    expected = json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False)
    assert proc.stdout.decode() == expected + "\n"


def test_schema_command_needs_jobs_or_results() -> None:
    proc = fetcher_cli("schema", "everything")
    assert proc.returncode == 2
    assert b"jobs" in proc.stderr and b"results" in proc.stderr


# --- jobs ---------------------------------------------------------------------------------------


def example_jobs() -> list[tuple[str, Any]]:
    """(where, job) for every job of every example file, YAML defaults merged as the reader does."""
    found: list[tuple[str, Any]] = []
    for path in sorted(EXAMPLES.iterdir()):
        if path.suffix in (".jsonl", ".ndjson"):
            lines = path.read_bytes().splitlines()
            found += [(f"{path.name}:{i}", orjson.loads(b)) for i, b in enumerate(lines, 1) if b]
        elif path.suffix in (".yaml", ".yml"):
            doc = yaml.safe_load(path.read_text())
            defaults = doc.get("defaults", {}) if isinstance(doc, dict) else {}
            jobs = doc["jobs"] if isinstance(doc, dict) else doc
            found += [
                (f"{path.name}#{i}", merge_defaults(defaults, job) if defaults else job)
                for i, job in enumerate(jobs, 1)
            ]
    return found


def test_examples_exist() -> None:
    names = {where.split(":")[0].split("#")[0] for where, _ in example_jobs()}
    assert {"jobs.jsonl", "jobs.yaml"} <= names


@pytest.mark.parametrize(("where", "job"), example_jobs(), ids=[w for w, _ in example_jobs()])
def test_every_example_job_validates(
    where: str, job: Any, jobs_validator: jsonschema.Draft202012Validator
) -> None:
    errors = [e.message for e in jobs_validator.iter_errors(job)]
    assert not errors, (where, errors)
    assert not isinstance(JobParser().parse(job, 1), InvalidJob)


MAIL = {"kind": "mail", "from": "a@example.com", "to": "b@example.com", "text": "hi"}

#  (job, valid?) pairs the schema can decide on its own: shapes and types, not the checks that
#  need code (URL scheme, CR/LF in headers, address syntax, json+data together, ${NAME}).
CORPUS: list[tuple[Any, bool]] = [
    ({"url": "http://h/"}, True),
    ({"id": "a", "kind": "http", "url": "http://h/", "method": "POST", "json": {"a": [1]}}, True),
    ({"url": "http://h/", "data": "x=1", "timeout": 2, "retries": 0, "max_bytes": 0}, True),
    ({"url": "http://h/", "params": {"q": "x", "n": 1, "f": 1.5, "b": True}}, True),
    ({"url": "http://h/", "headers": {"A": "b"}, "body": "base64", "meta": [1, {"x": None}]}, True),
    ({"url": "http://h/", "allow_redirects": False, "retry_unsafe": True}, True),
    (MAIL, True),
    ({**MAIL, "to": ["b@example.com"], "cc": "c@example.com", "bcc": [], "html": "<p>"}, True),
    ({**MAIL, "smtp": "default", "subject": "s", "headers": {"X-A": "1"}, "id": "m"}, True),
    ({}, False),
    ({"id": "x"}, False),
    ({"url": 5}, False),
    ({"url": "http://h/", "id": 7}, False),
    ({"url": "http://h/", "unknown": 1}, False),
    ({"url": "http://h/", "timeout": 0}, False),
    ({"url": "http://h/", "timeout": "5"}, False),
    ({"url": "http://h/", "retries": -1}, False),
    ({"url": "http://h/", "retries": 101}, False),
    ({"url": "http://h/", "retries": 1.5}, False),
    ({"url": "http://h/", "body": "xml"}, False),
    ({"url": "http://h/", "headers": {"A": 1}}, False),
    ({"url": "http://h/", "params": {"q": [1]}}, False),
    ({"url": "http://h/", "data": {"a": 1}}, False),
    ({"url": "http://h/", "max_bytes": -1}, False),
    ({"url": "http://h/", "allow_redirects": "yes"}, False),
    ({"url": "http://h/", "kind": "ftp"}, False),
    ({k: v for k, v in MAIL.items() if k != "from"}, False),
    ({k: v for k, v in MAIL.items() if k != "to"} | {"cc": 5}, False),
    ({**MAIL, "to": 5}, False),
    ({**MAIL, "url": "http://h/"}, False),
    ({**MAIL, "smtp": 1}, False),
    ([{"url": "http://h/"}], False),
    ("http://h/", False),
]


@pytest.mark.parametrize(("job", "valid"), CORPUS, ids=[str(i) for i in range(len(CORPUS))])
def test_schema_and_parser_agree(
    job: Any, valid: bool, jobs_validator: jsonschema.Draft202012Validator
) -> None:
    assert jobs_validator.is_valid(job) is valid
    assert (not isinstance(JobParser().parse(job, 1), InvalidJob)) is valid


# --- results ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results_validator() -> jsonschema.Draft202012Validator:
    return Validator(result_schema())


def mixed_jobs(base: str, port: int, closed_port: int) -> list[Any]:
    mail = {"kind": "mail", "from": "Sender <noreply@example.com>", "text": "Hi!"}
    return [
        {"id": "ok", "url": f"{base}/ok", "meta": {"row": 1, "tags": ["a"]}},
        {"id": "text", "url": f"{base}/redirect/1", "body": "text"},
        {"id": "base64", "url": f"{base}/gzip", "body": "base64"},
        {"id": "json", "url": f"{base}/json", "body": "json"},
        {"id": "not-json", "url": f"{base}/not-json", "body": "json", "meta": "m"},
        {"id": "head", "method": "HEAD", "url": f"{base}/ok"},
        {"id": "post", "method": "POST", "url": f"{base}/echo", "data": "a=1", "body": "json"},
        {"id": "s404", "url": f"{base}/status/404", "body": "text"},
        {"id": "s500", "url": f"{base}/status/500", "retries": 1},
        {"id": "huge", "url": f"{base}/huge?size=300000", "max_bytes": 1000},
        {"id": "loop", "url": f"{base}/loop"},
        {"id": "hang", "url": f"{base}/hang", "timeout": 0.3},
        {"id": "drop", "url": f"{base}/drop"},
        {"id": "closed", "url": f"http://127.0.0.1:{closed_port}/", "meta": 3},
        {"id": "dns", "url": "http://nowhere.invalid/"},
        {"id": "ftp", "url": "ftp://files.test/a"},
        {"id": "pw", "url": f"http://user:secret@127.0.0.1:{port}/ok"},
        b'{"id": "broken", ',
        b"[1, 2]",
        {"id": "wrong-type", "url": f"{base}/ok", "retries": "many"},
        {"id": "no-kind"},
        {"url": f"{base}/ok"},
        {**mail, "id": "mail-ok", "to": ["a@example.org"], "cc": "c@example.org", "meta": 1},
        {**mail, "id": "mail-some", "to": ["a@example.org", "refuse@example.org"]},
        {**mail, "id": "mail-refused", "to": "refuse@example.org"},
        {**mail, "id": "mail-profile", "to": "a@example.org", "smtp": "nowhere"},
        {**mail, "id": "mail-bad-address", "to": "not an address"},
    ]


EXPECTED_TYPES = {
    "ok": None,
    "text": None,
    "base64": None,
    "json": None,
    "not-json": None,
    "head": None,
    "post": None,
    "s404": "http_status",
    "s500": "http_status",
    "huge": "too_large",
    "loop": "too_many_redirects",
    "hang": "timeout",
    "drop": "protocol",
    "closed": "connect",
    "dns": "dns",
    "ftp": "invalid_url",
    "pw": None,
    "18": "invalid_job",
    "19": "invalid_job",
    "wrong-type": "invalid_job",
    "no-kind": "invalid_job",
    "22": None,
    "mail-ok": None,
    "mail-some": None,
    "mail-refused": "smtp_rejected",
    "mail-profile": "invalid_job",
    "mail-bad-address": "invalid_job",
}


def test_every_line_of_a_mixed_run_validates(
    server: ServerThread,
    closed_port: int,
    smtp_peer: Any,
    tmp_path: Path,
    results_validator: jsonschema.Draft202012Validator,
) -> None:
    peer: Peer = smtp_peer(refuse={"refuse@example.org": "550 5.1.1 no such user"})
    config = tmp_path / "config.yaml"
    config.write_text(
        "backoff_base: 0.01\nretries: 0\ntimeout: 5\n"
        "smtp:\n  default:\n" + "".join(f"    {k}: {v}\n" for k, v in peer.profile().items())
    )
    jobs = tmp_path / "jobs.jsonl"
    with jobs.open("wb") as f:
        for job in mixed_jobs(server.url, server.port, closed_port):
            f.write((job if isinstance(job, bytes) else orjson.dumps(job)) + b"\n")
    out = tmp_path / "out.jsonl"
    proc = fetcher_cli("run", jobs, "-c", config, "-o", out, "--no-progress")
    assert proc.returncode == 1, proc.stderr.decode()
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    for line in lines:
        assert_valid_result(line)
    results = {r["id"]: r for r in lines}
    got = {i: r["error"]["type"] if r["error"] else None for i, r in results.items()}
    assert got == EXPECTED_TYPES
    # Each branch of the schema was exercised, and the optional fields showed up.
    assert results["not-json"]["body"] is None and results["not-json"]["body_error"]
    assert results["mail-some"]["refused"] == {"refuse@example.org": [550, "5.1.1 no such user"]}
    assert results["mail-profile"]["kind"] == "mail" and results["mail-profile"]["line"] == 26
    assert results["19"]["kind"] is None
    assert results["ok"]["meta"] == {"row": 1, "tags": ["a"]}
    assert "secret" not in out.read_text()


def test_lines_that_break_the_contract_are_refused(
    results_validator: jsonschema.Draft202012Validator,
) -> None:
    good = {
        "id": "a",
        "kind": "http",
        "ok": True,
        "attempts": 1,
        "started_at": "2026-01-02T03:04:05.678Z",
        "elapsed_ms": 1.5,
        "error": None,
        "url": "http://h/",
        "final_url": "http://h/",
        "method": "GET",
        "status": 200,
        "headers": {"content-type": "text/plain"},
        "content_type": "text/plain",
        "bytes": 6,
        "sha256": "0" * 64,
        "redirects": 0,
    }
    assert results_validator.is_valid(good)
    refused = {
        "id": "3",
        "kind": None,
        "ok": False,
        "attempts": 0,
        "started_at": "2026-01-02T03:04:05.678Z",
        "elapsed_ms": 0,
        "error": {"type": "invalid_job", "message": "x"},
        "line": 3,
    }
    assert results_validator.is_valid(refused)
    for bad in (
        {**good, "surprise": 1},
        {k: v for k, v in good.items() if k != "sha256"},
        {**good, "started_at": "yesterday"},
        {**good, "error": {"type": "oops", "message": "x"}},
        {**good, "error": {"type": "dns", "message": "x", "extra": 1}},
        {**good, "attempts": -1},
        {**good, "kind": "ftp"},
        {**refused, "ok": True},
        {**refused, "elapsed_ms": 3},
        {k: v for k, v in refused.items() if k != "line"},
    ):
        assert not results_validator.is_valid(bad), bad


class Raising:
    """A handler with a bug: the pool turns its exception into an ``internal`` result."""

    async def attempt(self, job: Any) -> Outcome:
        raise ZeroDivisionError


async def _items(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def test_internal_and_abandoned_lines_validate(
    results_validator: jsonschema.Draft202012Validator, caplog: pytest.LogCaptureFixture
) -> None:
    results: list[dict[str, Any]] = []
    pool = Pool(
        handlers={"http": Raising()},
        emit=results.append,
        concurrency=2,
        policy=RetryPolicy(retries=0),
    )
    job = JobParser().parse({"id": "bug", "url": "http://h/", "meta": {"k": 1}}, 1)
    await pool.run(_items([job]))
    [internal] = results
    assert internal["error"]["type"] == "internal" and internal["meta"] == {"k": 1}
    assert_valid_result(internal)
    # The scale-out worker's dead-letter line (worker.py ``_abandon``), as it writes it.
    abandoned = {
        "id": "deadly",
        "kind": "http",
        "ok": False,
        "attempts": 5,
        "started_at": "2026-01-02T03:04:05.678Z",
        "elapsed_ms": 0,
        "error": {"type": "abandoned", "message": "delivered 5 times and never finished"},
        "line": 2,
        "url": "http://h/hang",
    }
    assert_valid_result(abandoned)
    assert JobError("internal", "x").to_dict()["type"] == "internal"


async def test_library_results_validate(
    base_url: str, results_validator: jsonschema.Draft202012Validator
) -> None:
    jobs = [
        {"id": "ok", "url": f"{base_url}/json", "body": "json", "meta": None},
        {"id": "s503", "url": f"{base_url}/status/503"},
        {"id": "bad", "url": 1},
    ]
    async with Runner(Settings(retries=0, timeout=5)) as runner:
        async for result in runner.run(jobs):
            assert_valid_result(result.to_dict())
    await asyncio.sleep(0)
