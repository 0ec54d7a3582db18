"""The library interface: the same engine as ``fetcher run``, for Python programs.

::

    import fetcher

    settings = fetcher.Settings(concurrency=200, retries=3)
    async with fetcher.Runner(settings) as runner:
        async for result in runner.run([{"url": "http://127.0.0.1:8000/"}]):
            print(result.id, result.ok, result.status)

    results = fetcher.run_sync(jobs, settings)   # no event loop needed

``Runner`` owns the shared HTTP session and the SMTP connection pools for as long as it is open;
``run()`` streams results in completion order with back-pressure, so a million-job generator
never piles up in memory. The CLI's ``fetcher run`` is this engine plus a job file, a results
file, resume and signals (``run.Run``); both run on ``engine.Runner``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from .config import Settings
from .engine import JobInput, Runner
from .results import Result

__all__ = ["JobInput", "Result", "Runner", "run_sync"]


def run_sync(jobs: Iterable[JobInput], settings: Settings | None = None) -> list[Result]:
    """Run ``jobs`` to completion and return their results (completion order).

    Works with or without a running event loop in the calling thread (in a notebook the jobs
    run on a private loop in a helper thread). Holds every result in memory: for big batches
    iterate ``Runner.run`` instead.
    """

    async def collect() -> list[Result]:
        async with Runner(settings) as runner:
            return [r async for r in runner.run(jobs)]

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(collect())
    box: list[list[Result] | BaseException] = []

    def in_thread() -> None:
        try:
            box.append(asyncio.run(collect()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            box.append(exc)

    thread = threading.Thread(target=in_thread, name="fetcher-run-sync")
    thread.start()
    thread.join()
    outcome = box[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
