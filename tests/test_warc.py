"""--warc FILE: every exchange recorded, read back with warcio, the reference library."""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from warcio.archiveiterator import ArchiveIterator

from fetcher.schema import result_schema
from fetcher.warc import repair
from fetcher.warcrecords import RecordIds, Records, warc_date, warcio_headers

from .app import GZIP_TEXT, blob_bytes
from .helpers import FETCHER
from .test_e2e import by_id, clean_env, fetcher, json_lines, write_jsonl


def records(path: Path) -> list[Any]:
    """Every record of a WARC file, with its raw payload read."""
    out = []
    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            record.payload = record.raw_stream.read()
            out.append(record)
    return out


def record_at(ref: dict[str, Any]) -> Any:
    with open(ref["file"], "rb") as f:
        f.seek(ref["offset"])
        record = next(iter(ArchiveIterator(f)))
        record.payload = record.raw_stream.read()
        return record


def warcio(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The reference tool itself, as a user runs it."""
    code = "import sys; from warcio.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_accepted(path: Path) -> None:
    checked = warcio("check", "-v", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    indexed = warcio("index", path)
    assert indexed.returncode == 0, indexed.stderr
    assert indexed.stdout.count("\n") == len(records(path))


def test_every_exchange_is_recorded_as_it_came_off_the_wire(tmp_path: Path, base_url: str) -> None:
    warc = tmp_path / "crawl.warc.gz"
    jobs = [
        {"id": "gzip", "url": f"{base_url}/gzip"},
        {"id": "chunked", "url": f"{base_url}/huge?size=300001&chunked=1"},
        {"id": "hops", "url": f"{base_url}/redirect/2"},
        {"id": "404", "url": f"{base_url}/status/404"},
        {"id": "secret", "url": f"{base_url}/ok", "headers": {"Authorization": "Bearer s3cret"}},
    ]
    done = fetcher("run", write_jsonl(tmp_path / "j.jsonl", jobs), "--warc", warc, "-n", "1")
    assert done.returncode == 1, done.stderr
    results = by_id(json_lines(done.stdout))
    validator = jsonschema.Draft202012Validator(result_schema())
    for r in results.values():
        validator.validate(r)  # path and warc are part of the result schema
    assert_accepted(warc)
    all_records = records(warc)
    assert all_records[0].rec_type == "warcinfo"
    assert all_records[0].rec_headers.get_header("WARC-Filename") == "crawl.warc.gz"

    gz = record_at(results["gzip"]["warc"])
    assert gz.rec_type == "response"
    assert gz.rec_headers.get_header("WARC-Target-URI") == f"{base_url}/gzip"
    assert gz.rec_headers.get_header("WARC-IP-Address") == "127.0.0.1"
    assert gz.http_headers.get_header("Content-Encoding") == "gzip"
    assert gzip.decompress(gz.payload) == GZIP_TEXT  # the encoded bytes, kept
    assert results["gzip"]["bytes"] == len(GZIP_TEXT)  # ... and the result is of the decoded body
    assert results["gzip"]["sha256"] == hashlib.sha256(GZIP_TEXT).hexdigest()

    chunked = record_at(results["chunked"]["warc"])
    assert chunked.http_headers.get_header("Transfer-Encoding") == "chunked"
    assert chunked.payload.endswith(b"0\r\n\r\n")  # framed again, as its headers say
    assert results["chunked"]["bytes"] == 300001

    # Redirect hops: a request and a response record each, the final one in the result.
    uris = [r.rec_headers.get_header("WARC-Target-URI") for r in all_records]
    for n in (2, 1, 0):
        assert uris.count(f"{base_url}/redirect/{n}") == 2
    final = record_at(results["hops"]["warc"])
    assert final.rec_headers.get_header("WARC-Target-URI") == f"{base_url}/redirect/0"
    hop = next(
        r
        for r in all_records
        if r.rec_type == "response"
        and r.rec_headers.get_header("WARC-Target-URI") == f"{base_url}/redirect/2"
    )
    assert hop.http_headers.get_statuscode() == "302"
    assert hop.rec_headers.get_header("WARC-Truncated") == "unspecified"

    assert record_at(results["404"]["warc"]).http_headers.get_statuscode() == "404"

    # Request records point at their response and never hold a secret.
    ids = {r.rec_headers.get_header("WARC-Record-ID") for r in all_records}
    requests = [r for r in all_records if r.rec_type == "request"]
    assert len(requests) == 7
    for r in requests:
        assert r.rec_headers.get_header("WARC-Concurrent-To") in ids
    secret = next(
        r for r in requests if r.rec_headers.get_header("WARC-Target-URI") == f"{base_url}/ok"
    )
    assert secret.http_headers.get_header("Authorization") == "***"
    # The request line as sent: warcio reads a request's method where a response has its protocol.
    assert (secret.http_headers.protocol, secret.http_headers.statusline) == ("GET", "/ok HTTP/1.1")
    assert b"s3cret" not in warc.read_bytes()
    assert b"s3cret" not in gzip.decompress(warc.read_bytes())


def test_a_repeated_payload_is_a_revisit(tmp_path: Path, base_url: str) -> None:
    warc = tmp_path / "w.warc.gz"
    jobs = [{"id": f"j{i}", "url": f"{base_url}/blob/same.png?i={i}"} for i in range(3)]
    done = fetcher("run", write_jsonl(tmp_path / "j.jsonl", jobs), "--warc", warc, "-n", "1")
    assert done.returncode == 0, done.stderr
    results = by_id(json_lines(done.stdout))
    first, *later = (record_at(results[f"j{i}"]["warc"]) for i in range(3))
    assert first.rec_type == "response" and first.payload == blob_bytes("same")
    for r in later:
        assert r.rec_type == "revisit"
        assert (
            r.rec_headers.get_header("WARC-Refers-To-Target-URI") == f"{base_url}/blob/same.png?i=0"
        )
        assert r.rec_headers.get_header("WARC-Payload-Digest") == first.rec_headers.get_header(
            "WARC-Payload-Digest"
        )
    assert_accepted(warc)


def test_files_rotate_past_max_size(tmp_path: Path, base_url: str) -> None:
    warc = tmp_path / "big.warc.gz"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("warc:\n  max_size: 1048576\n")
    jobs = [{"id": f"n{i}", "url": f"{base_url}/noise?size=700000&seed={i}"} for i in range(3)]
    done = fetcher(
        "run", write_jsonl(tmp_path / "j.jsonl", jobs), "--warc", warc, "-c", cfg, "-n", "1"
    )
    assert done.returncode == 0, done.stderr
    results = by_id(json_lines(done.stdout))
    files = [results[f"n{i}"]["warc"]["file"] for i in range(3)]
    assert files == [str(warc), str(warc), str(tmp_path / "big-00001.warc.gz")]
    for path in (warc, tmp_path / "big-00001.warc.gz"):
        assert records(path)[0].rec_type == "warcinfo"
        assert_accepted(path)


def test_a_torn_tail_is_cut_and_resume_appends_after_it(tmp_path: Path, base_url: str) -> None:
    warc = tmp_path / "r.warc.gz"
    job_file = write_jsonl(tmp_path / "j.jsonl", [{"id": "a", "url": f"{base_url}/blob/a.png"}])
    out = tmp_path / "out.jsonl"
    assert fetcher("run", job_file, "-o", out, "--warc", warc).returncode == 0
    whole = warc.read_bytes()
    # What SIGKILL in the middle of a record leaves: half a gzip member at the end.
    extra = gzip.compress(b"WARC/1.1\r\nWARC-Type: response\r\n" + b"x" * 5000)
    warc.write_bytes(whole + extra[: len(extra) // 2])
    assert repair(warc) == len(extra) // 2
    assert warc.read_bytes() == whole
    warc.write_bytes(whole + extra[: len(extra) // 2])

    write_jsonl(
        job_file,
        [
            {"id": "a", "url": f"{base_url}/blob/a.png"},
            {"id": "b", "url": f"{base_url}/blob/b.png"},
        ],
    )
    done = fetcher("run", job_file, "-o", out, "--warc", warc, "--resume")
    assert done.returncode == 0, done.stderr
    results = by_id(json_lines(out.read_bytes()))
    assert record_at(results["b"]["warc"]).payload == blob_bytes("b")
    assert record_at(results["a"]["warc"]).payload == blob_bytes("a")
    assert [r.rec_type for r in records(warc)] == ["warcinfo", "response", "request"] * 1 + [
        "response",
        "request",
    ]
    assert_accepted(warc)


def test_sigkill_then_resume_leaves_a_file_warcio_accepts(tmp_path: Path, base_url: str) -> None:
    warc = tmp_path / "k.warc.gz"
    jobs = [{"id": f"q{i}", "url": f"{base_url}/noise?size=200000&seed={i}"} for i in range(30)]
    jobs.append({"id": "slow", "url": f"{base_url}/slow-big?size=400000&interval=0.05"})
    job_file = write_jsonl(tmp_path / "j.jsonl", jobs)
    out = tmp_path / "out.jsonl"
    args = [
        *FETCHER,
        "run",
        str(job_file),
        "-o",
        str(out),
        "--warc",
        str(warc),
    ]
    proc = subprocess.Popen([*args, "-n", "4"], env=clean_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not out.exists() or out.read_bytes().count(b"\n") < 5:
            assert time.monotonic() < deadline, "no results appeared"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run([*args, "--resume"], capture_output=True, env=clean_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    results = by_id(json_lines(out.read_bytes()))
    assert len(results) == 31
    for r in results.values():
        assert hashlib.sha256(record_at(r["warc"]).payload).hexdigest() == r["sha256"]
    assert_accepted(warc)


def test_an_existing_warc_is_never_clobbered(tmp_path: Path, base_url: str) -> None:
    warc = tmp_path / "x.warc.gz"
    warc.write_bytes(b"precious")
    job_file = write_jsonl(tmp_path / "j.jsonl", [{"id": "a", "url": f"{base_url}/ok"}])
    done = fetcher("run", job_file, "--warc", warc)
    assert done.returncode == 2
    assert b"--resume" in done.stderr and b"Traceback" not in done.stderr
    assert warc.read_bytes() == b"precious"
    done = fetcher("run", job_file, "--warc", warc, "--processes", "2")
    assert done.returncode == 2 and b"--processes" in done.stderr
    done = fetcher("run", job_file, "--warc", warc, "-o", tmp_path / "o.jsonl", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert_accepted(warc)


def test_save_and_warc_together(tmp_path: Path, base_url: str) -> None:
    warc, save = tmp_path / "s.warc.gz", tmp_path / "files"
    jobs = [{"id": "g", "url": f"{base_url}/gzip", "body": "text"}]
    done = fetcher("run", write_jsonl(tmp_path / "j.jsonl", jobs), "--warc", warc, "--save", save)
    assert done.returncode == 0, done.stderr
    [r] = json_lines(done.stdout)
    jsonschema.Draft202012Validator(result_schema()).validate(r)
    assert Path(r["path"]).read_bytes() == GZIP_TEXT  # decoded on disk
    assert r["body"] == GZIP_TEXT.decode()
    assert gzip.decompress(record_at(r["warc"]).payload) == GZIP_TEXT  # encoded in the WARC
    assert os.path.getsize(r["path"]) == r["bytes"]


def test_large_bodies_are_recorded_whole(tmp_path: Path, base_url: str) -> None:
    """Bodies past what is kept in memory go to the writer as their file's descriptor."""
    warc = tmp_path / "l.warc.gz"
    jobs = [
        {"id": "plain", "url": f"{base_url}/huge?size=3000000"},
        {"id": "chunked", "url": f"{base_url}/huge?size=2500001&chunked=1"},
    ]
    done = fetcher("run", write_jsonl(tmp_path / "j.jsonl", jobs), "--warc", warc, "-n", "2")
    assert done.returncode == 0, done.stderr
    results = by_id(json_lines(done.stdout))
    plain = record_at(results["plain"]["warc"])
    assert plain.payload == b"z" * 3000000
    chunked = record_at(results["chunked"]["warc"])
    assert chunked.payload.endswith(b"0\r\n\r\n")
    assert unchunk(chunked.payload) == b"z" * 2500001
    assert_accepted(warc)


def unchunk(framed: bytes) -> bytes:
    body, pos = bytearray(), 0
    while True:
        end = framed.index(b"\r\n", pos)
        size = int(framed[pos:end], 16)
        if size == 0:
            return bytes(body)
        body += framed[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def test_a_revisit_holds_one_payload_digest_and_its_own_block_digest(
    tmp_path: Path, base_url: str
) -> None:
    warc = tmp_path / "v.warc.gz"
    jobs = [{"id": f"j{i}", "url": f"{base_url}/blob/same.png?i={i}"} for i in range(2)]
    done = fetcher("run", write_jsonl(tmp_path / "j.jsonl", jobs), "--warc", warc, "-n", "1")
    assert done.returncode == 0, done.stderr
    with open(warc, "rb") as f:  # unparsed: the block as written, HTTP headers and all
        revisit = next(
            r for r in ArchiveIterator(f, no_record_parse=True) if r.rec_type == "revisit"
        )
        block = revisit.raw_stream.read()
    assert block.startswith(b"HTTP/1.1 200 ") and block.endswith(b"\r\n\r\n")
    digests = [v for k, v in revisit.rec_headers.headers if k == "WARC-Payload-Digest"]
    assert len(digests) == 1
    # A revisit's block is the HTTP headers alone, and its digest is theirs.
    expected = "sha1:" + base64.b32encode(hashlib.sha1(block).digest()).decode()
    assert revisit.rec_headers.get_header("WARC-Block-Digest") == expected


def writer_of(pid: int) -> int | None:
    """The WARC writer process the run ``pid`` started, if it is alive (or a zombie)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"fetcher.warcrecords" in cmdline:
            return int(entry.name)
    return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@linux_only
def test_the_writer_dies_with_a_killed_run(tmp_path: Path, base_url: str) -> None:
    warc = tmp_path / "d.warc.gz"
    jobs = [{"id": "slow", "url": f"{base_url}/slow-big?size=4000000&interval=0.05"}]
    args = [*FETCHER, "run", str(write_jsonl(tmp_path / "j.jsonl", jobs)), "--warc", str(warc)]
    proc = subprocess.Popen(args, env=clean_env(), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while (writer := writer_of(proc.pid)) is None:
            assert time.monotonic() < deadline, "no writer process appeared"
            assert proc.poll() is None
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while alive(writer):  # the kernel kills it with its parent: no orphan is left writing
        assert time.monotonic() < deadline, "the writer outlived the run"
        time.sleep(0.01)


@linux_only
def test_the_writer_is_reaped_when_the_run_ends(tmp_path: Path, base_url: str) -> None:
    from fetcher import Settings, run_sync

    warc = tmp_path / "z.warc.gz"
    settings = Settings(warc={"file": warc})  # type: ignore[arg-type]
    [result] = run_sync([{"id": "a", "url": f"{base_url}/ok"}], settings)
    assert result.ok
    assert writer_of(os.getpid()) is None  # neither running nor a zombie
    assert_accepted(warc)


def test_ctrl_c_drains_and_the_writer_finishes_the_file(tmp_path: Path, base_url: str) -> None:
    """The terminal signals the whole process group: the run drains, its writer carries on."""
    warc = tmp_path / "c.warc.gz"
    jobs = [{"id": f"q{i}", "url": f"{base_url}/noise?size=2000&seed={i}"} for i in range(8)]
    jobs += [
        {"id": f"s{i}", "url": f"{base_url}/slow-big?size=4000000&interval=0.05"} for i in range(4)
    ]
    out = tmp_path / "out.jsonl"
    args = [*FETCHER, "run", str(write_jsonl(tmp_path / "j.jsonl", jobs)), "-o", str(out)]
    proc = subprocess.Popen(
        [*args, "--warc", str(warc), "-n", "12"],
        env=clean_env(),
        stderr=subprocess.PIPE,
        start_new_session=True,  # a group of its own, as a shell gives a command
    )
    deadline = time.monotonic() + 20
    while not out.exists() or out.read_bytes().count(b"\n") < 8:
        assert time.monotonic() < deadline, "no results appeared"
        assert proc.poll() is None
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    results = by_id(json_lines(out.read_bytes()))
    assert len(results) == 12  # the slow ones drained, their records written
    for r in results.values():
        record = record_at(r["warc"])
        if r["id"].startswith("s") and record.rec_type == "revisit":
            continue  # the same bytes as another slow one: recorded once
        assert hashlib.sha256(record.payload).hexdigest() == r["sha256"]
    assert_accepted(warc)


@linux_only
def test_resume_waits_for_the_writer_still_holding_the_file(tmp_path: Path, base_url: str) -> None:
    """Until the old writer is gone (it holds a lock), nothing is repaired or appended."""
    import fcntl

    warc = tmp_path / "w.warc.gz"
    job_file = write_jsonl(tmp_path / "j.jsonl", [{"id": "a", "url": f"{base_url}/blob/a.png"}])
    out = tmp_path / "out.jsonl"
    assert fetcher("run", job_file, "-o", out, "--warc", warc).returncode == 0
    write_jsonl(
        job_file,
        [
            {"id": "a", "url": f"{base_url}/blob/a.png"},
            {"id": "b", "url": f"{base_url}/blob/b.png"},
        ],
    )
    with open(warc, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a dying writer holds it
        args = [*FETCHER, "run", str(job_file), "-o", str(out), "--warc", str(warc), "--resume"]
        proc = subprocess.Popen(args, env=clean_env(), stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not any(
            os.path.realpath(fd) == str(warc)
            for fd in (f"/proc/{proc.pid}/fd/{n}" for n in os.listdir(f"/proc/{proc.pid}/fd"))
            if os.path.exists(fd)
        ):
            assert time.monotonic() < deadline, "the run never opened the WARC file"
            assert proc.poll() is None
            time.sleep(0.005)
        # The holder's last, torn record: cut by the repair that comes after the lock.
        extra = gzip.compress(b"WARC/1.1\r\nWARC-Type: response\r\n" + b"x" * 5000)
        held.write(extra[: len(extra) // 2])
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    results = by_id(json_lines(out.read_bytes()))
    assert record_at(results["b"]["warc"]).payload == blob_bytes("b")
    assert_accepted(warc)


def test_record_ids_are_random_uuids_and_dates_are_now() -> None:
    ids = RecordIds()
    made = [ids.next() for _ in range(1000)]
    assert len(set(made)) == len(made)
    for record_id in made:
        assert record_id.startswith("<urn:uuid:") and record_id.endswith(">")
        parsed = uuid.UUID(record_id[len("<urn:uuid:") : -1])
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    before = datetime.datetime.now(datetime.UTC)
    stamp = warc_date()
    after = datetime.datetime.now(datetime.UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    parsed_date = datetime.datetime.fromisoformat(stamp[:-1]).replace(tzinfo=datetime.UTC)
    assert before - datetime.timedelta(microseconds=1) <= parsed_date <= after


def test_a_response_is_recorded_with_its_header_bytes_as_they_came(tmp_path: Path) -> None:
    """Names as spelt, values in the bytes received (not latin-1 text made ASCII)."""
    path = tmp_path / "raw.warc.gz"
    raw = ((b"X-MiXeD", b"caf\xc3\xa9"), (b"Content-Length", b"2"))
    hop = ("http://h/p", "GET /p HTTP/1.1", [("Host", "h")], "200 OK", "HTTP/1.1", raw)
    hop += ("127.0.0.1", b"", b"hi", False)
    with open(path, "wb") as out:
        records_ = Records(path, 0, out, max_size=1 << 30, software="t")
        ref = records_.write([hop], None)  # type: ignore[arg-type]
        records_.close()
    with open(path, "rb") as f:
        f.seek(ref["offset"])
        response = next(iter(ArchiveIterator(f, no_record_parse=True)))
        block = response.raw_stream.read()
    assert block == b"HTTP/1.1 200 OK\r\nX-MiXeD: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\nhi"
    assert_accepted(path)


@pytest.mark.parametrize(
    ("statusline", "protocol"), [("", "WARC/1.1"), ("200 OK", "HTTP/1.1"), ("", "")]
)
def test_record_headers_are_written_as_warcio_writes_them(statusline: str, protocol: str) -> None:
    from warcio.statusandheaders import StatusAndHeaders

    pairs = [("WARC-Type", "response"), ("WARC-Target-URI", "http://h/é"), ("Content-Length", "0")]
    ours = warcio_headers()[0](statusline, list(pairs), protocol)
    theirs = StatusAndHeaders(statusline, list(pairs), protocol=protocol)
    assert ours.to_bytes() == theirs.to_bytes()
    ours.replace_header("content-length", "5")
    theirs.replace_header("content-length", "5")
    assert ours.get_header("content-length") == theirs.get_header("content-length") == "5"
    assert ours.to_bytes() == theirs.to_bytes()
