"""Job sources: JSONL (plain, .gz, stdin) and YAML, with line numbers and defaults merging."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pytest

from fetcher import sources
from fetcher.errors import JobFileError
from fetcher.jobs import HttpJob, InvalidJob, JobParser
from fetcher.sources import Item, JobSource, job_format, merge_defaults


def read(path: Path | str, **env: str) -> list[Item]:
    return list(JobSource(str(path), JobParser(environ=env)))


async def read_async(path: Path | str) -> list[Item]:
    return [item async for item in JobSource(str(path), JobParser(environ={}))]


def summary(items: list[Item]) -> list[tuple[int, str, str]]:
    """(line, id, "ok" or the error type) for each item."""
    return [
        (item.line, item.id, item.type if isinstance(item, InvalidJob) else "ok") for item in items
    ]


MIXED_JSONL = b"""{"id": "a", "url": "http://a.test/"}
{"url": "http://b.test/"}

{not json
[1, 2]
{"id": "bad-type", "url": "http://c.test/", "timeout": "slow"}
   \t
{"url": "gopher://d.test/"}
{"id": 7, "url": "http://e.test/"}
{"url": "http://f.test/"}"""


def test_jsonl_mixed_lines_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(MIXED_JSONL)
    assert summary(read(path)) == [
        (1, "a", "ok"),
        (2, "2", "ok"),  # no id: its line
        (4, "4", "invalid_job"),  # line 3 is blank: skipped but counted
        (5, "5", "invalid_job"),
        (6, "bad-type", "invalid_job"),
        (8, "8", "invalid_url"),  # line 7 holds only whitespace
        (9, "9", "invalid_job"),
        (10, "10", "ok"),  # the last line has no newline
    ]


def test_invalid_json_message_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "jobs.ndjson"
    path.write_bytes(b'{"url": "http://a.test/",\n')
    (bad,) = read(path)
    assert isinstance(bad, InvalidJob)
    assert bad.message.startswith("not valid JSON") and "\n" not in bad.message


async def test_async_reading_matches_sync_reading(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(MIXED_JSONL)
    assert summary(await read_async(path)) == summary(read(path))


async def test_many_lines_cross_batches_in_order(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    n = sources.BATCH_LINES * 2 + 5
    path.write_bytes(b"".join(b'{"url": "http://a.test/%d"}\n' % i for i in range(n)))
    items = await read_async(path)
    assert [item.line for item in items] == list(range(1, n + 1))
    assert [item.id for item in items] == [str(i) for i in range(1, n + 1)]


def test_crlf_line_endings_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"url": "http://a.test/"}\r\n{"url": "http://b.test/"}\r\n')
    assert summary(read(path)) == [(1, "1", "ok"), (2, "2", "ok")]


def test_bad_utf8_and_deep_nesting_are_invalid_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    deep = b'{"url": "http://a.test/", "json": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    path.write_bytes(b'{"url": "http://a.test/\xff"}\n' + deep + b'\n{"url": "http://ok.test/"}\n')
    assert summary(read(path)) == [(1, "1", "invalid_job"), (2, "2", "invalid_job"), (3, "3", "ok")]


def test_overlong_line_is_refused_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 100)
    path = tmp_path / "jobs.jsonl"
    long_line = orjson.dumps({"url": "http://a.test/", "data": "x" * 5000})
    path.write_bytes(b'{"url": "http://a.test/"}\n' + long_line + b'\n{"url": "http://b.test/"}\n')
    items = read(path)
    assert summary(items) == [(1, "1", "ok"), (2, "2", "invalid_job"), (3, "3", "ok")]
    assert isinstance(items[1], InvalidJob) and "longer than 100 bytes" in items[1].message


def test_gzip_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl.gz"
    path.write_bytes(gzip.compress(MIXED_JSONL))
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(MIXED_JSONL)
    assert summary(read(path)) == summary(read(plain))


def test_gzip_yaml(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yml.gz"
    path.write_bytes(gzip.compress(b"- url: http://a.test/\n- url: http://b.test/\n"))
    assert summary(read(path)) == [(1, "1", "ok"), (2, "2", "ok")]


def test_file_that_is_not_gzip_fails_at_open(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl.gz"
    path.write_bytes(b'{"url": "http://a.test/"}\n')
    with pytest.raises(JobFileError, match=r"jobs\.jsonl\.gz"):
        JobSource(str(path), JobParser())


def truncated_gzip(path: Path, lines: int) -> Path:
    data = b"".join(b'{"url": "http://a.test/%d"}\n' % i for i in range(lines))
    packed = gzip.compress(data)
    path.write_bytes(packed[: len(packed) // 2])
    return path


def test_truncated_gzip_is_job_file_error_not_a_short_run(tmp_path: Path) -> None:
    path = truncated_gzip(tmp_path / "jobs.jsonl.gz", 50_000)
    with pytest.raises(JobFileError, match="ended before"):
        read(path)


async def test_truncated_gzip_fails_the_async_reader_too(tmp_path: Path) -> None:
    path = truncated_gzip(tmp_path / "jobs.jsonl.gz", 50_000)
    with pytest.raises(JobFileError, match=r"cannot read job file .*jobs\.jsonl\.gz"):
        await read_async(path)


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


async def test_a_pipe_hands_over_lines_as_they_arrive(stdin_pipe: BinaryIO) -> None:
    jobs = aiter(JobSource("-", JobParser(environ={})))
    stdin_pipe.write(b'{"id": "first", "url": "http://a.test/"}\n')
    try:
        first = await asyncio.wait_for(anext(jobs), 5)  # not once 2048 lines or EOF have come
    except TimeoutError:
        stdin_pipe.close()  # frees a reader blocked on a whole batch: the test fails, not hangs
        raise
    assert (first.line, first.id) == (1, "first")
    stdin_pipe.write(b'\n{"url": "http://b.test/"}\n')
    second = await asyncio.wait_for(anext(jobs), 5)
    assert (second.line, second.id) == (3, "3")
    stdin_pipe.close()
    assert [item async for item in jobs] == []


def write_in_pieces(f: BinaryIO, data: bytes, size: int) -> threading.Thread:
    """Writes ``data`` to ``f`` ``size`` bytes at a time from a thread, then closes ``f``."""

    def run() -> None:
        with f:
            for start in range(0, len(data), size):
                f.write(data[start : start + size])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("piece", [1, 7, 100, 65536])
async def test_a_pipe_reads_like_a_file_whatever_the_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdin_pipe: BinaryIO, piece: int
) -> None:
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 100)
    long_line = orjson.dumps({"url": "http://a.test/", "data": "x" * 500})
    edge = orjson.dumps({"url": "http://a.test/", "data": "y" * 60})  # exactly at the limit
    edge += b" " * (100 - len(edge))
    data = b"\xef\xbb\xbf" + MIXED_JSONL.replace(b"\n", b"\r\n", 1) + b"\n"
    data += b"\n".join([long_line, edge, edge + b" ", b"", long_line])  # ends without a newline
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(data)
    writer = write_in_pieces(stdin_pipe, data, piece)
    from_pipe = await read_async("-")
    writer.join()
    assert summary(from_pipe) == summary(read(path))
    assert summary(from_pipe)[-4:] == [
        (11, "11", "invalid_job"),
        (12, "12", "ok"),
        (13, "13", "invalid_job"),
        (15, "15", "invalid_job"),
    ]


def test_stdin_is_jsonl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MIXED_JSONL)))
    items = read("-")
    assert [item.line for item in items] == [1, 2, 4, 5, 6, 8, 9, 10]
    assert isinstance(items[0], HttpJob)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.yaml", "yaml"),
        ("a.yml", "yaml"),
        ("a.jsonl.gz", "jsonl"),
        ("a.yaml.gz", "yaml"),
        ("a.txt", "urls"),
        ("a.csv", "csv"),
        ("a.tsv.gz", "tsv"),
        ("-", "jsonl"),
    ],
)
def test_format_from_the_name(name: str, fmt: str) -> None:
    assert job_format(name) == fmt


@pytest.mark.parametrize("name", ["jobs.json", "jobs.list", "jobs", "jobs.gz", "jobs.txt.bz2"])
def test_unknown_suffix_is_refused(name: str) -> None:
    with pytest.raises(JobFileError, match=r"\.jsonl"):
        job_format(name)


def test_missing_file_is_job_file_error(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="No such file"):
        JobSource(str(tmp_path / "nope.jsonl"), JobParser())


def test_directory_is_job_file_error(tmp_path: Path) -> None:
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(JobFileError):
        JobSource(str(folder), JobParser())


# --- YAML --------------------------------------------------------------------------------------


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    return path


def test_yaml_list_positions_are_lines(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
- id: one
  url: http://a.test/
- url: http://b.test/
- just a string
- url: mailto:x@y.test
""",
    )
    assert summary(read(path)) == [
        (1, "one", "ok"),
        (2, "2", "ok"),
        (3, "3", "invalid_job"),
        (4, "4", "invalid_url"),
    ]


