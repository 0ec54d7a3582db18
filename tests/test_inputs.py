"""URL lists and CSV / TSV inputs, job_defaults, and the job count behind the progress total.

The readers are tested on files and pipes through JobSource; every format then runs end to end
as a user would run it: the `fetcher` command as a subprocess against the local fault server
(tests/app.py), and `fetcher enqueue` against a real redis-server.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pytest

from fetcher.errors import ConfigError, JobFileError
from fetcher.inputs import FirstLines, JobCount, count_json_lines
from fetcher.jobs import HttpJob, InvalidJob, JobParser
from fetcher.sources import Item, JobSource

from .app import ServerThread
from .test_e2e import EXAMPLES, by_id, clean_env, fetcher, json_lines


def read(path: Path | str, **options: Any) -> list[Item]:
    environ = options.pop("environ", {})
    return list(JobSource(str(path), JobParser(environ=environ), **options))


def summary(items: list[Item]) -> list[tuple[int, str, str]]:
    """(line, id, "ok" or the error type) for each item."""
    return [
        (item.line, item.id, item.type if isinstance(item, InvalidJob) else "ok") for item in items
    ]


def http(item: Item) -> HttpJob:
    assert isinstance(item, HttpJob), item
    return item


URL_LIST = (
    b"# a comment, then a blank line\r\n"
    b"\r\n"
    b"http://a.test/one\r\n"
    b"   http://a.test/two   \n"
    b"\t# an indented comment\n"
    b"not a url\n"
    b"ftp://a.test/x\n"
    b"http://a.test/\xff\n"
    b"http://a.test/last"  # no newline at the end
)


# -- URL lists ----------------------------------------------------------------------------------


def test_url_list_lines_are_get_jobs_numbered_by_line(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_bytes(URL_LIST)
    items = read(path)
    assert summary(items) == [
        (3, "3", "ok"),
        (4, "4", "ok"),
        (6, "6", "invalid_url"),
        (7, "7", "invalid_url"),
        (8, "8", "invalid_url"),
        (9, "9", "ok"),
    ]
    assert [http(items[i]).url for i in (0, 1, 5)] == [
        "http://a.test/one",
        "http://a.test/two",
        "http://a.test/last",
    ]
    assert http(items[0]).method == "GET"
    refused = items[2]
    assert isinstance(refused, InvalidJob)
    assert refused.to_result()["url"] == "not a url"
    assert isinstance(items[4], InvalidJob) and "UTF-8" in items[4].message


def test_url_list_by_input_format_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "list.gz"
    path.write_bytes(gzip.compress(URL_LIST))
    with pytest.raises(JobFileError, match="--input-format"):
        read(path)
    assert summary(read(path, input_format="urls")) == summary(
        read(_write(tmp_path / "urls.txt", URL_LIST))
    )
    gz = _write(tmp_path / "urls.txt.gz", gzip.compress(URL_LIST))
    assert summary(read(gz)) == summary(read(path, input_format="urls"))


def test_url_list_never_expands_references(tmp_path: Path) -> None:
    path = _write(tmp_path / "urls.txt", b"http://a.test/?q=${SECRET}\n")
    (item,) = read(path, environ={"SECRET": "s3cret"})
    assert "s3cret" not in http(item).url


# -- CSV / TSV ----------------------------------------------------------------------------------

CSV = (
    b"\xef\xbb\xbfid , url,note,score\r\n"
    b'a,http://a.test/1,"hello, ""world""\nsecond line",1\r\n'
    b"\r\n"
    b",http://a.test/2,plain,2\r\n"
    b"c,not a url,x,3\r\n"
    b"d,http://a.test/4\r\n"
    b"e,http://a.test/5,x,5,extra\r\n"
    b"f,http://a.test/${HOME},${HOME},6\r\n"
)


def test_csv_rows_are_jobs_with_ids_and_meta(tmp_path: Path) -> None:
    items = read(_write(tmp_path / "jobs.csv", CSV), environ={"HOME": "/root"})
    assert summary(items) == [
        (1, "a", "ok"),
        (2, "2", "ok"),  # an empty id: the row number
        (3, "c", "invalid_url"),
        (4, "d", "ok"),
        (5, "5", "invalid_url"),  # more fields than the header
        (6, "f", "ok"),
    ]
    first = http(items[0])
    assert first.url == "http://a.test/1"
    # Quoting as RFC 4180 says: a comma, doubled quotes and a newline inside one field.
    assert first.meta == {"note": 'hello, "world"\nsecond line', "score": "1"}
    assert http(items[3]).meta == {"note": "", "score": ""}  # a short row: empty cells
    assert isinstance(items[4], InvalidJob) and "5 fields, the header 4" in items[4].message
    # Cells are data: ${HOME} stays as written.
    assert http(items[5]).meta == {"note": "${HOME}", "score": "6"}


def test_csv_without_id_column_numbers_rows_after_the_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "jobs.csv", b"url\nhttp://a.test/1\n\nhttp://a.test/2\n")
    items = read(path)
    assert summary(items) == [(1, "1", "ok"), (2, "2", "ok")]
    assert http(items[0]).meta is None  # no other column, no meta


def test_tsv_and_url_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "jobs.tsv", b'link\tname\nhttp://a.test/1\t"a\tb"\n')
    with pytest.raises(JobFileError, match=r"no column 'url'.*'link', 'name'.*--url-column"):
        read(path)
    (item,) = read(path, url_column="link")
    assert http(item).url == "http://a.test/1"
    assert http(item).meta == {"name": "a\tb"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"url,url\nhttp://a.test/,x\n", "column 'url' appears twice"),
        (b"address\nhttp://a.test/\n", "no column 'url'"),
    ],
)
def test_unusable_header_is_a_job_file_error(tmp_path: Path, text: bytes, match: str) -> None:
    with pytest.raises(JobFileError, match=match):
        JobSource(str(_write(tmp_path / "jobs.csv", text)), JobParser())


def test_empty_csv_has_no_jobs(tmp_path: Path) -> None:
    assert read(_write(tmp_path / "jobs.csv", b"")) == []


def test_csv_field_too_large_is_one_bad_row(tmp_path: Path) -> None:
    from fetcher import inputs

    path = _write(
        tmp_path / "jobs.csv",
        b'url,note\nhttp://a.test/1,"' + b"x" * (inputs.MAX_FIELD_CHARS + 10) + b'"\n'
        b"http://a.test/2,ok\n",
    )
    assert [t for _, _, t in summary(read(path))] == ["invalid_url", "ok"]


@pytest.fixture
def stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[BinaryIO]:
    """Standard input replaced by a pipe; yields its write end (unbuffered), closed at the end."""
    r, w = os.pipe()
    stdin = io.TextIOWrapper(open(r, "rb"))  # noqa: SIM115 - closed below
    writer = open(w, "wb", buffering=0)  # noqa: SIM115 - closed below
    monkeypatch.setattr(sys, "stdin", stdin)
    try:
        yield writer
    finally:
        writer.close()
        stdin.close()


async def test_csv_rows_on_a_pipe_are_handed_over_as_they_arrive(stdin_pipe: BinaryIO) -> None:
    stdin_pipe.write(b"id,url\n")
    source = JobSource("-", JobParser(environ={}), input_format="csv")  # reads the header
    jobs = aiter(source)
    stdin_pipe.write(b'first,"http://a.test/1"\n')
    try:
        first = await asyncio.wait_for(anext(jobs), 5)  # not once 2048 rows or EOF have come
    except TimeoutError:
        stdin_pipe.close()
        raise
    assert (first.line, first.id) == (1, "first")
    stdin_pipe.write(b'second,"http://a.test/\n')  # a quoted field open across two writes
    stdin_pipe.write(b'2"\n')
    second = await asyncio.wait_for(anext(jobs), 5)
    assert (second.line, second.id) == (2, "second")
    stdin_pipe.close()
    assert [item async for item in jobs] == []


# -- job_defaults -------------------------------------------------------------------------------

DEFAULTS = {"headers": {"X-A": "a", "Authorization": "Bearer ${TOKEN}"}, "timeout": 5}


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("urls.txt", b"http://a.test/1\n"),
        ("jobs.csv", b"url\nhttp://a.test/1\n"),
        ("jobs.jsonl", b'{"url": "http://a.test/1", "headers": {"X-B": "b"}}\n'),
        ("jobs.yaml", b"defaults: {timeout: 7}\njobs:\n  - {url: 'http://a.test/1'}\n"),
    ],
)
def test_job_defaults_apply_to_every_format(tmp_path: Path, name: str, text: bytes) -> None:
    (item,) = read(_write(tmp_path / name, text), defaults=DEFAULTS, environ={"TOKEN": "t"})
    job = http(item)
    assert job.headers["X-A"] == "a"
    assert job.headers["Authorization"] == "Bearer t"
    if name.endswith(".jsonl"):
        assert job.headers["X-B"] == "b"  # merged one level deep
    assert job.timeout == (7 if name.endswith(".yaml") else 5)  # the file's defaults win


@pytest.mark.parametrize(
    ("defaults", "match"),
    [
        ({"bdy": "text"}, "unknown job field 'bdy'"),
        ({"id": "x"}, "every job has its own id"),
        ({"headers": {"A": "${NOT_SET_ANYWHERE}"}}, "NOT_SET_ANYWHERE is not set"),
    ],
)
def test_unusable_job_defaults_are_a_config_error(
    tmp_path: Path, defaults: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        read(_write(tmp_path / "urls.txt", b"http://a.test/\n"), defaults=defaults)


# -- counting and ids ---------------------------------------------------------------------------


def settled(count: JobCount) -> tuple[int | None, bool]:
    assert count.wait(10), "the count never ended"
    return count.get()


def test_job_count_of_each_format(tmp_path: Path) -> None:
    urls = _write(tmp_path / "urls.txt", URL_LIST)
    assert settled(JobCount(str(urls), "urls")) == (6, True)
    csv = _write(tmp_path / "jobs.csv", CSV)
    assert settled(JobCount(str(csv), "csv")) == (6, True)
    lines = b"".join(b'{"url": "http://a.test/%d"}\n\n' % i for i in range(10))
    jsonl = _write(tmp_path / "jobs.jsonl", lines)
    assert settled(JobCount(str(jsonl), "jsonl")) == (10, True)
    # Line numbers 1, 3, 5...: a shard of every other line holds them all, the other none.
    assert settled(JobCount(str(jsonl), "jsonl", select=lambda n: n % 2 == 1)) == (10, True)
    assert settled(JobCount(str(jsonl), "jsonl", select=lambda n: n % 2 == 0)) == (0, True)
    assert JobCount("-", "jsonl").get() == (None, False)


def test_counted_json_lines_are_the_lines_that_are_not_blank() -> None:
    # Every mix of blank, white-space-only (\r, \v, \f, tab), BOM and job lines, with and
    # without a newline at the end: the count is the lines a source turns into jobs.
    pieces = [b'{"a": 1}', b"", b" ", b"\t", b"\r", b"\x0b\x0c", b" x", b"\xef\xbb\xbf{}", b"#"]
    chunks = [b""]
    for first in pieces:
        for second in pieces:
            for third in pieces[:4]:
                for end in (b"", b"\n", b"\r\n"):
                    chunks.append(b"\n".join((first, second, third)) + end)
                    chunks.append(first + end)
    for chunk in chunks:
        expected = sum(1 for line in chunk.split(b"\n") if line.strip())
        assert count_json_lines(chunk) == expected, chunk


def test_a_job_file_that_is_a_named_pipe_is_read_once(tmp_path: Path, base_url: str) -> None:
    # The count behind the progress total reads a file a second time: a pipe it must leave
    # alone, or the lines it takes never run.
    fifo = tmp_path / "jobs.jsonl"
    os.mkfifo(fifo)
    lines = b"".join(
        orjson.dumps({"id": str(i), "url": f"{base_url}/ok"}) + b"\n" for i in range(200)
    )
    with subprocess.Popen(
        [sys.executable, "-m", "fetcher", "run", str(fifo), "-o", "-", "--progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    ) as proc:
        with open(fifo, "wb", buffering=0) as writer:
            # A producer that writes as it goes (a pause is the point here): by the later
            # writes, anything else reading the pipe would be waiting for them too.
            for part in range(0, len(lines), len(lines) // 4):
                writer.write(lines[part : part + len(lines) // 4])
                time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert sorted(int(r["id"]) for r in json_lines(out)) == list(range(200))
    assert JobCount(str(fifo), "jsonl").get() == (None, False)


def test_job_count_of_a_big_gzip_is_an_estimate(tmp_path: Path, monkeypatch: Any) -> None:
    from fetcher import inputs

    monkeypatch.setattr(inputs, "GZIP_SAMPLE_BYTES", 64 * 1024)
    lines = b"".join(b"http://a.test/%d\n" % (i * 7919 % 100_000) for i in range(100_000))
    path = _write(tmp_path / "urls.txt.gz", gzip.compress(lines))
    value, exact = settled(JobCount(str(path), "urls"))
    assert not exact and value is not None
    assert 50_000 < value < 200_000  # from the ratio of a 64 KiB sample
    head = lines[: lines.index(b"\n", 1000) + 1]
    small = _write(tmp_path / "small.txt.gz", gzip.compress(head))
    assert settled(JobCount(str(small), "urls")) == (head.count(b"\n"), True)


def test_first_lines_remembers_where_each_id_came_first() -> None:
    seen = FirstLines(capacity=4)
    firsts = [seen.first(f"id-{i % 3000}", i) for i in range(1, 6001)]
    assert firsts[:3000] == list(range(1, 3001))
    assert firsts[3000:] == list(range(1, 3001))
    assert len(seen) == 3000


# -- end to end: the fetcher command on each format ---------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """Fast retries and a short deadline."""
    path = tmp_path / "fast.yaml"
    path.write_text("backoff_base: 0.01\nbackoff_max: 0.05\ntimeout: 5\n")
    return path


@pytest.fixture
def url_list(base_url: str) -> bytes:
    return (
        f"# three jobs\n{base_url}/ok\r\n\n{base_url}/status/404\nnot a url\n{base_url}/ok?x=1\n"
    ).encode()


def check_url_list_results(results: list[dict[str, Any]]) -> None:
    got = by_id(results)
    assert set(got) == {"2", "4", "5", "6"}
    assert got["2"]["ok"] and got["2"]["status"] == 200
    assert got["4"]["error"]["type"] == "http_status"
    assert got["5"]["error"]["type"] == "invalid_url" and got["5"]["line"] == 5
    assert got["6"]["ok"]


@pytest.mark.parametrize("name", ["urls.txt", "urls.txt.gz"])
def test_run_a_url_list(tmp_path: Path, url_list: bytes, name: str) -> None:
    data = gzip.compress(url_list) if name.endswith(".gz") else url_list
    proc = fetcher("run", _write(tmp_path / name, data))
    assert proc.returncode == 1, proc.stderr.decode()
    check_url_list_results(json_lines(proc.stdout))


def test_run_a_url_list_on_stdin(url_list: bytes) -> None:
    proc = fetcher("run", "-", "--input-format", "urls", stdin=url_list)
    assert proc.returncode == 1, proc.stderr.decode()
    check_url_list_results(json_lines(proc.stdout))


def csv_text(base_url: str, sep: str = ",") -> bytes:
    rows = [
        ["id", "url", "note"],
        ["home", f"{base_url}/ok", '"a, b"' if sep == "," else "a, b"],
        ["", f"{base_url}/status/500", "second"],
        ["bad", "http://", "third"],
    ]
    return ("\ufeff" + "".join(sep.join(r) + "\r\n" for r in rows)).encode()


def check_csv_results(results: list[dict[str, Any]]) -> None:
    got = by_id(results)
    assert set(got) == {"home", "2", "bad"}
    assert got["home"]["ok"] and got["home"]["meta"] == {"note": "a, b"}
    assert got["2"]["status"] == 500 and got["2"]["meta"] == {"note": "second"}
    assert got["bad"]["error"]["type"] == "invalid_url" and got["bad"]["line"] == 3


@pytest.mark.parametrize("name", ["jobs.csv", "jobs.tsv", "jobs.csv.gz"])
def test_run_csv_and_tsv(tmp_path: Path, base_url: str, config: Path, name: str) -> None:
    data = csv_text(base_url, "\t" if ".tsv" in name else ",")
    path = _write(tmp_path / name, gzip.compress(data) if name.endswith(".gz") else data)
    proc = fetcher("run", path, "-c", config, "--retries", "0")
    assert proc.returncode == 1, proc.stderr.decode()
    check_csv_results(json_lines(proc.stdout))


def test_run_csv_on_stdin(base_url: str, config: Path) -> None:
    proc = fetcher(
        "run", "-", "--input-format", "csv", "-c", config, "--retries", "0",
        stdin=csv_text(base_url),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr.decode()
    check_csv_results(json_lines(proc.stdout))


def test_missing_url_column_exits_2_before_any_request(
    tmp_path: Path, server: ServerThread, base_url: str, key: str
) -> None:
    path = _write(tmp_path / "jobs.csv", f"id,link\na,{base_url}/fail/{key}/200\n".encode())
    out = tmp_path / "out.jsonl"
    proc = fetcher("run", path, "-o", out)
    assert proc.returncode == 2
    (line,) = proc.stderr.decode().splitlines()
    assert f"{path}" in line and "no column 'url'" in line and "--url-column" in line
    assert not out.exists() and server.count(key) == 0
    ok = fetcher("run", path, "-o", out, "--url-column", "link")
    assert ok.returncode == 0, ok.stderr.decode()
    assert server.count(key) == 1


def test_job_defaults_reach_the_server(tmp_path: Path, base_url: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "job_defaults:\n  body: json\n  headers: {X-Batch: nightly, X-Token: '${BATCH_TOKEN}'}\n"
    )
    path = _write(tmp_path / "urls.txt", f"{base_url}/echo\n".encode())
    proc = fetcher("run", path, "-c", config, env=clean_env(BATCH_TOKEN="t0k"))
    assert proc.returncode == 0, proc.stderr.decode()
    (result,) = json_lines(proc.stdout)
    sent = {k.lower(): v for k, v in result["body"]["headers"].items()}
    assert sent["x-batch"] == "nightly" and sent["x-token"] == "t0k"


def test_validate_new_formats(tmp_path: Path, url_list: bytes, base_url: str) -> None:
    txt = _write(tmp_path / "urls.txt", url_list)
    proc = fetcher("validate", txt)
    assert proc.returncode == 2
    assert proc.stdout.decode().splitlines() == [
        f"{txt}:5: invalid_url: URL contains control characters or spaces"
    ]
    assert "4 jobs, 1 invalid" in proc.stderr.decode()
    csv = _write(tmp_path / "jobs.csv", b"id,url\na,http://a.test/\na,http://a.test/2\n")
    proc = fetcher("validate", csv)
    assert proc.returncode == 2
    assert proc.stdout.decode() == f"{csv}:2: invalid_job: id 'a' repeats line 1\n"
    good = fetcher(
        "validate", "-", "--input-format", "tsv", stdin=b"url\thost\nhttp://a.test/\tx\n"
    )
    assert good.returncode == 0, good.stderr.decode()
    assert "1 jobs, 0 invalid" in good.stderr.decode()


def test_processes_and_shards_read_the_new_formats(tmp_path: Path, base_url: str) -> None:
    rows = "".join(f"r{i},{base_url}/ok?n={i}\n" for i in range(1, 41))
    path = _write(tmp_path / "jobs.csv", f"id,url\n{rows}".encode())
    out = tmp_path / "out.jsonl"
    proc = fetcher("run", path, "-o", out, "--processes", "2")
    assert proc.returncode == 0, proc.stderr.decode()
    assert set(by_id(json_lines(out.read_bytes()))) == {f"r{i}" for i in range(1, 41)}
    txt = _write(
        tmp_path / "urls.txt", "".join(f"{base_url}/ok?n={i}\n" for i in range(9)).encode()
    )
    shards = []
    for k in range(3):
        shard = fetcher("run", txt, "--shard", f"{k}/3")
        assert shard.returncode == 0, shard.stderr.decode()
        shards.append(sorted(int(r["id"]) for r in json_lines(shard.stdout)))
    assert shards == [[1, 4, 7], [2, 5, 8], [3, 6, 9]]


def test_enqueue_new_formats(tmp_path: Path) -> None:
    from .redis_peer import redis_peer

    config = tmp_path / "c.yaml"
    config.write_text("job_defaults: {timeout: 5, headers: {Authorization: 'Bearer ${TOK}'}}\n")
    csv = _write(tmp_path / "jobs.csv", b"id,url,team\na,http://127.0.0.1:9/a,x\nb,nope,y\n")
    txt = _write(tmp_path / "urls.txt", b"# list\nhttp://127.0.0.1:9/1\n")
    env = {**clean_env(TOK="s3cret")}
    with redis_peer(tmp_path) as rds:

        def enqueue(path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
            cmd = ["enqueue", str(path), "--redis", rds.url, "-c", str(config), *args]
            return fetcher(*cmd, env=env)

        res = enqueue(csv)
        assert res.returncode == 1, res.stderr
        assert f"{csv}:2: invalid_url" in res.stderr.decode()
        assert enqueue(txt, "--stream", "list").returncode == 0
        stdin = subprocess.run(
            [sys.executable, "-m", "fetcher", "enqueue", "-", "--redis", rds.url,
             "--input-format", "urls", "--stream", "piped"],
            input=b"http://127.0.0.1:9/p\n", capture_output=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert stdin.returncode == 0, stdin.stderr
        client = rds.client()
        stored = [orjson.loads(f[b"job"]) for _, f in client.xrange("fetcher:jobs")]
        listed = [orjson.loads(f[b"job"]) for _, f in client.xrange("list")]
        piped = [orjson.loads(f[b"job"]) for _, f in client.xrange("piped")]
    auth = {"Authorization": "Bearer ${TOK}"}  # the secret stays in each worker's environment
    assert stored == [
        {"id": "a", "url": "http://127.0.0.1:9/a", "meta": {"team": "x"}, "timeout": 5,
         "headers": auth},
    ]  # fmt: skip
    assert listed == [{"id": "2", "url": "http://127.0.0.1:9/1", "timeout": 5, "headers": auth}]
    assert piped == [{"id": "1", "url": "http://127.0.0.1:9/p"}]


# -- the examples the quick start begins with ---------------------------------------------------


@pytest.fixture(scope="module")
def examples_port() -> Iterator[int]:
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
        port = banner.split(" port ")[1].split()[0]
        yield int(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("name", ["urls.txt", "urls.csv"])
def test_url_list_examples_run_as_the_quick_start_says(
    examples_port: int, tmp_path: Path, name: str
) -> None:
    assert fetcher("validate", EXAMPLES / name).returncode == 0
    jobs = tmp_path / name
    jobs.write_text((EXAMPLES / name).read_text().replace(":8000/", f":{examples_port}/"))
    proc = fetcher("run", jobs)
    assert proc.returncode == 1, proc.stderr.decode()  # missing.html is a 404
    results = json_lines(proc.stdout)
    assert len(results) == (4 if name == "urls.txt" else 3)
    failed = [r for r in results if not r["ok"]]
    assert [r["url"].rsplit("/", 1)[1] for r in failed] == ["missing.html"]
    assert failed[0]["status"] == 404
    if name == "urls.csv":
        assert by_id(results)["hello"]["meta"] == {"owner": "docs", "note": "a note, with a comma"}


def test_truncated_gzip_csv_stops_the_read_with_the_reason(tmp_path: Path) -> None:
    rows = b"url\n" + b"".join(b"http://a.test/%d\n" % i for i in range(10_000))
    path = _write(tmp_path / "jobs.csv.gz", gzip.compress(rows)[:-2000])
    with pytest.raises(JobFileError, match=r"cannot read job file .*jobs\.csv\.gz"):
        read(path)
