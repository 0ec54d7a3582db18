"""--save DIR: bodies streamed to files, placed only when complete and verified."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import resource
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from fetcher.save import PARTIAL_DIR, BodyStore, BoundedReads, NameTemplate, SaveFailed, safe_name

from .app import GZIP_TEXT, blob_bytes
from .helpers import FETCHER
from .peers.origin import Origin
from .test_e2e import by_id, clean_env, fetcher, json_lines, write_jsonl


@pytest.fixture
def fast(tmp_path: Path) -> Path:
    """Fast retries, short deadlines."""
    path = tmp_path / "fast.yaml"
    path.write_text("backoff_base: 0.01\nbackoff_max: 0.05\ntimeout: 5\n")
    return path


def files_under(root: Path) -> list[Path]:
    """Every regular file under ``root``, temporary ones excluded."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and PARTIAL_DIR not in p.relative_to(root).parts
    )


def partials(root: Path) -> list[Path]:
    part = root / PARTIAL_DIR
    return sorted(part.iterdir()) if part.exists() else []


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_save(
    tmp_path: Path, jobs: list[dict[str, Any]], *extra: str, config: Path | None = None
) -> tuple[subprocess.CompletedProcess[bytes], dict[str, dict[str, Any]], Path]:
    save = tmp_path / "files"
    job_file = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    args: list[str | Path] = ["run", job_file, "--save", save, *extra]
    if config is not None:
        args += ["-c", config]
    done = fetcher(*args)
    return done, by_id(json_lines(done.stdout)), save


def test_bodies_land_under_their_digest_and_match_it(
    tmp_path: Path, base_url: str, fast: Path
) -> None:
    jobs = [
        {"id": "gzip", "url": f"{base_url}/gzip"},
        {"id": "big", "url": f"{base_url}/huge?size=700000"},  # several flushes
        {"id": "chunked", "url": f"{base_url}/huge?size=300001&chunked=1"},
        {"id": "hops", "url": f"{base_url}/redirect/2"},
        {"id": "empty", "url": f"{base_url}/huge?size=0"},
    ]
    done, results, save = run_save(tmp_path, jobs, config=fast)
    assert done.returncode == 0, done.stderr
    for r in results.values():
        assert r["ok"], r
        path = Path(r["path"])
        assert path.parent.parent == save
        assert path.name == r["sha256"] and path.parent.name == r["sha256"][:2]
        assert sha256_file(path) == r["sha256"]
        assert path.stat().st_size == r["bytes"]
    # The file holds the body as the job got it: decoded, as curl --compressed writes it.
    assert Path(results["gzip"]["path"]).read_bytes() == GZIP_TEXT
    assert results["hops"]["redirects"] == 2
    assert len(files_under(save)) == 5
    assert partials(save) == []


def test_identical_bodies_are_written_once(tmp_path: Path, base_url: str) -> None:
    jobs = [{"id": f"j{i}", "url": f"{base_url}/blob/same.png?i={i}"} for i in range(6)]
    done, results, save = run_save(tmp_path, jobs)
    assert done.returncode == 0, done.stderr
    assert {r["path"] for r in results.values()} == {str(files_under(save)[0])}
    assert len(files_under(save)) == 1


def test_a_name_template_places_files_and_colliding_bodies_never_overwrite(
    tmp_path: Path, base_url: str
) -> None:
    jobs = [
        {"id": "a", "url": f"{base_url}/blob/one.png"},
        {"id": "b", "url": f"{base_url}/blob/two.pdf"},
        {"id": "small", "url": f"{base_url}/huge?size=10"},
        {"id": "large", "url": f"{base_url}/huge?size=20"},  # same {path}, another body
        {"id": "again", "url": f"{base_url}/huge?size=10&again=1"},  # same name, same body
    ]
    done, results, save = run_save(tmp_path, jobs, "--save-name", "{host}/{path}", "-n", "1")
    assert done.returncode == 0, done.stderr
    assert results["a"]["path"] == str(save / "127.0.0.1/blob/one.png")
    assert Path(results["a"]["path"]).read_bytes() == blob_bytes("one")
    assert Path(results["b"]["path"]).read_bytes() == blob_bytes("two")
    assert results["small"]["path"] == str(save / "127.0.0.1/huge")
    assert results["large"]["path"] == str(save / "127.0.0.1/huge.1")
    assert results["again"]["path"] == results["small"]["path"]
    for r in results.values():
        assert sha256_file(Path(r["path"])) == r["sha256"]
    assert len(files_under(save)) == 4