def test_yaml_defaults_merge_under_each_job(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
defaults:
  method: POST
  timeout: 5
  headers: {X-Team: core, Authorization: "Bearer ${TOKEN}"}
  params: {v: "1", lang: en}
jobs:
  - url: http://a.test/
  - url: http://b.test/
    method: PUT
    headers: {X-Extra: yes-please}
    params: {lang: fr}
  - url: http://c.test/
    headers: {X-Team: edge}
""",
    )
    a, b, c = read(path, TOKEN="t0k")
    assert isinstance(a, HttpJob) and isinstance(b, HttpJob) and isinstance(c, HttpJob)
    assert a.method == "POST" and a.timeout == 5
    assert a.headers == {"X-Team": "core", "Authorization": "Bearer t0k"}
    assert a.params == {"v": "1", "lang": "en"}
    assert b.method == "PUT" and b.timeout == 5  # own field wins, the others stay
    assert b.headers == {"X-Team": "core", "Authorization": "Bearer t0k", "X-Extra": "yes-please"}
    assert b.params == {"v": "1", "lang": "fr"}
    assert c.headers == {"X-Team": "edge", "Authorization": "Bearer t0k"}
    assert (a.id, b.id, c.id) == ("1", "2", "3")


def test_yaml_missing_env_variable_is_invalid_job_for_that_job(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
jobs:
  - url: http://a.test/
  - url: http://b.test/
    headers: {Authorization: "Bearer ${UNSET_TOKEN_FOR_TEST}"}
""",
    )
    items = read(path)
    assert summary(items) == [(1, "1", "ok"), (2, "2", "invalid_job")]
    assert isinstance(items[1], InvalidJob) and "UNSET_TOKEN_FOR_TEST" in items[1].message


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- url: http://a.test/\n- a: b: c\n- url: http://b.test/\n", "line 2"),
        ("just a string\n", "expected a list"),
        ("other: 1\njobs: []\n", "expected a list"),
        ("defaults: [1]\njobs: []\n", "'defaults' must be a mapping"),
        ("jobs: {url: http://a.test/}\n", "'jobs' a list"),
    ],
)
def test_unreadable_yaml_is_job_file_error(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(JobFileError, match=match):
        read(write_yaml(tmp_path, text))


def test_empty_yaml_has_no_jobs(tmp_path: Path) -> None:
    assert read(write_yaml(tmp_path, "")) == []
    assert read(write_yaml(tmp_path, "jobs: []\n")) == []


@pytest.mark.parametrize(("aliases", "refused"), [(1001, True), (990, False)])
def test_yaml_alias_count_is_bounded(tmp_path: Path, aliases: int, refused: bool) -> None:
    # Each alias is cheap to load but multiplies what any walk of the document costs.
    refs = ", ".join(["*big"] * aliases)
    text = (
        f"- url: http://a.test/\n  json: &big [1, 2, 3]\n- url: http://b.test/\n  json: [{refs}]\n"
    )
    path = write_yaml(tmp_path, text)
    if refused:
        with pytest.raises(JobFileError, match="aliases"):
            read(path)
    else:
        assert summary(read(path)) == [(1, "1", "ok"), (2, "2", "ok")]


def test_merge_defaults_is_one_level_deep() -> None:
    defaults: dict[str, Any] = {"headers": {"A": "1", "B": "2"}, "json": {"x": {"y": 1}}}
    merged = merge_defaults(defaults, {"headers": {"B": "3"}, "json": {"x": {"z": 2}}})
    assert merged["headers"] == {"A": "1", "B": "3"}
    assert merged["json"] == {"x": {"z": 2}}  # other mappings are replaced whole
    assert defaults["headers"] == {"A": "1", "B": "2"}  # defaults are not modified
    assert merge_defaults(defaults, [1]) == [1]
