"""Progress a person can read: done/total, %, ETA, ok and failed, rate; bar and log line."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest

from fetcher.stats import Progress, Stats, format_eta, progress_text

from .test_e2e import fetcher, json_lines, write_jsonl


def result(ok: bool) -> dict[str, Any]:
    error = None if ok else {"type": "http_status", "message": "HTTP 500"}
    return {"error": error, "attempts": 1, "elapsed_ms": 3.0}


def stats_of(ok: int, failed: int) -> Stats:
    stats = Stats()
    for _ in range(ok):
        stats.record(result(True))
    for _ in range(failed):
        stats.record(result(False))
    return stats


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (
            {"done": 1151, "total": 20000, "ok": 1140, "failed": 11, "rate": 491.5},
            "fetcher: 1151/20000 done (5.8%), 1140 ok, 11 failed, 492 jobs/s, ETA 0:00:39",
        ),
        (
            {"done": 1151, "total": None, "ok": 1140, "failed": 11, "rate": 491.5},
            "fetcher: 1151 done, 1140 ok, 11 failed, 492 jobs/s",
        ),
        (
            {"done": 10, "total": 1000, "ok": 10, "failed": 0, "rate": 0.0, "exact": False},
            "fetcher: 10/~1000 done (1.0%), 10 ok, 0 failed, 0 jobs/s, ETA --",
        ),
        (  # an estimate the run went past is no limit
            {"done": 1200, "total": 1000, "ok": 1200, "failed": 0, "rate": 100.0, "exact": False},
            "fetcher: 1200/~1200 done (100.0%), 1200 ok, 0 failed, 100 jobs/s, ETA 0:00:00",
        ),
        (
            {"done": 0, "total": 0, "ok": 0, "failed": 0, "rate": 0.0},
            "fetcher: 0/0 done (100.0%), 0 ok, 0 failed, 0 jobs/s, ETA --",
        ),
    ],
)
def test_progress_text(fields: dict[str, Any], text: str) -> None:
    assert progress_text(**fields) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00:00"), (0.2, "0:00:01"), (61, "0:01:01"), (3 * 3600 + 5, "3:00:05")],
)
def test_format_eta(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


async def test_log_line_has_the_total_and_the_jobs_done_before() -> None:
    stream = io.StringIO()
    progress = Progress(
        stats_of(3, 1), bar=False, log_interval=3600, stream=stream,
        total=lambda: (10, True), initial=2,
    )  # fmt: skip
    try:
        line = progress.line()
    finally:
        progress.close()
    assert re.fullmatch(
        r"fetcher: 6/10 done \(60\.0%\), 3 ok, 1 failed, \d+ jobs/s, ETA \d:\d\d:\d\d", line
    ), line
    without_total = Progress(stats_of(1, 0), bar=False, log_interval=None, stream=stream)
    assert re.fullmatch(r"fetcher: 1 done, 1 ok, 0 failed, \d+ jobs/s", without_total.line())
    assert stream.getvalue() == ""  # nothing printed before the interval


async def test_bar_shows_total_percentage_and_counts() -> None:
    stream = io.StringIO()
    known: list[tuple[int | None, bool]] = [(None, False)]
    stats = stats_of(2, 1)
    progress = Progress(stats, bar=True, log_interval=None, stream=stream, total=lambda: known[0])
    known[0] = (12, True)  # the count ended while the run went on
    progress.close()  # draws once more, then ends the bar
    last = stream.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "3/12" in last and "25%" in last, last
    assert "2 ok, 1 failed" in last and "job/s" in last, last


def test_log_line_without_a_terminal(tmp_path: Path, base_url: str) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text(
        "".join(f"{base_url}/slow?delay=0.3\n" for _ in range(4)) + f"{base_url}/status/404\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("progress_interval: 0.1\nretries: 0\n")
    proc = fetcher("run", urls, "-c", cfg, "-n", "2")
    assert proc.returncode == 1, proc.stderr.decode()
    assert len(json_lines(proc.stdout)) == 5
    lines = proc.stderr.decode().splitlines()
    pattern = re.compile(
        r"fetcher: (\d+)/5 done \((\d+\.\d)%\), (\d+) ok, (\d+) failed, \d+ jobs/s, "
        r"ETA (\d+:\d\d:\d\d|--)"
    )
    matches = [m for line in lines if (m := pattern.fullmatch(line))]
    assert matches, lines
    for m in matches:
        done, ok, failed = int(m[1]), int(m[3]), int(m[4])
        assert done == ok + failed and float(m[2]) == pytest.approx(100 * done / 5, abs=0.05)
    assert any(int(m[1]) > 0 for m in matches), lines


def test_stdin_has_a_total_once_it_has_ended(tmp_path: Path, base_url: str) -> None:
    # Nothing can count a pipe ahead, but once it is read to the end its jobs are all known.
    jobs = write_jsonl(tmp_path / "j.jsonl", [{"url": f"{base_url}/slow?delay=0.4"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("progress_interval: 0.1\n")
    proc = fetcher("run", "-", "-c", cfg, stdin=jobs.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    assert re.search(
        rb"^fetcher: 0/1 done \(0\.0%\), 0 ok, 0 failed, 0 jobs/s, ETA --$", proc.stderr, re.M
    ), proc.stderr.decode()
