"""Reruns: --retry-failed, fetcher merge, --since (conditional requests), and the fast reading
of a results file they and --resume share (resume.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from fetcher import resume
from fetcher.resume import IdIndex, done_job_lines, prepare_resume, read_done, records

from .app import ServerThread
from .peers.base import AppThread
from .test_e2e import by_id, fetcher, json_lines, write_jsonl

# --- --retry-failed and merge ------------------------------------------------------------------


def test_retry_failed_runs_only_what_had_no_ok_line(
    server: ServerThread, key: str, tmp_path: Path
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"id": "good", "url": f"{server.url}/fail/{key}-good/200"},
            {"id": "bad", "url": f"{server.url}/fail/{key}-bad/503"},
            {"id": "never", "url": f"{server.url}/fail/{key}-never/200"},
        ],
    )
    prev = tmp_path / "prev.jsonl"
    prev.write_bytes(
        b'{"id":"good","kind":"http","ok":true}\n'
        b'{"id":"bad","kind":"http","ok":false}\n'
        b'{"id":"never","kind":"http","ok":tr'  # torn: not an ok line
    )
    out = tmp_path / "retry.jsonl"
    proc = fetcher("run", jobs, "--retry-failed", prev, "-o", out, "--retries", "0")
    assert proc.returncode == 1, proc.stderr.decode()
    assert sorted(r["id"] for r in json_lines(out.read_bytes())) == ["bad", "never"]
    assert server.count(f"{key}-good") == 0
    assert prev.read_bytes().endswith(b'"ok":tr')  # PREV is read, never changed


def test_retry_failed_with_a_missing_prev_exits_2(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"url": "http://127.0.0.1:9/"}])
    proc = fetcher("run", jobs, "--retry-failed", tmp_path / "nope.jsonl")
    assert proc.returncode == 2
    assert "nope.jsonl" in proc.stderr.decode() and proc.stdout == b""


def test_run_retry_merge_gives_one_line_per_id_the_retry_winning(
    server: ServerThread, key: str, tmp_path: Path
) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"id": "a", "url": f"{server.url}/ok"},
            {"id": "b", "url": f"{server.url}/flaky/{key}/2"},  # 429 first, then 200
            {"id": "c", "url": f"{server.url}/ok"},
        ],
    )
    first, retry, final = (tmp_path / n for n in ("first.jsonl", "retry.jsonl", "final.jsonl"))
    assert fetcher("run", jobs, "-o", first, "--retries", "0").returncode == 1
    assert fetcher("run", jobs, "--retry-failed", first, "-o", retry).returncode == 0
    with first.open("ab") as f:
        f.write(b'{"id":"z","ok":tru')  # a torn last line is ignored
    proc = fetcher("merge", first, retry, "-o", final)
    assert proc.returncode == 0, proc.stderr.decode()
    merged = json_lines(final.read_bytes())
    results = by_id(merged)  # one line per id
    assert set(results) == {"a", "b", "c"}
    assert results["b"]["ok"] is True and results["b"]["status"] == 200
    assert [r["id"] for r in merged] == [r["id"] for r in json_lines(first.read_bytes()[:-18])]
    # An existing OUT is not clobbered; OUT may not be an input.
    assert fetcher("merge", first, retry, "-o", final).returncode == 2
    assert fetcher("merge", first, retry, "-o", retry, "--overwrite").returncode == 2


def test_merge_of_csv_files_and_to_stdout(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_bytes(b'id,ok,body\r\nx,false,"two\r\nlines"\r\ny,true,\r\nw,false,"torn')
    b.write_bytes(b"id,ok,body\r\nx,true,fixed\r\n")
    proc = fetcher("merge", a, b)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"id,ok,body\r\nx,true,fixed\r\ny,true,\r\n"


def test_merge_refuses_mixed_formats(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.jsonl"
    a.write_bytes(b"id,ok\r\nx,true\r\n")
    b.write_bytes(b'{"id":"x","ok":true}\n')
    proc = fetcher("merge", a, b)
    assert proc.returncode == 2 and "mix" in proc.stderr.decode()


# --- --since against a server with validators ---------------------------------------------------


class StaticServer(AppThread):
    """aiohttp's static files (ETag, Last-Modified, 304 on a match) on 127.0.0.1, recording
    the conditional headers of every request."""

    def __init__(self, root: Path) -> None:
        super().__init__("static", shutdown_timeout=1)
        self.root = root
        self.seen: list[dict[str, str]] = []

    def make_app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.seen.append(
                {k: v for k, v in request.headers.items() if k.lower().startswith("if-")}
            )
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[record])
        app.add_routes([web.static("/", self.root)])
        return app


@pytest.fixture
def static(tmp_path: Path) -> Iterator[StaticServer]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "same.txt").write_text("unchanged body\n")
    (root / "changes.txt").write_text("version 1\n")
    with StaticServer(root) as srv:
        yield srv


def test_since_revalidates_and_a_304_carries_prev_fields(
    static: StaticServer, tmp_path: Path, result_validator: Any
) -> None:
    url = f"http://127.0.0.1:{static.port}"
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"id": "same", "url": f"{url}/same.txt"},
            {"id": "changes", "url": f"{url}/changes.txt"},
            {"id": "post", "url": f"{url}/same.txt", "method": "POST"},
            {"id": "new", "url": f"{url}/same.txt"},
        ],
    )
    prev, now = tmp_path / "prev.jsonl", tmp_path / "now.jsonl"
    assert fetcher("run", jobs, "-o", prev).returncode == 1  # POST to a static file: 405
    before = by_id(json_lines(prev.read_bytes()))
    assert before["same"]["headers"]["etag"] and before["same"]["headers"]["last-modified"]
    # "new" has no line in PREV: it is fetched as usual.
    prev.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in before.values() if r["id"] != "new"))
    (static.root / "changes.txt").write_text("version 2, longer\n")
    os.utime(static.root / "changes.txt", (1e9, 2e9))
    static.seen.clear()

    proc = fetcher("run", jobs, "-o", now, "--since", prev)
    assert proc.returncode == 1, proc.stderr.decode()
    after = by_id(json_lines(now.read_bytes()))
    for line in after.values():
        result_validator.validate(line)
    same = after["same"]
    assert same["ok"] is True and same["status"] == 304 and same["not_modified"] is True
    assert same["bytes"] == before["same"]["bytes"] == len("unchanged body\n")
    assert same["sha256"] == before["same"]["sha256"]
    changed = after["changes"]
    assert changed["status"] == 200 and "not_modified" not in changed
    assert changed["bytes"] == len("version 2, longer\n")
    assert after["new"]["status"] == 200 and "not_modified" not in after["new"]
    conditional = [h for h in static.seen if h]
    assert len(conditional) == 2  # same and changes: GET jobs with an ok line in PREV
    assert all("If-None-Match" in h and "If-Modified-Since" in h for h in conditional)


def test_since_works_from_a_csv_prev_with_headers(static: StaticServer, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{static.port}"
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "same", "url": f"{url}/same.txt"}])
    prev = tmp_path / "prev.csv"
    fields = "ok,status,headers,bytes,sha256"
    assert fetcher("run", jobs, "-o", prev, "--fields", fields).returncode == 0
    proc = fetcher("run", jobs, "--since", prev, "--fields", "status,not_modified,bytes")
    assert proc.returncode == 0, proc.stderr.decode()
    [line] = json_lines(proc.stdout)
    assert line == {"id": "same", "status": 304, "not_modified": True, "bytes": 15}


# --- reading a results file fast ---------------------------------------------------------------


def _line(job_id: str, ok: bool = True) -> bytes:
    return orjson.dumps({"id": job_id, "kind": "http", "ok": ok, "status": 200}) + b"\n"


def test_the_fast_index_reads_odd_lines_too(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(
        _line("plain")
        + b'{"id": "spaced", "ok": true}\n'  # another writer's spacing
        + b'{"ok": true, "id": "late"}\n'  # id not first
        + b'{"id":"esc\\"aped","ok":true}\n'  # an escaped quote in the id
        + b'{"id":"caf\xc3\xa9","ok":false}\n'
        + b"\n"  # blank
        + b"not json at all\n"
        + b'{"id":""}\n'  # an empty id is still an id
        + b'{"id":7}\n'  # not a string: not a result line
        + _line("torn")[:-9]  # cut mid-line: no result
    )
    done = read_done(str(path))
    for job_id in ("plain", "spaced", "late", 'esc"aped', "café", ""):
        assert job_id in done, job_id
    assert "torn" not in done and "7" not in done and len(done) == 6
    ok = read_done(str(path), ok_only=True)
    assert "plain" in ok and "late" in ok and "café" not in ok


def test_blocks_split_anywhere_give_the_same_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    lines = [_line(f"id-{i}", ok=i % 3 != 0) for i in range(500)]
    lines[250] = b'{"ok":true,"id":"odd"}\n'
    path.write_bytes(b"".join(lines))
    monkeypatch.setattr(resume, "BLOCK_BYTES", 97)  # smaller than a line: blocks grow
    done, ok = read_done(str(path)), read_done(str(path), ok_only=True)
    assert len(done) == 500 and "odd" in done and "id-499" in done
    assert len(ok) == 333 and "id-3" not in ok and "id-4" in ok and "odd" in ok
    found = [(i, o) for i, o, _, _ in records(str(path))]
    assert found[250] == (b"odd", True) and len(found) == 500
    for job_id, _, offset, length in records(str(path)):
        with path.open("rb") as f:
            f.seek(offset)
            assert orjson.loads(f.read(length))["id"] == job_id.decode()


def test_prepare_resume_cuts_the_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(_line("a") + _line("b")[:10])
    done = prepare_resume(str(path))
    assert "a" in done and "b" not in done
    assert path.read_bytes() == _line("a")


def test_done_job_lines_marks_only_lines_it_is_sure_of(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(
        b'{"id": "a", "url": "http://x/"}\n'  # 1: done
        b'{"url": "http://x/", "id": "b"}\n'  # 2: done, but id not first: decoded as usual
        b"\n"  # 3
        b'{"id":"c","url":"http://x/"}\n'  # 4: not done
        b'{"id": "d", "url": "http://x/"}'  # 5: done, no newline at the end
    )
    done = IdIndex()
    for job_id in (b"a", b"b", b"d"):
        done.add(job_id)
    bits, nothing_left = done_job_lines(str(jobs), done)
    marked = [n for n in range(1, 6) if bits[n >> 3] >> (n & 7) & 1]
    assert marked == [1] and nothing_left is False
    jobs.write_bytes(b'{"id": "a"}\n{"id": "b"}\n')
    assert done_job_lines(str(jobs), done)[1] is True


def test_index_grows_and_keeps_the_last_value() -> None:
    index = IdIndex(values=True)
    for i in range(5000):
        index.add(b"k%d" % i, i)
    index.add(b"k7", 99)
    assert len(index) == 5000 and index.value("k7") == 99 and index.value("nope") is None
    assert all(f"k{i}" in index for i in range(5000))
