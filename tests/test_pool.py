"""The pool with a fake handler: no network, an injected sleep."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from fetcher.errors import JobError
from fetcher.jobs import InvalidJob
from fetcher.pool import Pool, RetryPolicy
from fetcher.results import Outcome


@dataclass
class FakeJob:
    id: str
    kind: str = "fake"
    retries: int | None = None
    meta: Any = None
    line: int = 1


class ScriptedHandler:
    """Answers each job's attempts from a script: a list of Outcomes, last one repeated."""

    def __init__(self, script: dict[str, list[Outcome]]) -> None:
        self.script = script
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def attempt(self, job: FakeJob) -> Outcome:
        n = self.calls.get(job.id, 0)
        self.calls[job.id] = n + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1
        steps = self.script.get(job.id, [Outcome({"n": n})])
        return steps[min(n, len(steps) - 1)]


async def aiter(items: list[Any]) -> Any:
    for item in items:
        yield item


def make_pool(handler: Any, results: list[dict[str, Any]], sleeps: list[float], **kw: Any) -> Pool:
    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return Pool(
        handlers={"fake": handler},
        emit=results.append,
        concurrency=kw.pop("concurrency", 4),
        policy=RetryPolicy(**kw),
        sleep=fake_sleep,
        rand=lambda: 1.0,
    )


async def test_every_job_gets_exactly_one_result() -> None:
    handler = ScriptedHandler({})
    results: list[dict[str, Any]] = []
    pool = make_pool(handler, results, [], concurrency=3)
    await pool.run(aiter([FakeJob(str(i)) for i in range(50)]))
    assert sorted(r["id"] for r in results) == sorted(str(i) for i in range(50))
    assert all(r["ok"] and r["attempts"] == 1 and r["error"] is None for r in results)
    assert handler.max_in_flight <= 3


async def test_retryable_failures_retry_with_backoff_then_succeed() -> None:
    fail = Outcome({}, JobError("connect", "refused"), retry=True)
    handler = ScriptedHandler({"a": [fail, fail, Outcome({"status": 200})]})
    results: list[dict[str, Any]] = []
    sleeps: list[float] = []
    pool = make_pool(handler, results, sleeps, retries=3, backoff_base=0.5, backoff_max=10)
    await pool.run(aiter([FakeJob("a")]))
    assert results[0]["ok"] is True
    assert results[0]["attempts"] == 3
    assert results[0]["status"] == 200
    # full jitter with rand() == 1.0 gives the cap of each step: 0.5, 1.0
    assert sleeps == [0.5, 1.0]


async def test_retries_run_out_and_attempts_are_true() -> None:
    fail = Outcome({}, JobError("timeout", "slow"), retry=True)
    handler = ScriptedHandler({"a": [fail]})
    results: list[dict[str, Any]] = []
    pool = make_pool(handler, results, [], retries=2)
    await pool.run(aiter([FakeJob("a"), FakeJob("b", retries=0)]))
    by_id = {r["id"]: r for r in results}
    assert by_id["a"]["attempts"] == 3
    assert by_id["a"]["error"] == {"type": "timeout", "message": "slow"}
    assert handler.calls["a"] == 3


async def test_retry_after_is_honoured_and_capped() -> None:
    handler = ScriptedHandler(
        {
            "a": [
                Outcome({}, JobError("http_status", "429"), retry=True, retry_after=7),
                Outcome({}),
            ],
            "b": [
                Outcome({}, JobError("http_status", "503"), retry=True, retry_after=900),
                Outcome({}),
            ],
        }
    )
    sleeps: list[float] = []
    pool = make_pool(handler, [], sleeps, concurrency=1, retry_after_max=60)
    await pool.run(aiter([FakeJob("a"), FakeJob("b")]))
    assert sleeps == [7, 60]


async def test_non_retryable_failure_is_not_retried() -> None:
    handler = ScriptedHandler({"a": [Outcome({}, JobError("blocked", "no"))]})
    results: list[dict[str, Any]] = []
    pool = make_pool(handler, results, [], retries=5)
    await pool.run(aiter([FakeJob("a")]))
    assert results[0]["attempts"] == 1
    assert handler.calls["a"] == 1


async def test_refused_jobs_are_emitted_without_attempts() -> None:
    handler = ScriptedHandler({})
    results: list[dict[str, Any]] = []
    bad = InvalidJob(id="7", line=7, kind=None, type="invalid_job", message="x", read_at="t")
    pool = make_pool(handler, results, [])
    await pool.run(aiter([bad, FakeJob("a")]))
    assert {r["id"] for r in results} == {"7", "a"}
    assert next(r for r in results if r["id"] == "7")["attempts"] == 0
    assert handler.calls == {"a": 1}


async def test_a_crashing_handler_costs_one_job_not_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Crashing(ScriptedHandler):
        async def attempt(self, job: FakeJob) -> Outcome:
            if job.id == "boom":
                raise ValueError("bug")
            return await super().attempt(job)

    results: list[dict[str, Any]] = []
    pool = make_pool(Crashing({}), results, [])
    await pool.run(aiter([FakeJob("boom"), FakeJob("fine")]))
    by_id = {r["id"]: r for r in results}
    assert by_id["boom"]["error"]["type"] == "internal"
    assert by_id["fine"]["ok"] is True


async def test_stop_drops_queued_jobs_and_lets_in_flight_finish() -> None:
    release = asyncio.Event()

    class Blocking:
        started = 0

        async def attempt(self, job: FakeJob) -> Outcome:
            self.started += 1
            await release.wait()
            return Outcome({})

    handler = Blocking()
    results: list[dict[str, Any]] = []
    pool = make_pool(handler, results, [], concurrency=2)
    run = asyncio.create_task(pool.run(aiter([FakeJob(str(i)) for i in range(100)])))
    while handler.started < 2:
        await asyncio.sleep(0)
    pool.stop()
    release.set()
    await run
    assert len(results) == 2  # only the two in flight; the rest have no line and would resume


async def test_abort_cancels_in_flight_jobs_without_results() -> None:
    class Hanging:
        async def attempt(self, job: FakeJob) -> Outcome:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    results: list[dict[str, Any]] = []
    pool = make_pool(Hanging(), results, [], concurrency=2)
    run = asyncio.create_task(pool.run(aiter([FakeJob(str(i)) for i in range(10)])))
    await asyncio.sleep(0.01)
    pool.abort()
    await run
    assert results == []


async def test_stop_before_run_runs_nothing() -> None:
    handler = ScriptedHandler({})
    results: list[dict[str, Any]] = []
    pool = make_pool(handler, results, [])
    pool.stop()  # a signal that arrived while the run was starting up
    await pool.run(aiter([FakeJob("a"), FakeJob("b")]))
    assert results == []
    assert handler.calls == {}


async def test_a_failing_source_lets_jobs_in_flight_finish() -> None:
    release = asyncio.Event()

    class Slow:
        finished = 0

        async def attempt(self, job: FakeJob) -> Outcome:
            await release.wait()
            self.finished += 1
            return Outcome({})

    async def broken_source() -> Any:
        yield FakeJob("a")
        yield FakeJob("b")
        await asyncio.sleep(0)
        release.set()
        raise OSError("disk went away")

    handler = Slow()
    results: list[dict[str, Any]] = []
    pool = make_pool(handler, results, [])
    try:
        await pool.run(broken_source())
    except OSError:
        pass
    else:
        raise AssertionError("the source's error must reach the caller")
    assert sorted(r["id"] for r in results) == ["a", "b"]  # finished before run() returned
