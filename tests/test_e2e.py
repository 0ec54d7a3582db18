"""`fetcher run` and `fetcher validate` run as a user would: a subprocess on a job file."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from .app import ServerThread
from .helpers import assert_valid_results

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
COMMON = {"id", "kind", "ok", "attempts", "started_at", "elapsed_ms", "error"}
HTTP_FIELDS = {"url", "final_url", "method", "status", "headers", "content_type"} | {
    "bytes",
    "sha256",
    "redirects",
}
SPEC_TYPES = {
    "invalid_job",
    "invalid_url",
    "blocked",
    "dns",
    "connect",
    "tls",
    "timeout",
    "protocol",
    "too_large",
    "too_many_redirects",
    "http_status",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FETCHER_")}
    env.update(extra)
    return env


def fetcher(
    *args: str | Path,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fetcher", *map(str, args)],
        input=stdin,
        capture_output=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def json_lines(data: bytes) -> list[dict[str, Any]]:
    """Every line of ``data`` must be one JSON object: nothing else may reach the output."""
    assert data.endswith(b"\n") or not data
    lines = data.decode().splitlines()
    results = [orjson.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in results)
    assert_valid_results(results)  # every line the end-to-end tests read meets the schema
    return results


def by_id(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)), "a job has more than one result line"
    return {r["id"]: r for r in results}


def write_jsonl(path: Path, jobs: list[Any]) -> Path:
    with path.open("wb") as f:
        for job in jobs:
            f.write(job if isinstance(job, bytes) else orjson.dumps(job))
            f.write(b"\n")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """Fast retries: tiny backoff, Retry-After capped at 0.2 s."""
    path = tmp_path / "fast.yaml"
    path.write_text("backoff_base: 0.01\nbackoff_max: 0.05\nretry_after_max: 0.2\ntimeout: 5\n")
    return path


def check_common(r: dict[str, Any]) -> None:
    assert set(r) >= COMMON, r
    assert isinstance(r["id"], str)
    assert r["kind"] in ("http", "mail", None)
    assert isinstance(r["ok"], bool)
    assert isinstance(r["attempts"], int) and r["attempts"] >= 0
    assert ISO_UTC.match(r["started_at"]), r["started_at"]
    assert isinstance(r["elapsed_ms"], int | float) and r["elapsed_ms"] >= 0
    if r["ok"]:
        assert r["error"] is None
    else:
        assert set(r["error"]) == {"type", "message"}
        assert r["error"]["type"] in SPEC_TYPES
        assert r["error"]["message"] and "\n" not in r["error"]["message"]
    if r["attempts"] > 0:
        assert r["kind"] == "http"
        assert set(r) >= HTTP_FIELDS, r
        assert all(name == name.lower() for name in r["headers"] or {})
    else:
        assert r["error"]["type"] in ("invalid_job", "invalid_url")
        assert r["elapsed_ms"] == 0


# --- the mixed run -----------------------------------------------------------------------------


def mixed_jobs(base: str, port: int, closed_port: int, key: str) -> list[Any]:
    return [
        {"id": "ok", "url": f"{base}/ok"},
        {"id": "redirect", "url": f"{base}/redirect/2", "body": "text"},
        {"id": "json", "url": f"{base}/json", "body": "json"},
        {"id": "not-json", "url": f"{base}/not-json", "body": "json"},
        {"id": "b64", "url": f"{base}/gzip", "body": "base64"},
        {"id": "s404", "url": f"{base}/status/404"},
        {"id": "s503", "url": f"{base}/fail/{key}-503/503"},
        {"id": "flaky", "url": f"{base}/flaky/{key}-429/2?ra=30"},
        {"id": "loop", "url": f"{base}/loop"},
        {"id": "to-file", "url": f"{base}/to-file"},
        {"id": "hang", "url": f"{base}/hang", "timeout": 0.4, "retries": 0},
        {"id": "trickle", "url": f"{base}/trickle?interval=0.05", "timeout": 0.4, "retries": 0},
        {"id": "drop", "url": f"{base}/drop", "retries": 0},
        {"id": "cl-lie", "url": f"{base}/cl-lie", "retries": 0},
        {"id": "huge", "url": f"{base}/huge?size=5000000", "max_bytes": 100000},
        {"id": "bomb", "url": f"{base}/gzip-bomb", "max_bytes": 100000},
        {"id": "closed", "url": f"http://127.0.0.1:{closed_port}/", "retries": 0},
        {"id": "dns", "url": "http://nowhere.invalid/"},
        {"id": "ftp", "url": "ftp://files.test/a"},
        {"id": "crlf", "url": f"{base}/ok\r\nX-Injected: 1"},
        b'{"id": "broken", "url": ',  # line 21: not JSON
        {"id": "wrong-type", "url": f"{base}/ok", "retries": "many"},
        {"id": "no-env", "url": f"{base}/ok", "headers": {"X-Token": "${E2E_UNSET_VAR}"}},
        {
            "id": "env",
            "url": f"{base}/echo",
            "headers": {"X-Token": "${E2E_TOKEN}"},
            "body": "json",
        },
        {"id": "pw", "url": f"http://user:pa55word@127.0.0.1:{port}/ok"},
        {"url": f"{base}/ok"},  # line 26: its id is "26"
        {"id": "post", "method": "POST", "url": f"{base}/echo", "json": {"a": 1}, "body": "json"},
    ]


EXPECTED = {
    "ok": None,
    "redirect": None,
    "json": None,
    "not-json": None,
    "b64": None,
    "s404": "http_status",
    "s503": "http_status",
    "flaky": None,
    "loop": "too_many_redirects",
    "to-file": "too_many_redirects",
    "hang": "timeout",
    "trickle": "timeout",
    "drop": "protocol",
    "cl-lie": "protocol",
    "huge": "too_large",
    "bomb": "too_large",
    "closed": "connect",
    "dns": "dns",
    "ftp": "invalid_url",
    "crlf": "invalid_url",
    "21": "invalid_job",
    "wrong-type": "invalid_job",
    "no-env": "invalid_job",
    "env": None,
    "pw": None,
    "26": None,
    "post": None,
}


def test_mixed_job_file_gives_one_correct_line_per_job(
    server: ServerThread, closed_port: int, key: str, tmp_path: Path, config: Path
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl", mixed_jobs(server.url, server.port, closed_port, key)
    )
    proc = fetcher(
        "run", jobs, "-c", config, "--retries", "2", "-n", "8",
        env=clean_env(E2E_TOKEN="tok-123"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr.decode()
    results = by_id(json_lines(proc.stdout))
    assert set(results) == set(EXPECTED)
    for job_id, expected in EXPECTED.items():
        r = results[job_id]
        check_common(r)
        got = r["error"]["type"] if r["error"] else None
        assert got == expected, (job_id, r)
        assert r["ok"] is (expected is None)

    # Field by field, the parts the contract names.
    ok = results["ok"]
    assert ok["status"] == 200 and ok["bytes"] == 6 and ok["attempts"] == 1
    assert ok["sha256"] == hashlib.sha256(b"hello\n").hexdigest()
    assert ok["method"] == "GET" and ok["final_url"] == ok["url"] == f"{server.url}/ok"
    assert ok["content_type"].startswith("text/plain") and "body" not in ok
    assert results["redirect"]["redirects"] == 2
    assert results["redirect"]["final_url"] == f"{server.url}/redirect/0"
    assert results["redirect"]["body"] == "end of the chain\n"
    assert results["json"]["body"]["name"] == "fetcher"
    assert results["not-json"]["body"] is None and results["not-json"]["body_error"]
    assert results["b64"]["body"]
    assert results["s404"]["status"] == 404 and results["s404"]["attempts"] == 1
    assert results["s404"]["headers"]["x-status"] == "404"
    assert results["s503"]["attempts"] == 3 and server.count(f"{key}-503") == 3
    assert results["flaky"]["attempts"] == 2 and results["flaky"]["status"] == 200
    assert results["flaky"]["elapsed_ms"] < 5000  # Retry-After 30 s was capped by the config
    assert results["hang"]["attempts"] == 1 and results["hang"]["status"] is None
    assert 350 <= results["hang"]["elapsed_ms"] < 3000
    assert results["huge"]["status"] == 200
    assert results["closed"]["status"] is None and results["closed"]["attempts"] == 1
    assert results["dns"]["attempts"] == 1  # a name that does not exist is not retried
    assert results["crlf"]["kind"] == "http" and results["crlf"]["attempts"] == 0
    assert results["21"]["line"] == 21 and results["21"]["kind"] is None
    assert results["wrong-type"]["line"] == 22 and results["wrong-type"]["kind"] == "http"
    assert "E2E_UNSET_VAR" in results["no-env"]["error"]["message"]
    assert results["env"]["body"]["headers"]["x-token"] == "tok-123"
    assert results["pw"]["url"] == f"http://user:***@127.0.0.1:{server.port}/ok"
    assert b"pa55word" not in proc.stdout and b"pa55word" not in proc.stderr
    assert results["26"]["url"] == f"{server.url}/ok"
    post = results["post"]
    assert post["method"] == "POST" and post["body"]["method"] == "POST"
    assert orjson.loads(post["body"]["body"]) == {"a": 1}

    # The summary goes to stderr, never into the results.
    stderr = proc.stderr.decode()
    assert "27 jobs" in stderr
    assert "timeout" in stderr


# --- exit codes, outputs and inputs ------------------------------------------------------------


def test_all_ok_exits_0_and_writes_the_output_file(
    base_url: str, tmp_path: Path, config: Path
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": f"{base_url}/ok"}] * 5)
    out = tmp_path / "out.jsonl"
    proc = fetcher("run", jobs, "-o", out, "-c", config)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    results = json_lines(out.read_bytes())
    assert sorted(r["id"] for r in results) == ["1", "2", "3", "4", "5"]
    assert all(r["ok"] for r in results)


def test_stdin_is_read_with_dash(base_url: str, config: Path) -> None:
    data = b"".join(
        orjson.dumps({"id": f"s{i}", "url": f"{base_url}/ok"}) + b"\n" for i in range(3)
    )
    proc = fetcher("run", "-", "-c", config, stdin=data)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(by_id(json_lines(proc.stdout))) == ["s0", "s1", "s2"]


def start_on_open_stdin(*args: str | Path) -> subprocess.Popen[bytes]:
    """`fetcher run - ...` with stdin a pipe the test keeps open, as a producer would."""
    return subprocess.Popen(
        [sys.executable, "-m", "fetcher", "run", "-", *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )


class StdoutReader:
    """Reads a process's stdout in a thread (so it never fills the pipe and blocks the process),
    and tells when a number of lines have come."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._stream = proc.stdout
        self.data = b""
        self._grew = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := self._stream.read1(65536):
            with self._grew:
                self.data += chunk
                self._grew.notify_all()

    def lines(self, n: int, seconds: float) -> list[dict[str, Any]]:
        """The first ``n`` result lines, or fail if they do not all come in time."""
        with self._grew:
            if not self._grew.wait_for(lambda: self.data.count(b"\n") >= n, seconds):
                raise AssertionError(f"fewer than {n} result lines in {seconds} s, stdin open")
            return json_lines(b"".join(self.data.splitlines(keepends=True)[:n]))


