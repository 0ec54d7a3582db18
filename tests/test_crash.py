"""How a run ends: signals, SIGKILL and --resume, closed pipes, write errors (subprocess tests)."""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from fetcher.errors import EXIT_PIPE
from tests.slow_peer import SlowServer, assert_each_id_once, read_results, write_jobs

from .helpers import FETCHER


@pytest.fixture(scope="module")
def slow_server() -> Iterator[SlowServer]:
    with SlowServer() as server:
        yield server


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
    tag = tmp_path.name
    jobs = tmp_path / "jobs.jsonl"
    ids = write_jobs(jobs, slow_server.port, 3000, ms=150)
    out = tmp_path / "out.jsonl"
    proc = start("run", jobs, "-o", out, "-n", "200", "--no-progress")
    wait_for_lines(out, 200, proc)
    slow_server.wait_in_flight(tag, 100)  # a full pool: these must finish, not be cut off
    started = slow_server.requests[tag]
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == code, err
    # In-flight jobs needed at most 150 ms to finish: far inside the 10 s grace.
    assert time.monotonic() - sent < 5
    assert b"Traceback" not in err
    assert b"--resume" in err
    first = read_results(out)
    assert all(r["ok"] for r in first)  # drained jobs finished; none was cut short
    # Every job that reached the server, those in flight at the signal among them, has its
    # line: a first signal that cancelled them instead of draining would leave them without.
    assert started <= len(first) == slow_server.requests[tag] < len(ids)

    done = subprocess.run(
        [*FETCHER, "run", str(jobs), "-o", str(out), "--resume", "-n", "500", "--no-progress"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert_each_id_once(out, ids)


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
    assert_each_id_once(out, ids)


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
    assert proc.returncode == EXIT_PIPE == 141  # as a shell reports a pipe closed under it


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
    assert summary_count(done.stderr) == 0  # not one line reached the output


def summary_count(stderr: bytes) -> int:
    """The job count of the run's summary line."""
    (count,) = re.findall(rb"^fetcher: (\d+) jobs in ", stderr, re.M)
    return int(count)


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
    # The summary counts the results in the file, not those lost with the failed write.
    assert summary_count(done.stderr) == len(results)


def test_a_signal_stops_a_file_of_refused_lines_midway(tmp_path: Path) -> None:
    """Refused lines never wait on the network, yet the loop still hears a signal between
    batches: the run stops part way, with whole lines, instead of finishing the file first."""
    jobs = tmp_path / "jobs.jsonl"
    lines = 400_000
    jobs.write_bytes(b"not json\n" * lines)
    out = tmp_path / "out.jsonl"
    proc = start("run", jobs, "-o", out, "--no-progress")
    wait_for_lines(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    written = out.read_bytes()
    assert written.endswith(b"\n")
    results = [orjson.loads(line) for line in written.splitlines()]
    assert 0 < len(results) < lines
    assert {r["error"]["type"] for r in results} == {"invalid_job"}
