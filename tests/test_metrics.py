"""Prometheus metrics and health endpoints, in process and on `run` / `worker` processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fetcher import Runner, Settings
from fetcher import metrics as metrics_module
from fetcher.errors import JobError
from fetcher.metrics import Metrics
from fetcher.pool import Pool, RetryPolicy
from fetcher.results import Outcome

from .redis_peer import HttpPeer, RedisPeer, free_port, http_peer, redis_peer
from .test_scaleout import FETCHER, enqueue, wait_for, write_jobs


@pytest.fixture(scope="module")
def web() -> Iterator[HttpPeer]:
    with http_peer() as peer:
        yield peer


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in page.items() if n == name)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


async def aget(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


# -- in process --------------------------------------------------------------------------------


class FakeJob:
    def __init__(self, id: str, kind: str = "http") -> None:
        self.id = id
        self.kind = kind
        self.retries: int | None = None
        self.meta = None


class FlakyHandler:
    """Fails once (retryable) for ids starting with 'r', fails for 'x', else succeeds."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def attempt(self, job: Any) -> Outcome:
        await asyncio.sleep(0.001)
        if job.id.startswith("r") and job.id not in self.seen:
            self.seen.add(job.id)
            return Outcome({}, JobError("timeout", "slow"), retry=True)
        if job.id.startswith("x"):
            return Outcome({"bytes": 0}, JobError("http_status", "HTTP 404"))
        return Outcome({"bytes": 100})


async def _jobs(ids: list[str]) -> Any:
    for i in ids:
        yield FakeJob(i)


async def test_counters_follow_the_pool() -> None:
    metrics = Metrics()
    handlers = metrics.wrap({"http": FlakyHandler()})
    pool = Pool(
        handlers=handlers,
        emit=metrics.result,
        concurrency=4,
        policy=RetryPolicy(retries=2, backoff_base=0.0),
    )
    await pool.run(_jobs(["a", "b", "r1", "r2", "x1"]))
    async with metrics.serve("127.0.0.1", 0) as port, aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            page = samples(await resp.text())
        async with s.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        async with s.get(f"http://127.0.0.1:{port}/readyz") as resp:
            # The fake handler has no session to be open; nothing else is checked.
            assert resp.status == 200
    ok = (("kind", "http"), ("outcome", "ok"))
    assert page[("fetcher_jobs_total", ok)] == 4
    assert page[("fetcher_jobs_total", (("kind", "http"), ("outcome", "http_status")))] == 1
    assert page[("fetcher_retries_total", (("kind", "http"),))] == 2
    assert page[("fetcher_attempt_duration_seconds_count", (("kind", "http"),))] == 7
    assert page[("fetcher_response_bytes_total", ())] == 400
    assert page[("fetcher_jobs_in_flight", ())] == 0


async def test_readyz_fails_until_started_and_on_a_failing_check() -> None:
    metrics = Metrics()

    async def down() -> str | None:
        return "connection refused"

    async with metrics.serve("127.0.0.1", 0) as port, aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 503
            assert "not started" in await resp.text()
        metrics.wrap({"http": FlakyHandler()})
        metrics.add_check("redis", down)
        async with s.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.text()).strip() == "redis: connection refused"


