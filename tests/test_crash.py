"""How a run ends: signals, SIGKILL and --resume, closed pipes, write errors (subprocess tests)."""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

FETCHER = [sys.executable, "-m", "fetcher"]


class SlowServer:
    """An aiohttp app on 127.0.0.1:0 in a thread: /slow?ms=N answers after N ms."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.in_flight: Counter[str] = Counter()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _slow(self, request: web.Request) -> web.Response:
        tag = request.query.get("tag", "")
        self.in_flight[tag] += 1
        try:
            await asyncio.sleep(int(request.query.get("ms", "0")) / 1000)
        finally:
            self.in_flight[tag] -= 1
        return web.Response(text="ok")

    def wait_in_flight(self, tag: str, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight[tag] < n:
            assert time.monotonic() < deadline, f"fewer than {n} requests in flight"
            time.sleep(0.01)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/slow", self._slow)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def __enter__(self) -> SlowServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def slow_server() -> Iterator[SlowServer]:
    with SlowServer() as server:
        yield server


def write_jobs(path: Path, port: int, n: int, ms: int) -> set[str]:
    """Jobs tagged with their directory's name, so the server can count each test's requests."""
    tag = path.parent.name
    with path.open("w") as f:
        for i in range(n):
            url = f"http://127.0.0.1:{port}/slow?ms={ms}&tag={tag}&i={i}"
            f.write(f'{{"id": "j{i}", "url": "{url}"}}\n')
    return {f"j{i}" for i in range(n)}


def read_results(path: Path) -> list[dict[str, object]]:
    """Every line must be a whole JSON object."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "output ends in a torn line"
    return [orjson.loads(line) for line in data.splitlines()]


def start(*args: str | Path, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*FETCHER, *map(str, args)],
        stdout=kw.pop("stdout", subprocess.DEVNULL),  # type: ignore[arg-type]
        stderr=subprocess.PIPE,
        **kw,  # type: ignore[arg-type]
    )


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} result lines after {timeout} s")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_drains_then_resume_finishes(
    slow_server: SlowServer, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    ids = write_jobs(jobs, slow_server.port, 600, ms=150)
    out = tmp_path / "out.jsonl"
    proc = start("run", jobs, "-o", out, "-n", "40", "--no-progress")
    wait_for_lines(out, 50, proc)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == code, err
    # In-flight jobs needed ~150 ms to finish: far inside the 10 s grace.
    assert time.monotonic() - sent < 5
    assert b"Traceback" not in err
    assert b"--resume" in err
    first = read_results(out)
    assert 50 <= len(first) < len(ids)
    assert all(r["ok"] for r in first)  # drained jobs finished; none was cut short

    done = subprocess.run(
        [*FETCHER, "run", str(jobs), "-o", str(out), "--resume", "-n", "100", "--no-progress"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    counts = Counter(r["id"] for r in read_results(out))
    assert set(counts) == ids
    assert max(counts.values()) == 1


def test_grace_period_cancels_jobs_that_do_not_finish(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, slow_server.port, 20, ms=30_000)
    config = tmp_path / "config.yaml"
    config.write_text("shutdown_grace: 0.5\n")
    out = tmp_path / "out.jsonl"
    proc = start("run", jobs, "-o", out, "-c", config, "-n", "5", "--no-progress")
    slow_server.wait_in_flight(tmp_path.name, 5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    assert 0.5 <= time.monotonic() - sent < 5  # waited out the grace, no longer
    assert read_results(out) == []  # cancelled jobs get no line, so --resume runs them


def test_second_signal_stops_at_once(slow_server: SlowServer, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, slow_server.port, 20, ms=30_000)
    out = tmp_path / "out.jsonl"
    proc = start("run", jobs, "-o", out, "-n", "5", "--no-progress")
    slow_server.wait_in_flight(tmp_path.name, 5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 3  # not the 10 s grace
    assert proc.returncode == 143, err
    assert b"Traceback" not in err


def test_sigkill_then_resume_converges_on_one_line_per_job(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    ids = write_jobs(jobs, slow_server.port, 1500, ms=20)
    out = tmp_path / "out.jsonl"
    rng = random.Random(7)
    args = ["run", jobs, "-o", out, "-n", "50", "--no-progress"]
    for round_ in range(3):
        proc = start(*args, *(["--resume"] if round_ else []))
        time.sleep(rng.uniform(0.3, 0.9))
        proc.kill()
        proc.communicate(timeout=10)
    done = subprocess.run([*FETCHER, *map(str, args), "--resume"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    counts = Counter(r["id"] for r in read_results(out))
    assert set(counts) == ids
    assert max(counts.values()) == 1


def test_resume_cuts_a_torn_last_line(slow_server: SlowServer, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    ids = write_jobs(jobs, slow_server.port, 5, ms=0)
    out = tmp_path / "out.jsonl"
    whole = orjson.dumps({"id": "j0", "kind": "http", "ok": True}) + b"\n"
    out.write_bytes(whole + b'{"id": "j1", "kind": "ht')  # killed mid-line
    done = subprocess.run(
        [*FETCHER, "run", str(jobs), "-o", str(out), "--resume", "--no-progress"],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    results = read_results(out)
    assert Counter(r["id"] for r in results) == Counter(ids)
    assert results[0] == orjson.loads(whole)  # the whole line was kept, not rerun


def test_closed_pipe_ends_quietly(slow_server: SlowServer, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, slow_server.port, 3000, ms=0)
    proc = start("run", jobs, "--no-progress", stdout=subprocess.PIPE)
    assert proc.stdout is not None
    for _ in range(3):  # what `| head -3` does
        assert orjson.loads(proc.stdout.readline())["id"]
    proc.stdout.close()
    _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err and b"Exception ignored" not in err, err
    assert b"BrokenPipe" not in err
    assert proc.returncode == 141  # as a shell reports a pipeline member ended by a closed pipe


def test_device_full_is_one_clear_line_and_nonzero_exit(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, slow_server.port, 10, ms=0)
    done = subprocess.run(
        [*FETCHER, "run", str(jobs), "-o", "/dev/full", "--overwrite", "--no-progress"],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 3
    assert b"Traceback" not in done.stderr
    assert b"cannot write results to /dev/full: No space left on device" in done.stderr


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_write_that_fails_half_way_leaves_only_whole_lines(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, slow_server.port, 2000, ms=0)
    out = tmp_path / "out.jsonl"
    limit = 150_000  # a few batches fit, then a write is cut short mid-line
    done = subprocess.run(
        [*FETCHER, "run", str(jobs), "-o", str(out), "--no-progress"],
        capture_output=True,
        timeout=60,
        preexec_fn=lambda: _limit_file_size(limit),
    )
    assert done.returncode == 3, done.stderr
    assert b"cannot write results to" in done.stderr
    assert b"Traceback" not in done.stderr
    assert 0 < os.path.getsize(out) <= limit
    results = read_results(out)  # whole lines only
    assert len({r["id"] for r in results}) == len(results)