def test_ext_and_id_placeholders(tmp_path: Path, base_url: str) -> None:
    jobs = [
        {"id": "pic/1", "url": f"{base_url}/blob/x.png"},
        {"id": "typed", "url": f"{base_url}/gzip"},  # no extension in the URL: text/plain
    ]
    done, results, save = run_save(tmp_path, jobs, "--save-name", "{status}/{id}{ext}")
    assert done.returncode == 0, done.stderr
    assert results["pic/1"]["path"] == str(save / "200/pic_1.png")
    assert results["typed"]["path"] == str(save / "200/typed.txt")


def test_failed_bodies_leave_no_file(tmp_path: Path, base_url: str, fast: Path) -> None:
    jobs = [
        {"id": "dies", "url": f"{base_url}/drop"},
        {"id": "big", "url": f"{base_url}/huge?size=600000&chunked=1", "max_bytes": 300000},
        {"id": "404", "url": f"{base_url}/status/404"},
        {"id": "fine", "url": f"{base_url}/ok"},
    ]
    done, results, save = run_save(tmp_path, jobs, config=fast)
    assert done.returncode == 1
    assert results["dies"]["error"]["type"] == "protocol"
    assert results["big"]["error"]["type"] == "too_large"
    assert results["404"]["error"]["type"] == "http_status"
    for key in ("dies", "big", "404"):
        assert results[key]["path"] is None
    assert [str(p) for p in files_under(save)] == [results["fine"]["path"]]
    assert partials(save) == []


def test_save_errors_keeps_error_bodies(tmp_path: Path, base_url: str) -> None:
    cfg = tmp_path / "errors.yaml"
    cfg.write_text("save:\n  errors: true\n  name: '{status}/{id}'\n")
    done, results, save = run_save(
        tmp_path, [{"id": "e", "url": f"{base_url}/status/404"}], config=cfg
    )
    assert done.returncode == 1
    assert results["e"]["path"] == str(save / "404/e")
    assert Path(results["e"]["path"]).stat().st_size == results["e"]["bytes"] > 0


def test_checksum_is_verified_before_the_file_is_kept(tmp_path: Path, base_url: str) -> None:
    right = hashlib.sha256(blob_bytes("c")).hexdigest()
    jobs = [
        {"id": "right", "url": f"{base_url}/blob/c.png", "sha256": right.upper()},
        {"id": "wrong", "url": f"{base_url}/blob/d.png", "sha256": right},
    ]
    done, results, save = run_save(tmp_path, jobs)
    assert done.returncode == 1
    assert results["right"]["ok"] and results["right"]["sha256"] == right
    wrong = results["wrong"]
    assert wrong["error"]["type"] == "checksum" and wrong["attempts"] == 1
    assert wrong["path"] is None
    assert right in wrong["error"]["message"]
    assert files_under(save) == [Path(results["right"]["path"])]


def test_checksum_without_save(tmp_path: Path, base_url: str) -> None:
    jobs = [{"id": "wrong", "url": f"{base_url}/blob/e.png", "sha256": "0" * 64}]
    done = fetcher("run", write_jsonl(tmp_path / "j.jsonl", jobs))
    [r] = json_lines(done.stdout)
    assert r["error"]["type"] == "checksum"
    assert "path" not in r