async def test_healthz_fails_after_the_event_loop_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop blocked past the threshold answers 503 once it turns again, then recovers."""
    monkeypatch.setattr(metrics_module, "STALL_SECONDS", 0.3)  # 5 s in production
    async with Metrics().serve("127.0.0.1", 0) as port, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{port}/healthz"
        async with s.get(url) as resp:
            assert resp.status == 200
        # Blocks the loop, as a CPU-bound callback would: the heartbeat due within
        # HEARTBEAT_SECONDS runs at least 1.0 - 0.5 s late.
        time.sleep(1.0)
        async with s.get(url) as resp:
            assert resp.status == 503
            assert (await resp.text()).startswith("event loop stalled for ")
        for _ in range(50):  # healthy again from the next heartbeat on
            await asyncio.sleep(metrics_module.HEARTBEAT_SECONDS / 5)
            async with s.get(url) as resp:
                if resp.status == 200:
                    break
        assert resp.status == 200


async def test_readyz_fails_once_the_session_is_closed() -> None:
    metrics = Metrics()
    async with metrics.serve("127.0.0.1", 0) as port, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{port}/readyz"
        async with Runner(Settings(), observer=metrics):
            assert await aget(s, url) == (200, "ready\n")
        assert await aget(s, url) == (503, "session: http session closed\n")


async def test_port_in_use_is_a_setup_error() -> None:
    from fetcher.errors import SetupError

    async with Metrics().serve("127.0.0.1", 0) as port:
        with pytest.raises(SetupError, match="cannot serve metrics"):
            async with Metrics().serve("127.0.0.1", port):
                pass


# -- on real processes -------------------------------------------------------------------------


def test_run_serves_metrics_while_it_runs(tmp_path: Path, web: HttpPeer) -> None:
    n = 20
    jobs = [{"id": f"q{i}", "url": f"{web.url}/ok/{i}"} for i in range(n)]
    jobs.append({"id": "slow", "url": f"{web.url}/slow/3000"})
    jobs.append({"id": "missing", "url": f"{web.url}/status/404"})
    path = write_jobs(tmp_path / "jobs.jsonl", jobs)
    port = free_port()
    proc = subprocess.Popen(
        [*FETCHER, "run", str(path), "-o", str(tmp_path / "out.jsonl"), "--metrics-port",
         str(port)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def finished_but_slow() -> bool:
            status, text = get(f"http://127.0.0.1:{port}/metrics")
            return status == 200 and total(samples(text), "fetcher_jobs_total") == n + 1

        wait_for(finished_but_slow, what="all but the slow job")
        page = samples(get(f"http://127.0.0.1:{port}/metrics")[1])
        assert page[("fetcher_jobs_in_flight", ())] == 1
        assert page[("fetcher_jobs_total", (("kind", "http"), ("outcome", "ok")))] == n
        assert page[("fetcher_jobs_total", (("kind", "http"), ("outcome", "http_status")))] == 1
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        assert proc.wait(30) == 1  # the 404
    finally:
        proc.kill()
        proc.wait()


def test_worker_metrics_match_results(tmp_path: Path, web: HttpPeer) -> None:
    with redis_peer(tmp_path) as rds:
        _worker_metrics(tmp_path, rds, web)


def _worker_metrics(tmp_path: Path, rds: RedisPeer, web: HttpPeer) -> None:
    n = 25
    jobs = [{"id": f"m{i}", "url": f"{web.url}/ok/{i}"} for i in range(n)]
    jobs += [{"id": "gone", "url": f"{web.url}/status/410"}]
    assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [*FETCHER, "worker", "--redis", rds.url, "-n", "4", "--metrics-port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: rds.client().xlen("fetcher:results") == n + 1, what="every result")

        def settled() -> bool:
            status, text = get(f"{base}/metrics")
            page = samples(text) if status == 200 else {}
            return (
                total(page, "fetcher_jobs_total") == n + 1
                and page.get(("fetcher_queue_pending_entries", ())) == 0
            )

        wait_for(settled, what="metrics to catch up")
        page = samples(get(f"{base}/metrics")[1])
        results = rds.client().xlen("fetcher:results")
        assert total(page, "fetcher_jobs_total") == results
        assert page[("fetcher_jobs_total", (("kind", "http"), ("outcome", "http_status")))] == 1
        assert page[("fetcher_queue_lag_entries", ())] == 0
        assert page[("fetcher_worker_held_entries", ())] == 0
        assert page[("fetcher_redis_up", ())] == 1
        assert get(f"{base}/healthz")[0] == 200
        assert get(f"{base}/readyz") == (200, "ready\n")
        rds.stop()
        deadline = time.monotonic() + 10
        while (ready := get(f"{base}/readyz"))[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready[0] == 503 and "redis" in ready[1]
        assert get(f"{base}/healthz")[0] == 200  # alive, just not ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_worker_queue_lag_counts_the_backlog(tmp_path: Path, web: HttpPeer) -> None:
    """50 jobs held at a gate, 5 at a time: 45 wait undelivered until the gate opens."""
    n, concurrency = 50, 5
    jobs = [{"id": f"g{i}", "url": f"{web.url}/gate/lag/{i}"} for i in range(n)]
    with redis_peer(tmp_path) as rds:
        assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [*FETCHER, "worker", "--redis", rds.url, "-n", str(concurrency),
             "--metrics-port", str(port)],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:

            def queue() -> tuple[float | None, float | None]:
                status, text = get(f"{base}/metrics")
                page = samples(text) if status == 200 else {}
                return (
                    page.get(("fetcher_queue_lag_entries", ())),
                    page.get(("fetcher_queue_pending_entries", ())),
                )

            wait_for(lambda: queue() == (n - concurrency, concurrency), what="the backlog")
            wait_for(
                lambda: sum(web.hits[f"/gate/lag/{i}"] for i in range(n)) == concurrency,
                what="the first jobs at the gate",
            )
            web.open_gate("lag")
            wait_for(lambda: rds.client().xlen("fetcher:results") == n, what="every result")
            wait_for(lambda: queue() == (0, 0), what="the lag to drop")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            proc.kill()
            proc.wait()
