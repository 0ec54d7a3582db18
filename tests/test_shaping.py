"""Output shaping: --fields and CSV output, end to end, and the encoders themselves."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import orjson
import pytest

from fetcher import Runner, Settings
from fetcher.schema import HttpResult, MailResult, RefusedResult
from fetcher.shaping import (
    CSV_FIELDS,
    KNOWN_FIELDS,
    RESULT_FIELDS,
    RUN_FIELDS,
    CsvEncoder,
    computed_fields,
    jsonl_encoder,
    parse_fields,
)

from .app import ServerThread
from .test_e2e import by_id, fetcher, json_lines, write_jsonl


def _jobs(tmp_path: Path, server: ServerThread, key: str) -> Path:
    return write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"id": "a", "url": f"{server.url}/ok", "meta": {"row": 1}},
            {"id": "b", "url": f"{server.url}/fail/{key}/404"},
            {"id": "c", "url": "ftp://nowhere/"},
            {"id": 'd,"quoted"', "url": f"{server.url}/ok", "body": "text"},
        ],
    )


def test_fields_keep_only_those_in_that_order_id_first(
    server: ServerThread, key: str, tmp_path: Path
) -> None:
    proc = fetcher("run", _jobs(tmp_path, server, key), "--fields", "status,ok,error_type,id")
    assert proc.returncode == 1, proc.stderr.decode()
    lines = {r["id"]: r for r in json_lines(proc.stdout)}
    assert all(list(r) == ["id", "status", "ok", "error_type"] for r in lines.values())
    assert lines["a"] == {"id": "a", "status": 200, "ok": True, "error_type": None}
    assert lines["b"]["error_type"] == "http_status" and lines["b"]["status"] == 404
    assert lines["c"] == {"id": "c", "status": None, "ok": False, "error_type": "invalid_url"}


@pytest.mark.parametrize("fields", ["id,nope", "status,,Bytes"])
def test_unknown_field_is_a_usage_error_naming_it(tmp_path: Path, fields: str) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": "http://127.0.0.1:9/"}])
    proc = fetcher("run", jobs, "--fields", fields)
    assert proc.returncode == 2
    bad = fields.split(",")[-1]
    assert f"unknown field {bad!r}" in proc.stderr.decode()
    assert proc.stdout == b""
    assert "Traceback" not in proc.stderr.decode()


def test_fields_from_the_config_file(server: ServerThread, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("fields: [status, bytes]\n")
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "x", "url": f"{server.url}/ok"}])
    proc = fetcher("run", jobs, "-c", config)
    assert proc.returncode == 0, proc.stderr.decode()
    [line] = json_lines(proc.stdout)
    assert list(line) == ["id", "status", "bytes"] and line["status"] == 200


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_output_reads_back_with_the_csv_module(
    server: ServerThread, key: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.csv"
    proc = fetcher("run", _jobs(tmp_path, server, key), "-o", out)
    assert proc.returncode == 1, proc.stderr.decode()
    raw = out.read_bytes()
    assert raw.startswith(b"id,kind,ok,") and raw.endswith(b"\r\n")
    rows = {r["id"]: r for r in _read_csv(out)}
    assert list(next(iter(rows.values()))) == list(CSV_FIELDS)
    assert set(rows) == {"a", "b", "c", 'd,"quoted"'}
    a = rows["a"]
    assert (a["ok"], a["status"], a["error_type"], a["path"]) == ("true", "200", "", "")
    assert int(a["bytes"]) > 0 and len(a["sha256"]) == 64
    assert rows["b"]["error_type"] == "http_status" and rows["b"]["error_message"]
    assert rows["c"]["ok"] == "false" and rows["c"]["status"] == ""


def test_csv_nested_values_are_json_text(server: ServerThread, key: str, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"  # not .csv: --format says it
    proc = fetcher(
        "run",
        _jobs(tmp_path, server, key),
        "-o",
        out,
        "--format",
        "csv",
        "--fields",
        "headers,meta,body",
    )
    assert proc.returncode == 1, proc.stderr.decode()
    rows = {r["id"]: r for r in _read_csv(out)}
    assert orjson.loads(rows["a"]["meta"]) == {"row": 1}
    assert orjson.loads(rows["a"]["headers"])["content-type"].startswith("text/plain")
    assert rows['d,"quoted"']["body"] == "hello\n"  # a cell holding a newline, quoted
    assert rows["c"]["headers"] == ""


def test_csv_output_reads_back_with_pandas(server: ServerThread, key: str, tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    out = tmp_path / "out.csv"
    fetcher("run", _jobs(tmp_path, server, key), "-o", out)
    frame = pd.read_csv(out, dtype={"id": str})
    assert list(frame.columns) == list(CSV_FIELDS)
    assert sorted(frame["id"]) == sorted(["a", "b", "c", 'd,"quoted"'])


def test_resume_on_a_csv_output_ignores_a_torn_last_row(
    server: ServerThread, key: str, tmp_path: Path
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [{"id": f"r{i}", "url": f"{server.url}/fail/{key}-{i}/200"} for i in range(3)],
    )
    out = tmp_path / "out.csv"
    header = ",".join(CSV_FIELDS)
    out.write_bytes(f"{header}\r\nr0,http,true,200\r\nr1,http,true,2".encode())
    proc = fetcher("run", jobs, "-o", out, "--resume")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = _read_csv(out)
    assert sorted(r["id"] for r in rows) == ["r0", "r1", "r2"]
    assert server.count(f"{key}-0") == 0  # done
    assert server.count(f"{key}-1") == 1  # its row was torn: run again
    assert out.read_bytes().decode().count(header) == 1


def test_resume_on_a_csv_with_other_columns_is_refused(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "x", "url": "http://127.0.0.1:9/"}])
    out = tmp_path / "out.csv"
    out.write_bytes(b"id,status\r\nx,200\r\n")
    proc = fetcher("run", jobs, "-o", out, "--resume")
    assert proc.returncode == 2
    assert "columns" in proc.stderr.decode()
    assert out.read_bytes() == b"id,status\r\nx,200\r\n"


def test_processes_shape_the_merged_output(server: ServerThread, tmp_path: Path) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl", [{"id": f"p{i}", "url": f"{server.url}/ok"} for i in range(6)]
    )
    out = tmp_path / "out.csv"
    proc = fetcher("run", jobs, "-o", out, "--processes", "2", "--fields", "ok")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = _read_csv(out)
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)]
    assert {r["ok"] for r in rows} == {"true"}


# --- a projection computes only what it writes, and writes what the full line holds ------------

#  Every field of an http line but those that differ from one run to the next.
STABLE_FIELDS = [
    name
    for name in RESULT_FIELDS
    if name not in ("started_at", "elapsed_ms", "timings", "redirect_chain", "tls")
]


def _varied_jobs(tmp_path: Path, server: ServerThread, key: str) -> Path:
    digest = hashlib.sha256(b"hello\n").hexdigest()
    return write_jsonl(
        tmp_path / "varied.jsonl",
        [
            {"id": "plain", "url": f"{server.url}/ok"},
            {"id": "redirected", "url": f"{server.url}/redirect/2"},
            {"id": "headers", "url": f"{server.url}/headers"},
            {"id": "two-types", "url": f"{server.url}/content-types"},
            {"id": "gzip", "url": f"{server.url}/gzip"},
            {"id": "status", "url": f"{server.url}/fail/{key}/404"},
            {"id": "sha-ok", "url": f"{server.url}/ok", "sha256": digest},
            {"id": "sha-bad", "url": f"{server.url}/ok", "sha256": "0" * 64},
            {"id": "body", "url": f"{server.url}/json", "body": "json", "meta": [1]},
            {"id": "head", "url": f"{server.url}/ok", "method": "HEAD"},
            {"id": "refused", "url": "http://127.0.0.1:9/", "retries": 0},
            {"id": "invalid", "url": "ftp://nowhere/"},
        ],
    )


@pytest.mark.parametrize(
    "fields",
    [
        ["id", "ok", "status", "bytes", "elapsed_ms"],  # the yardstick's own
        ["content_type", "status"],  # without the headers they come from
        ["headers"],
        ["bytes", "sha256", "error_type"],
        ["url", "final_url", "method", "redirects", "remote_addr", "http_version"],
        ["error_type", "error_message", "attempts", "kind", "meta", "body", "body_error"],
        STABLE_FIELDS,
    ],
    ids=lambda fields: ",".join(fields) if len(fields) < 8 else "all-stable",
)
def test_a_projection_writes_the_values_of_the_full_line(
    server: ServerThread, key: str, tmp_path: Path, fields: list[str]
) -> None:
    jobs = _varied_jobs(tmp_path, server, key)
    full_run = fetcher("run", jobs, "--config", _no_retries(tmp_path))
    projected_run = fetcher(
        "run", jobs, "--config", _no_retries(tmp_path), "--fields", ",".join(fields)
    )
    assert full_run.returncode == projected_run.returncode == 1, projected_run.stderr.decode()
    full = by_id(json_lines(full_run.stdout))
    projected = by_id([orjson.loads(line) for line in projected_run.stdout.splitlines()])
    assert set(projected) == set(full)
    kept = parse_fields(fields)
    derived = {"error_type": "type", "error_message": "message"}
    for job_id, line in projected.items():
        assert list(line) == list(kept)
        whole = full[job_id]
        for name in kept:
            if name in derived:
                expected = whole["error"] and whole["error"][derived[name]]
            else:
                expected = whole.get(name)
            if name == "elapsed_ms":
                assert isinstance(line[name], int | float) == isinstance(expected, int | float)
            elif name == "headers" and expected is not None:  # the Date header moves on
                assert {**line[name], "date": ""} == {**expected, "date": ""}, job_id
            else:
                assert line[name] == expected, (job_id, name)


def _no_retries(tmp_path: Path) -> Path:
    path = tmp_path / "no-retries.yaml"
    path.write_text("retries: 0\ntimeout: 5\n")
    return path


async def test_a_projected_runner_leaves_out_what_it_does_not_write(server: ServerThread) -> None:
    jobs = [
        {"id": "a", "url": f"{server.url}/ok"},
        {"id": "b", "url": f"{server.url}/ok", "sha256": "0" * 64},
    ]
    async with Runner(Settings(), fields=("id", "status")) as runner:
        results = {r.id: r async for r in runner.run(jobs)}
    a, b = results["a"], results["b"]
    assert a.status == 200 and a.ok and a["bytes"] == 6
    assert not {"headers", "sha256", "url", "content_type", "started_at"} & set(a)
    # The job's own sha256 is still checked: the digest is computed for it.
    assert b.error is not None and b.error["type"] == "checksum" and b["sha256"] is not None
    async with Runner(Settings()) as runner:
        [whole] = [r async for r in runner.run(jobs[:1])]
    assert whole["sha256"] == hashlib.sha256(b"hello\n").hexdigest() and whole["headers"]


def test_computed_fields_add_what_the_run_reads_itself() -> None:
    assert computed_fields(None) is None
    assert computed_fields(("id", "sha256")) == RUN_FIELDS | {"sha256"}


# --- the encoders ------------------------------------------------------------------------------


def test_every_field_of_the_result_schema_can_be_asked_for() -> None:
    for model in (HttpResult, MailResult, RefusedResult):
        assert set(model.model_fields) <= KNOWN_FIELDS, model.__name__


def test_parse_fields_puts_id_first_once() -> None:
    assert parse_fields("status, id ,status,bytes") == ("id", "status", "bytes")
    with pytest.raises(ValueError, match="'nope'"):
        parse_fields(["id", "nope"])


def test_jsonl_projection_writes_null_for_a_field_the_line_lacks() -> None:
    encode = jsonl_encoder(("id", "status", "error_message"))
    line = encode({"id": "x", "error": {"type": "dns", "message": "no such host"}, "ok": False})
    assert line == b'{"id":"x","status":null,"error_message":"no such host"}\n'


def test_csv_encoder_quotes_as_rfc_4180() -> None:
    enc = CsvEncoder(("id", "ok", "meta", "bytes"))
    record = enc({"id": 'a "b", c', "ok": True, "meta": {"k": [1]}, "bytes": 5})
    assert enc.header() == b"id,ok,meta,bytes\r\n"
    assert record == b'"a ""b"", c",true,"{""k"":[1]}",5\r\n'
    assert next(csv.reader(io.StringIO(record.decode()))) == ['a "b", c', "true", '{"k":[1]}', "5"]