def test_a_job_piped_in_runs_while_stdin_stays_open(base_url: str, config: Path) -> None:
    with start_on_open_stdin("-c", config, "--no-progress") as proc:
        assert proc.stdin is not None
        try:
            stdout = StdoutReader(proc)
            proc.stdin.write(orjson.dumps({"id": "first", "url": f"{base_url}/ok"}) + b"\n")
            proc.stdin.flush()
            (result,) = stdout.lines(1, 5)
            assert result["id"] == "first" and result["ok"] is True
            proc.stdin.close()
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()


def test_sigterm_with_stdin_still_open_exits_143_promptly(base_url: str, config: Path) -> None:
    with start_on_open_stdin("-c", config, "--no-progress") as proc:
        assert proc.stdin is not None and proc.stderr is not None
        try:
            stdout = StdoutReader(proc)
            # A full batch (2048 lines): even a reader that waits for whole batches starts.
            job = orjson.dumps({"url": f"{base_url}/ok"}) + b"\n"
            proc.stdin.write(job * 2048)
            proc.stdin.flush()
            # Every job done: all that is left is reading stdin for more.
            stdout.lines(2048, 10)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 143  # not after shutdown_grace (10 s), nor at EOF
            assert time.monotonic() - sent < 3
            assert b"Traceback" not in proc.stderr.read()
        finally:
            proc.kill()


