"""Deadlines kept by one sweep: a late section times out, nothing else is ever cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from fetcher.deadline import Deadlines

TICK = 0.01


async def _section(
    deadlines: Deadlines, seconds: float, work: float, started: asyncio.Event | None = None
) -> str:
    task = deadlines.start(seconds)
    if started is not None:
        started.set()
    try:
        await asyncio.sleep(work)
        return "done"
    except asyncio.CancelledError:
        if deadlines.passed(task):
            return "timeout"
        raise
    finally:
        deadlines.stop(task)


async def test_a_section_past_its_deadline_times_out_and_the_task_goes_on() -> None:
    deadlines = Deadlines(tick=TICK)
    loop = asyncio.get_running_loop()

    async def job() -> tuple[str, int, str]:
        started = loop.time()
        outcome = await _section(deadlines, 0.05, 10)
        assert loop.time() - started < 1
        # The cancellation was ours and is undone: the task's next await is not cancelled.
        cancelling = asyncio.current_task().cancelling()  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        return outcome, cancelling, "after"

    assert await asyncio.create_task(job()) == ("timeout", 0, "after")
    deadlines.close()


async def test_a_section_that_finishes_in_time_is_never_cancelled_later() -> None:
    deadlines = Deadlines(tick=TICK)

    async def job() -> tuple[str, str]:
        outcome = await _section(deadlines, 0.05, 0)
        await asyncio.sleep(0.15)  # well past the section's deadline, outside it
        return outcome, "after"

    assert await asyncio.create_task(job()) == ("done", "after")
    deadlines.close()


async def test_a_cancellation_from_outside_goes_through_even_past_the_deadline() -> None:
    deadlines = Deadlines(tick=TICK)
    started = asyncio.Event()
    task = asyncio.create_task(_section(deadlines, 0.02, 10, started))
    await started.wait()
    # Past the deadline, the sweep cancels the task and so does its owner, before it runs again.
    time.sleep(0.05)
    deadlines._sweep()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadlines.close()


async def test_a_section_that_swallows_the_cancellation_leaves_the_task_clean() -> None:
    deadlines = Deadlines(tick=TICK)

    async def job() -> int:
        task = deadlines.start(0.02)
        try:
            with contextlib.suppress(asyncio.CancelledError):  # what a careless library does
                await asyncio.sleep(10)
        finally:
            deadlines.stop(task)
        await asyncio.sleep(0.05)
        return task.cancelling()

    assert await asyncio.create_task(job()) == 0
    deadlines.close()


async def test_many_sections_one_timer() -> None:
    deadlines = Deadlines(tick=TICK)
    outcomes = await asyncio.gather(
        *(asyncio.create_task(_section(deadlines, 0.05, 0.2 if i % 2 else 0)) for i in range(200))
    )
    assert outcomes.count("timeout") == 100
    assert outcomes.count("done") == 100
    deadlines.close()