def test_a_name_that_would_leave_dir_is_error_save(tmp_path: Path, base_url: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    save = tmp_path / "files"
    save.mkdir()
    (save / "link").symlink_to(outside)
    jobs = [
        {"id": "escape", "url": f"{base_url}/blob/f.png"},
        {"id": "stays", "url": f"{base_url}/blob/g.png"},
    ]
    # "link/{id}" would follow the symlink out of DIR; a config's name under DIR stays.
    job_file = write_jsonl(tmp_path / "j.jsonl", jobs[:1])
    done = fetcher("run", job_file, "--save", save, "--save-name", "link/{id}")
    [r] = json_lines(done.stdout)
    assert r["error"]["type"] == "save" and "leave" in r["error"]["message"]
    assert list(outside.iterdir()) == []
    cfg = tmp_path / "c.yaml"
    cfg.write_text("save:\n  name: '{id}/x'\n")
    done = fetcher("run", write_jsonl(tmp_path / "k.jsonl", jobs[1:]), "--save", save, "-c", cfg)
    [r] = json_lines(done.stdout)
    assert r["ok"] and r["path"] == str(save / "stays/x")


def test_a_full_disk_is_error_save_and_the_run_goes_on(tmp_path: Path, base_url: str) -> None:
    save = tmp_path / "files"
    jobs = [
        {"id": "big", "url": f"{base_url}/huge?size=900000"},
        {"id": "small", "url": f"{base_url}/ok"},
    ]
    job_file = write_jsonl(tmp_path / "j.jsonl", jobs)
    out = tmp_path / "out.jsonl"

    def small_files() -> None:  # writes past 400 kB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    done = subprocess.run(
        [
            *FETCHER,
            "run",
            str(job_file),
            "-o",
            str(out),
            "--save",
            str(save),
        ],
        capture_output=True,
        env=clean_env(),
        timeout=60,
        preexec_fn=small_files,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    results = by_id(json_lines(out.read_bytes()))
    assert results["big"]["error"]["type"] == "save"
    assert "too large" in results["big"]["error"]["message"].lower()
    assert results["small"]["ok"]
    assert b"save 1" in done.stderr  # the summary counts it
    assert partials(save) == []


def test_after_sigkill_no_partial_file_has_a_final_name_and_resume_refetches(
    tmp_path: Path, base_url: str
) -> None:
    save = tmp_path / "files"
    jobs = [
        {"id": "slow", "url": f"{base_url}/slow-big?size=1200000&interval=0.05"},
        {"id": "quick", "url": f"{base_url}/blob/q.png"},
    ]
    job_file = write_jsonl(tmp_path / "j.jsonl", jobs)
    out = tmp_path / "out.jsonl"
    args = [*FETCHER, "run", str(job_file), "-o", str(out)]
    proc = subprocess.Popen(
        [*args, "--save", str(save)], env=clean_env(), stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while not partials(save) or not out.exists() or b"quick" not in out.read_bytes():
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [partial] = partials(save)
    quick = by_id(json_lines(out.read_bytes()))["quick"]
    assert files_under(save) == [Path(quick["path"])]  # the slow body has no final name

    done = subprocess.run(
        [*args, "--save", str(save), "--resume"], capture_output=True, env=clean_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert not partial.exists() and partials(save) == []
    assert b"removed 1 partial file" in done.stderr
    results = by_id(json_lines(out.read_bytes()))
    assert results["slow"]["ok"] and results["slow"]["bytes"] == 1_200_000
    assert sha256_file(Path(results["slow"]["path"])) == results["slow"]["sha256"]


def test_processes_share_a_save_dir(tmp_path: Path, base_url: str) -> None:
    jobs = [{"id": f"j{i}", "url": f"{base_url}/blob/s{i % 7}.png"} for i in range(60)]
    done, results, save = run_save(tmp_path, jobs, "--processes", "2")
    assert done.returncode == 0, done.stderr
    assert len(results) == 60
    assert len(files_under(save)) == 7
    for r in results.values():
        assert Path(r["path"]).read_bytes() == blob_bytes(f"s{int(r['id'][1:]) % 7}")


def test_an_unknown_placeholder_stops_the_run(tmp_path: Path, base_url: str) -> None:
    job_file = write_jsonl(tmp_path / "j.jsonl", [{"id": "a", "url": f"{base_url}/ok"}])
    done = fetcher("run", job_file, "--save", tmp_path / "f", "--save-name", "{nope}")
    assert done.returncode == 2
    assert b"unknown placeholder {nope}" in done.stderr
    assert b"Traceback" not in done.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "_/_/etc/passwd"),
        ("/abs/./x", "abs/x"),
        ("a\x00b/c\nd", "a_b/c_d"),
        ("win\\dows", "win/dows"),
        ("é" * 200, "é" * 127),  # 255 bytes at most, cut on a character
    ],
)
def test_names_are_made_safe(name: str, safe: str) -> None:
    assert safe_name(name) == safe
    assert all(len(part.encode()) <= 255 for part in safe_name(name).split("/"))