def test_gzip_job_file(base_url: str, tmp_path: Path, config: Path) -> None:
    jobs = tmp_path / "jobs.jsonl.gz"
    jobs.write_bytes(gzip.compress(orjson.dumps({"id": "g", "url": f"{base_url}/ok"}) + b"\n"))
    proc = fetcher("run", jobs, "-c", config)
    assert proc.returncode == 0, proc.stderr.decode()
    assert [r["id"] for r in json_lines(proc.stdout)] == ["g"]


def test_yaml_job_file_with_defaults(base_url: str, tmp_path: Path, config: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"""
defaults:
  headers: {{X-Team: core}}
  body: json
jobs:
  - id: a
    url: {base_url}/echo
    headers: {{X-Job: a}}
  - url: {base_url}/echo
    params: {{q: "1"}}
  - url: ftp://nope.test/
"""
    )
    proc = fetcher("run", jobs, "-c", config)
    assert proc.returncode == 1, proc.stderr.decode()
    results = by_id(json_lines(proc.stdout))
    assert results["a"]["body"]["headers"]["x-team"] == "core"
    assert results["a"]["body"]["headers"]["x-job"] == "a"
    assert results["2"]["body"]["params"] == {"q": ["1"]}
    assert results["3"]["error"]["type"] == "invalid_url"


