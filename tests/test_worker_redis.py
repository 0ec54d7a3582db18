"""A worker's view of Redis health through a real outage: redis-server stopped and started again.

One outage must read as one outage: one "redis unavailable" line, one "redis reachable again"
line, and ``/readyz`` and ``fetcher_redis_up`` going down once and up once, whatever the
worker's several connections (the blocking read, the storer, the refresher) find on the way.
The in-process tests drive ``RedisHealth`` with commands that overlap a change of state.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.retry import Retry

from fetcher.scaleout import RedisHealth

from .redis_peer import HttpPeer, RedisPeer, free_port, http_peer, redis_peer
from .test_metrics import get, samples
from .test_scaleout import CONFIG, FETCHER, enqueue, wait_for, write_jobs

GATE_JOBS = 4
#  How long Redis stays away: a few seconds, as in the field (3.6 s), so that every one of the
#  worker's connections, and the commands under way on them, meet the outage.
OUTAGE_SECONDS = 3.0


@pytest.fixture(scope="module")
def web() -> Iterator[HttpPeer]:
    with http_peer() as peer:
        yield peer


class Watcher:
    """Polls /readyz and /metrics from a thread; keeps each one's sequence of distinct states."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.ready: list[int] = []
        self.up: list[float] = []
        self.errors = 0.0  # fetcher_redis_errors_total, as last read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            status, _ = get(f"{self.base}/readyz")
            if status and (not self.ready or self.ready[-1] != status):
                self.ready.append(status)
            code, text = get(f"{self.base}/metrics")
            page = samples(text) if code == 200 else {}
            self.errors = page.get(("fetcher_redis_errors_total", ()), self.errors)
            value = page.get(("fetcher_redis_up", ()))
            if value is not None and (not self.up or self.up[-1] != value):
                self.up.append(value)


def test_one_outage_is_one_down_and_one_up(tmp_path: Path, web: HttpPeer) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    # Jobs held at a gate keep results waiting to be stored across the outage; with room
    # for more, the worker's blocking read is in flight when Redis goes away.
    jobs = [{"id": f"g{i}", "url": f"{web.url}/gate/outage/{i}"} for i in range(GATE_JOBS)]
    with redis_peer(tmp_path) as rds:
        assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
        port = free_port()
        err_path = tmp_path / "worker.err"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [*FETCHER, "worker", "--redis", rds.url, "-n", "8", "-c", str(config),
                 "--metrics-port", str(port)],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        try:
            with Watcher(f"http://127.0.0.1:{port}") as watch:
                _ride_out_an_outage(rds, web, proc, err_path, watch)
            assert proc.wait(15) == 0
        finally:
            proc.kill()
            proc.wait()
        log = err_path.read_text()
        assert "Traceback" not in log, log
        assert log.count("redis unavailable") == 1, log
        assert log.count("redis reachable again") == 1, log
        # From the first time the worker was ready (before it, Redis was not reached yet).
        assert watch.ready[watch.ready.index(200) :] == [200, 503, 200], (watch.ready, log)
        assert watch.up[watch.up.index(1) :] == [1, 0, 1], (watch.up, log)


def _ride_out_an_outage(
    rds: RedisPeer, web: HttpPeer, proc: subprocess.Popen[bytes], err: Path, watch: Watcher
) -> None:
    def reached_gate() -> bool:
        return sum(web.hits[f"/gate/outage/{i}"] for i in range(GATE_JOBS)) == GATE_JOBS

    wait_for(lambda: watch.ready[-1:] == [200] and watch.up[-1:] == [1], what="a ready worker")
    wait_for(reached_gate, what="the jobs at the gate")
    shutdown_saving(rds)  # the stream, the group and its pending entries survive
    down_at = time.monotonic()
    wait_for(lambda: "redis unavailable" in err.read_text(), what="the outage noticed")
    web.open_gate("outage")  # their results now wait in the worker for Redis

    def outage_seen() -> bool:
        # Down on both faces, and more than one command has failed: the storer's too.
        return watch.ready[-1:] == [503] and watch.up[-1:] == [0] and watch.errors >= 3

    wait_for(outage_seen, what="the outage on /readyz and /metrics")
    time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))
    rds.start()
    wait_for(lambda: rds.client().xlen("fetcher:results") == GATE_JOBS, what="stored results")
    # Work after the outage goes through every connection the worker had before it.
    more = [{"id": f"after{i}", "url": f"{web.url}/ok/{i}"} for i in range(20)]
    assert enqueue(rds, write_jobs(err.with_name("more.jsonl"), more)).returncode == 0
    total = GATE_JOBS + len(more)
    wait_for(lambda: rds.client().xlen("fetcher:results") == total, what="every result")
    wait_for(lambda: watch.ready[-1:] == [200] and watch.up[-1:] == [1], what="ready again")
    proc.send_signal(signal.SIGTERM)


def shutdown_saving(rds: RedisPeer) -> None:
    """``rds.stop(save=True)`` without the seconds redis-py's client spends retrying the
    connection SHUTDOWN closes."""
    client = redis.Redis(host="127.0.0.1", port=rds.port, retry=Retry(NoBackoff(), 0))
    with contextlib.suppress(rexc.ConnectionError):
        client.shutdown(save=True)
    assert rds.proc is not None
    rds.proc.wait(10)


# -- the state machine, in process ---------------------------------------------------------------

LOST = rexc.ConnectionError("Connection closed by server.")


def test_a_command_from_before_the_recovery_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    changes: list[bool] = []
    health = RedisHealth(changes.append)
    health.ok(health.ticket())
    blocking_read = health.ticket()  # under way when Redis goes away, and long after
    health.failed(health.ticket(), "store", LOST)
    assert health.up is False
    health.ok(health.ticket())  # the storer gets through: Redis is back
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fetcher"):
        health.failed(blocking_read, "read", LOST)  # its socket from before the outage
    assert health.up is True
    assert changes == [True, False, True]
    assert caplog.records == []


def test_a_new_failure_after_recovery_is_a_new_outage() -> None:
    changes: list[bool] = []
    health = RedisHealth(changes.append)
    health.failed(health.ticket(), "read", LOST)
    assert health.reason == "read: ConnectionError: Connection closed by server."
    health.ok(health.ticket())
    health.failed(health.ticket(), "read", LOST)
    assert changes == [False, True, False]


def test_an_answer_from_before_the_outage_does_not_end_it() -> None:
    health = RedisHealth()
    health.ok(health.ticket())
    slow = health.ticket()
    health.failed(health.ticket(), "store", LOST)
    health.ok(slow)  # sent while Redis was up, answered just before it went
    assert health.up is False
