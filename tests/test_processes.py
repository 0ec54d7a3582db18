"""`fetcher run --processes P`: one merged output with the single-process guarantees."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fetcher.run import line_selector
from tests.slow_peer import SlowServer, assert_each_id_once, read_results, write_jobs

from .helpers import FETCHER


@pytest.fixture(scope="module")
def slow_server() -> Iterator[SlowServer]:
    with SlowServer() as server:
        yield server


def test_slices_and_shards_partition_the_input() -> None:
    lines = range(1, 1001)
    for shard in (None, (1, 3)):
        wanted = [n for n in lines if shard is None or (n - 1) % shard[1] == shard[0]]
        taken: list[int] = []
        for k in range(4):
            select = line_selector(shard, (k, 4))
            assert select is not None
            taken += [n for n in lines if select(n)]
        assert sorted(taken) == wanted  # each line exactly once, in exactly one slice


def test_processes_write_every_job_exactly_once(slow_server: SlowServer, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    ids = write_jobs(jobs, slow_server.port, 1000, ms=0)
    with jobs.open("a") as f:
        f.write("not json\n")  # line 1001: reported once, by the process whose slice it is in
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            *FETCHER,
            "run",
            str(jobs),
            "-o",
            str(out),
            "--processes",
            "3",
            "-n",
            "20",
            "--no-progress",
        ],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr  # one invalid job
    results = read_results(out)
    counts = Counter(r["id"] for r in results)
    assert set(counts) == ids | {"1001"}
    assert max(counts.values()) == 1
    assert sum(r["ok"] for r in results) == 1000
    # One summary, aggregated over the processes.
    assert done.stderr.count(b"jobs in") == 1
    assert b"1001 jobs in" in done.stderr


def test_stdin_is_refused_with_processes(tmp_path: Path) -> None:
    done = subprocess.run(
        [*FETCHER, "run", "-", "--processes", "2"], input=b"", capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert b"--processes needs a job file" in done.stderr


def test_sigterm_drains_all_processes_and_resume_finishes(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    ids = write_jobs(jobs, slow_server.port, 800, ms=100)
    out = tmp_path / "out.jsonl"
    args = [
        *FETCHER,
        "run",
        str(jobs),
        "-o",
        str(out),
        "--processes",
        "2",
        "-n",
        "20",
        "--no-progress",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    slow_server.wait_in_flight(tmp_path.name, 30)  # both processes are fetching
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert b"Traceback" not in err
    first = read_results(out)
    assert 0 < len(first) < len(ids)
    assert all(r["ok"] for r in first)  # drained, not cut short

    done = subprocess.run([*args, "--resume"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert_each_id_once(out, ids)


def test_parent_killed_children_do_not_outlive_their_pipe(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, slow_server.port, 400, ms=50)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [
            *FETCHER,
            "run",
            str(jobs),
            "-o",
            str(out),
            "--processes",
            "2",
            "-n",
            "10",
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    slow_server.wait_in_flight(tmp_path.name, 10)
    proc.kill()
    proc.wait(10)
    # With the parent gone, a child's next write hits a closed pipe and it ends.
    deadline = time.monotonic() + 15
    while slow_server.in_flight[tmp_path.name] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    before = slow_server.requests[tmp_path.name]
    time.sleep(0.5)
    assert slow_server.requests[tmp_path.name] == before, "children still fetching"


def test_shards_cover_the_job_file_once(slow_server: SlowServer, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    ids = write_jobs(jobs, slow_server.port, 90, ms=0)
    out = tmp_path / "out.jsonl"
    base = [*FETCHER, "run", str(jobs), "-o", str(out), "--no-progress"]
    for k, extra in enumerate([["--shard", "0/3"], ["--shard", "1/3", "--processes", "2"]]):
        done = subprocess.run([*base, *extra, "--resume"], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert len(read_results(out)) == 30 * (k + 1)
    # K from the Kubernetes Indexed Job's completion index.
    env = {**os.environ, "JOB_COMPLETION_INDEX": "2"}
    done = subprocess.run(
        [*base, "--shard", "3", "--resume"], capture_output=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert_each_id_once(out, ids)
    assert {r["id"] for r in read_results(out)[60:]} == {f"j{i}" for i in range(2, 90, 3)}

    env["JOB_COMPLETION_INDEX"] = "3"  # out of range for 3 shards: refused before any work
    bad = subprocess.run(
        [*base, "--shard", "3", "--resume"], capture_output=True, env=env, timeout=30
    )
    assert bad.returncode == 2
    assert b"JOB_COMPLETION_INDEX" in bad.stderr


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _interrupt_then_resume(
    slow_server: SlowServer,
    tmp_path: Path,
    interrupt: Callable[[subprocess.Popen[bytes]], None],
    code: int,
) -> bytes:
    """Run 400 jobs in 2 processes, ``interrupt`` the run, check it ended with ``code`` and
    part of the results, then that a resume completes them; the first run's stderr."""
    jobs = tmp_path / "jobs.jsonl"
    ids = write_jobs(jobs, slow_server.port, 400, ms=50)
    out = tmp_path / "out.jsonl"
    args = [*FETCHER, "run", str(jobs), "-o", str(out), "--processes", "2", "-n", "10"]
    proc = subprocess.Popen([*args, "--no-progress"], stderr=subprocess.PIPE)
    interrupt(proc)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert b"Traceback" not in err, err
    assert len(read_results(out)) < len(ids)
    done = subprocess.run([*args, "--resume", "--no-progress"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert_each_id_once(out, ids)
    return err


def test_a_child_killed_mid_run_makes_the_run_incomplete_not_ok(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    def kill_one_child(proc: subprocess.Popen[bytes]) -> None:
        slow_server.wait_in_flight(tmp_path.name, 10)
        children = _children_of(proc.pid)
        assert len(children) == 2, children
        os.kill(children[0], signal.SIGKILL)

    err = _interrupt_then_resume(slow_server, tmp_path, kill_one_child, 3)
    assert b"exited with code -9" in err, err
    assert b"rerun with --resume" in err, err


def test_sigterm_as_the_children_start_stops_them_all(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    def sigterm_once_forked(proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 20
        while len(_children_of(proc.pid)) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "children never started"
        proc.send_signal(signal.SIGTERM)  # as soon as they exist, before most have fetched

    _interrupt_then_resume(slow_server, tmp_path, sigterm_once_forked, 143)