def test_existing_output_is_not_clobbered(base_url: str, tmp_path: Path, config: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "x", "url": f"{base_url}/ok"}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "precious"}\n')
    proc = fetcher("run", jobs, "-o", out, "-c", config)
    assert proc.returncode == 2
    assert "--resume" in proc.stderr.decode() and "--overwrite" in proc.stderr.decode()
    assert out.read_text() == '{"id": "precious"}\n'

    proc = fetcher("run", jobs, "-o", out, "-c", config, "--overwrite")
    assert proc.returncode == 0, proc.stderr.decode()
    assert [r["id"] for r in json_lines(out.read_bytes())] == ["x"]


def test_empty_existing_output_is_fine(base_url: str, tmp_path: Path, config: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "x", "url": f"{base_url}/ok"}])
    out = tmp_path / "out.jsonl"
    out.touch()
    assert fetcher("run", jobs, "-o", out, "-c", config).returncode == 0


def test_resume_skips_jobs_already_done(
    server: ServerThread, key: str, tmp_path: Path, config: Path
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [{"id": f"r{i}", "url": f"{server.url}/fail/{key}-{i}/200"} for i in range(4)],
    )
    out = tmp_path / "out.jsonl"
    done = {"id": "r1", "kind": "http", "ok": True}
    out.write_bytes(orjson.dumps(done) + b"\n")
    proc = fetcher("run", jobs, "-o", out, "-c", config, "--resume")
    assert proc.returncode == 0, proc.stderr.decode()
    results = json_lines(out.read_bytes())
    assert sorted(r["id"] for r in results) == ["r0", "r1", "r2", "r3"]
    assert server.count(f"{key}-1") == 0
    assert server.count(f"{key}-0") == 1