def test_a_name_with_nothing_left_fails() -> None:
    with pytest.raises(SaveFailed):
        safe_name("/./")


def test_template_slices_and_checks() -> None:
    t = NameTemplate("{sha256:0:2}/{sha256:2:4}/{id}")
    assert t.render({"sha256": "abcdef", "id": "x"}) == "ab/cd/x"
    assert not t.content_addressed
    assert NameTemplate("{sha256:0:2}/{sha256}").content_addressed


def test_save_dir_that_cannot_be_made_stops_the_run(tmp_path: Path, base_url: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    job_file = write_jsonl(tmp_path / "j.jsonl", [{"id": "a", "url": f"{base_url}/ok"}])
    done = fetcher("run", job_file, "--save", blocker / "sub")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count(b"\n") == 1 and b"--save" in done.stderr
    assert os.path.isfile(blocker)


def test_bodies_over_https_are_saved_whole_on_a_reused_connection(tmp_path: Path) -> None:
    """The bounded reads go through the TLS layer too, and stay on a connection that serves
    the next job (-n 1: one connection for all)."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    config = tmp_path / "tls.yaml"
    config.write_text(f"timeout: 10\ntls:\n  ca_bundle: {ca_file}\n")
    sizes = {"a": 3_000_001, "b": 70_000, "c": 1_500_000}
    with Origin(ctx) as origin:
        jobs = [
            {"id": key, "url": f"{origin.url}/noise?size={size}&seed={key}"}
            for key, size in sizes.items()
        ]
        jobs.append({"id": "gzip", "url": f"{origin.url}/gzip"})
        jobs.append({"id": "chunked", "url": f"{origin.url}/huge?size=1000001&chunked=1"})
        done, results, _ = run_save(tmp_path, jobs, "-n", "1", config=config)
    assert done.returncode == 0, done.stderr
    for key, size in sizes.items():
        body = random.Random(key).randbytes(size)
        assert results[key]["sha256"] == hashlib.sha256(body).hexdigest()
        assert Path(results[key]["path"]).read_bytes() == body
    assert Path(results["gzip"]["path"]).read_bytes() == GZIP_TEXT
    assert Path(results["chunked"]["path"]).read_bytes() == b"z" * 1000001


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.eof = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.reads.append(data)

    def eof_received(self) -> bool:
        self.eof.set_result(True)
        return True  # keep the transport open: connection_lost must come from close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def _read_through_bounded_reads(size: int, buffer_size: int) -> _Recorder:
    body = random.Random(size).randbytes(size)

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        await writer.drain()
        writer.write_eof()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(send, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        store = BodyStore(Path("unused"), NameTemplate("{id}"), read_size=buffer_size)
        transport, recorder = await asyncio.get_running_loop().create_connection(
            _Recorder, "127.0.0.1", port
        )
        store.bound_reads(transport)
        store.bound_reads(transport)  # a reused connection keeps the one it has
        assert isinstance(transport.get_protocol(), BoundedReads)
        await asyncio.wait_for(recorder.eof, 10)
        transport.close()
        assert await asyncio.wait_for(recorder.lost, 10) is None
    assert b"".join(recorder.reads) == body
    return recorder


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_bounded_reads_hand_over_no_more_than_their_buffer_at_a_time(loop: str) -> None:
    """uvloop alone hands over up to 256 KiB a read; through BoundedReads no read is larger
    than the buffer, and every byte, the end of the stream and the close still arrive."""
    size, buffer_size = 3 * 1024 * 1024, 20_000
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    recorder = runner(_read_through_bounded_reads(size, buffer_size))
    assert max(len(r) for r in recorder.reads) <= buffer_size
    assert len(recorder.reads) >= size // buffer_size