@pytest.mark.parametrize(
    "config_text",
    ["timeout: -1\n", "concurrency: lots\n", "no_such_key: 1\n", "timeout: [1,\n"],
)
def test_bad_config_exits_2_before_any_request(
    server: ServerThread, key: str, tmp_path: Path, config_text: str
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": f"{server.url}/fail/{key}/200"}])
    config = tmp_path / "bad.yaml"
    config.write_text(config_text)
    proc = fetcher("run", jobs, "-c", config)
    assert proc.returncode == 2
    assert proc.stdout == b""
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err, err
    assert server.count(key) == 0


@pytest.mark.parametrize("key", ["ca_bundle", "client_cert"])
@pytest.mark.parametrize("processes", ["1", "2"])
def test_unusable_tls_file_exits_2_and_leaves_the_output_alone(
    tmp_path: Path, key: str, processes: str
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": "http://127.0.0.1:9/"}])
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "kept"}\n')
    env = clean_env(**{f"FETCHER_TLS__{key.upper()}": str(bad)})
    proc = fetcher("run", jobs, "-o", out, "--overwrite", "--processes", processes, env=env)
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and f"tls.{key}" in err, err
    assert out.read_text() == '{"id": "kept"}\n'


def test_unusable_smtp_ca_bundle_exits_2(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": "http://127.0.0.1:9/"}])
    config = tmp_path / "smtp.yaml"
    config.write_text(f"smtp:\n  bulk:\n    ca_bundle: {tmp_path / 'missing.pem'}\n")
    proc = fetcher("run", jobs, "-c", config)
    assert proc.returncode == 2 and proc.stdout == b""
    assert "smtp.bulk.ca_bundle" in proc.stderr.decode()


def test_bad_flag_value_exits_2(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": "http://127.0.0.1:9/"}])
    proc = fetcher("run", jobs, "--timeout", "0")
    assert proc.returncode == 2 and proc.stdout == b""
    assert "--timeout" in proc.stderr.decode()


@pytest.mark.parametrize(("name", "value"), [("FETCHER_RETRIES", "-3"), ("FETCHER_HEADERS", "x")])
def test_bad_env_value_exits_2(tmp_path: Path, name: str, value: str) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": "http://127.0.0.1:9/"}])
    proc = fetcher("run", jobs, env=clean_env(**{name: value}))
    assert proc.returncode == 2 and proc.stdout == b""
    stderr = proc.stderr.decode()
    assert name in stderr and len(stderr.splitlines()) == 1, stderr


@pytest.mark.parametrize("name", ["missing.jsonl", "jobs.json", "not-gzip.jsonl.gz"])
def test_unreadable_job_file_exits_2(tmp_path: Path, name: str) -> None:
    (tmp_path / "not-gzip.jsonl.gz").write_text('{"url": "http://a.test/"}\n')
    (tmp_path / "jobs.json").write_text('{"url": "http://a.test/"}\n')
    out = tmp_path / "out.jsonl"
    proc = fetcher("run", tmp_path / name, "-o", out)
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert name in proc.stderr.decode()
    assert not out.exists() or out.stat().st_size == 0


@pytest.mark.parametrize("resume", [False, True])
def test_output_that_cannot_be_opened_exits_2_before_any_request(
    server: ServerThread, key: str, tmp_path: Path, resume: bool
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": f"{server.url}/fail/{key}/200"}])
    out = tmp_path / "no-such-dir" / "out.jsonl"
    proc = fetcher("run", jobs, "-o", out, *(["--resume"] if resume else []))
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "no-such-dir" in err, err
    assert "No such file or directory" in err
    assert server.count(key) == 0


def test_job_file_that_fails_part_way_exits_2_with_one_line(tmp_path: Path) -> None:
    # Enough lines for a batch of results before the damage; each one is schema-checked below.
    data = b"".join(b'{"url": "ftp://files.test/%d"}\n' % i for i in range(10_000))
    packed = gzip.compress(data)
    jobs = tmp_path / "cut.jsonl.gz"
    jobs.write_bytes(packed[: len(packed) // 2])
    proc = fetcher("run", jobs, "-o", tmp_path / "out.jsonl")
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert "cannot read job file" in err and "cut.jsonl.gz" in err
    # What was read before the damage has whole result lines; a rerun with --resume goes on.
    json_lines((tmp_path / "out.jsonl").read_bytes())


def test_invalid_yaml_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("- url: http://a.test/\n- a: b: c\n")
    out = tmp_path / "out.jsonl"
    proc = fetcher("run", jobs, "-o", out)
    assert proc.returncode == 2
    assert "line 2" in proc.stderr.decode()
    assert not out.exists()


def test_flag_beats_env_beats_config_file(server: ServerThread, key: str, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("retries: 0\nbackoff_base: 0.001\n")
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl", [{"id": "f", "url": f"{server.url}/fail/{key}/503"}]
    )
    env = clean_env(FETCHER_RETRIES="1")
    (r,) = json_lines(fetcher("run", jobs, "-c", config, env=env).stdout)
    assert r["attempts"] == 2  # env (1) over file (0)
    (r,) = json_lines(fetcher("run", jobs, "-c", config, "--retries", "3", env=env).stdout)
    assert r["attempts"] == 4  # flag (3) over env
    (r,) = json_lines(fetcher("run", jobs, "-c", config).stdout)
    assert r["attempts"] == 1  # file (0) over the default (2)
    assert server.count(key) == 2 + 4 + 1


@pytest.mark.parametrize("source", ["file", "env"])
def test_overwrite_and_resume_from_the_config_file_or_environment(
    server: ServerThread, key: str, tmp_path: Path, config: Path, source: str
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [{"id": f"r{i}", "url": f"{server.url}/fail/{key}-{i}/200"} for i in range(3)],
    )
    out = tmp_path / "out.jsonl"
    out.write_bytes(orjson.dumps({"id": "r1", "kind": "http", "ok": True}) + b"\n")

    def run_with(name: str) -> subprocess.CompletedProcess[bytes]:
        if source == "env":
            return fetcher("run", jobs, "-o", out, "-c", config, env=clean_env(**{name: "1"}))
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(config.read_text() + f"{name.removeprefix('FETCHER_').lower()}: true\n")
        return fetcher("run", jobs, "-o", out, "-c", cfg)

    proc = run_with("FETCHER_RESUME")
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(r["id"] for r in json_lines(out.read_bytes())) == ["r0", "r1", "r2"]
    assert server.count(f"{key}-1") == 0  # r1 was already done
    proc = run_with("FETCHER_OVERWRITE")
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(json_lines(out.read_bytes())) == 3  # replaced, not appended to
    assert server.count(f"{key}-1") == 1


@pytest.mark.parametrize(
    ("flags", "env", "file"),
    [
        (["--resume", "--overwrite"], {}, ""),
        (["--overwrite"], {"FETCHER_RESUME": "true"}, ""),
        ([], {"FETCHER_OVERWRITE": "1"}, "resume: true\n"),
    ],
)
def test_resume_with_overwrite_is_a_usage_error(
    server: ServerThread,
    key: str,
    tmp_path: Path,
    flags: list[str],
    env: dict[str, str],
    file: str,
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": f"{server.url}/fail/{key}/200"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(file)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "kept"}\n')
    proc = fetcher("run", jobs, "-o", out, "-c", cfg, *flags, env=clean_env(**env))
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err, err
    assert out.read_text() == '{"id": "kept"}\n'
    assert server.count(key) == 0


@pytest.mark.parametrize("source", ["file", "env"])
def test_insecure_from_the_config_file_or_environment_warns(
    base_url: str, tmp_path: Path, config: Path, source: str
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": f"{base_url}/ok"}])
    env = clean_env(FETCHER_INSECURE="true") if source == "env" else None
    if source == "file":
        config.write_text(config.read_text() + "insecure: true\n")
    proc = fetcher("run", jobs, "-c", config, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"TLS certificate verification is OFF" in proc.stderr


def test_progress_from_the_environment_or_the_config_file(
    base_url: str, tmp_path: Path, config: Path
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": f"{base_url}/slow?delay=0.3"}])
    proc = fetcher("run", jobs, "-c", config, env=clean_env(FETCHER_PROGRESS="1"))
    assert b"job/s]" in proc.stderr  # the bar, though stderr is not a terminal
    config.write_text(config.read_text() + "progress: false\nprogress_interval: 0.05\n")
    proc = fetcher("run", jobs, "-c", config)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b" done, " not in proc.stderr  # no progress log lines either


def test_shard_from_the_config_file_or_environment(
    base_url: str, tmp_path: Path, config: Path
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl", [{"id": f"s{i}", "url": f"{base_url}/ok"} for i in range(6)]
    )
    proc = fetcher("run", jobs, "-c", config, env=clean_env(FETCHER_SHARD="0/3"))
    assert sorted(by_id(json_lines(proc.stdout))) == ["s0", "s3"]
    config.write_text(config.read_text() + "shard: 3\n")
    proc = fetcher("run", jobs, "-c", config, env=clean_env(JOB_COMPLETION_INDEX="2"))
    assert sorted(by_id(json_lines(proc.stdout))) == ["s2", "s5"]


def test_metrics_port_from_the_config_file(
    base_url: str, tmp_path: Path, config: Path, closed_port: int
) -> None:
    import urllib.request

    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": f"{base_url}/slow?delay=30"}])
    config.write_text(config.read_text() + f"metrics_port: {closed_port}\n")
    cmd = [sys.executable, "-m", "fetcher", "run", str(jobs), "-c", str(config)]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 15
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "no /healthz"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{closed_port}/healthz") as r:
                        assert r.status == 200
                        break
                except OSError:
                    time.sleep(0.05)  # not listening yet: nothing to wait on but the port
        finally:
            proc.kill()


def test_progress_lines_come_while_jobs_are_still_waiting(base_url: str, tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": f"{base_url}/hang"} for _ in range(3)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("progress_interval: 0.2\ntimeout: 1.5\nretries: 0\n")
    proc = fetcher("run", jobs, "-c", cfg)
    assert proc.returncode == 1, proc.stderr.decode()
    assert all(r["error"]["type"] == "timeout" for r in json_lines(proc.stdout))
    # Lines printed before the first job ended: each result used to be the only trigger.
    waiting = re.findall(
        rb"^fetcher: 0/3 done \(0\.0%\), 0 ok, 0 failed, 0 jobs/s, ETA --$", proc.stderr, re.M
    )
    assert len(waiting) >= 2, proc.stderr.decode()


def test_summary_has_counts_failures_by_type_rate_and_percentiles(
    base_url: str, tmp_path: Path, config: Path, closed_port: int
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"url": f"{base_url}/ok"},
            {"url": f"{base_url}/ok"},
            {"url": f"{base_url}/status/404"},
            {"url": f"http://127.0.0.1:{closed_port}/", "retries": 0},
            {"url": "gopher://x.test/"},
        ],
    )
    proc = fetcher("run", jobs, "-c", config)
    assert proc.returncode == 1
    (summary,) = proc.stderr.decode().splitlines()
    assert re.fullmatch(
        r"fetcher: 5 jobs in \d+\.\d\d s \(\d+ jobs/s\): 2 ok, 3 failed "
        r"\(connect 1, http_status 1, invalid_url 1\); "
        r"latency p50 \d+\.\d / p95 \d+\.\d / p99 \d+\.\d ms",
        summary,
    ), summary


# --- validate ----------------------------------------------------------------------------------


def test_validate_reports_bad_lines_and_touches_no_network(
    server: ServerThread, key: str, tmp_path: Path
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"id": "a", "url": f"{server.url}/fail/{key}/200"},
            b"{oops",
            {"id": "b", "url": "gopher://x.test/"},
            {"id": "a", "url": f"{server.url}/ok"},  # repeats line 1's id
            {"id": "c", "url": f"{server.url}/ok", "timeout": "1s"},
            {"url": f"{server.url}/ok", "headers": {"X": "${VALIDATE_UNSET_VAR}"}},
        ],
    )
    proc = fetcher("validate", jobs)
    assert proc.returncode == 2
    out = proc.stdout.decode()
    lines = out.splitlines()
    assert [line.split(":")[1] for line in lines] == ["2", "3", "4", "5", "6"], out
    assert "invalid_job" in lines[0] and "invalid_url" in lines[1]
    assert "repeats" in lines[2] and "timeout" in lines[3]
    assert "VALIDATE_UNSET_VAR" in lines[4]
    assert "6 jobs" in proc.stderr.decode()
    assert server.count(key) == 0


def test_validate_good_file_exits_0(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yml"
    jobs.write_text("- url: http://a.test/\n- url: https://b.test/x\n  method: HEAD\n")
    proc = fetcher("validate", jobs)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert proc.stdout == b""


def test_validate_reads_stdin(tmp_path: Path) -> None:
    proc = fetcher("validate", "-", stdin=b'{"url": "http://a.test/"}\n[]\n')
    assert proc.returncode == 2
    assert proc.stdout.decode().startswith("<stdin>:2:")


def test_validate_unreadable_file_exits_2(tmp_path: Path) -> None:
    proc = fetcher("validate", tmp_path / "missing.yaml")
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr.decode()


# --- bounded memory ----------------------------------------------------------------------------


def peak_rss_kb(args: list[str | Path], stderr_path: Path) -> tuple[int, int]:
    """(exit code, peak RSS in KiB) of one fetcher process, measured by wait4 for that child."""
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fetcher", *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=clean_env(),
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss


def write_big_job_file(path: Path, lines: int, base_url: str) -> None:
    # Jobs that need no network (their URLs are refused) plus a few real fetches, spread out.
    with path.open("wb") as f:
        for i in range(lines):
            if i % (lines // 5) == 0:
                f.write(b'{"id": "real-%d", "url": "%s/ok"}\n' % (i, base_url.encode()))
            else:
                f.write(b'{"id": "j%d", "url": "ftp://files.test/%d"}\n' % (i, i))


def test_memory_stays_flat_over_200000_jobs(base_url: str, tmp_path: Path, config: Path) -> None:
    peaks = {}
    for n in (2_000, 200_000):
        jobs = tmp_path / f"jobs-{n}.jsonl"
        write_big_job_file(jobs, n, base_url)
        out = tmp_path / f"out-{n}.jsonl"
        code, peaks[n] = peak_rss_kb(
            ["run", jobs, "-o", out, "-c", config, "--no-progress"], tmp_path / f"err-{n}"
        )
        assert code == 1, (tmp_path / f"err-{n}").read_text()
        with out.open("rb") as f:
            assert sum(1 for _ in f) == n  # every job has its line
    grown_mb = (peaks[200_000] - peaks[2_000]) / 1024
    assert grown_mb < 40, f"peak RSS grew {grown_mb:.1f} MB from 2,000 to 200,000 jobs ({peaks})"


# --- the README's examples ---------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["jobs.jsonl", "jobs.yaml"])
def test_examples_validate(name: str) -> None:
    proc = fetcher("validate", EXAMPLES / name)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


@pytest.fixture
def examples_server() -> Iterator[int]:
    """``python3 -m http.server`` serving examples/, as the quick start does, on a free port."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=EXAMPLES,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline().decode()
        match = re.search(r"port (\d+)", banner)
        assert match, banner
        yield int(match.group(1))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("name", ["jobs.jsonl", "jobs.yaml"])
def test_examples_run_as_the_quick_start_says(
    examples_server: int, tmp_path: Path, name: str
) -> None:
    jobs = tmp_path / name
    jobs.write_text((EXAMPLES / name).read_text().replace(":8000/", f":{examples_server}/"))
    proc = fetcher("run", jobs)
    assert proc.returncode == 1, proc.stderr.decode()  # `missing` is a 404
    results = by_id(json_lines(proc.stdout))
    assert results["missing"]["error"]["type"] == "http_status"
    assert results["missing"]["status"] == 404
    assert results["hello"]["body"] == (EXAMPLES / "hello.txt").read_text()
    assert results["data"]["body"] == orjson.loads((EXAMPLES / "data.json").read_bytes())
    assert all(r["ok"] for job_id, r in results.items() if job_id != "missing")


def test_worker_with_an_unusable_tls_file_exits_2_before_touching_redis(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with socket.socket() as listener:  # a Redis that would record any connection
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}"
        env = clean_env(FETCHER_TLS__CA_BUNDLE=str(bad))
        proc = fetcher("worker", "--redis", url, "--drain", env=env)
        assert proc.returncode == 2 and proc.stdout == b""
        err = proc.stderr.decode().strip()
        assert len(err.splitlines()) == 1 and "tls.ca_bundle" in err, err
        with pytest.raises(TimeoutError):
            listener.accept()
