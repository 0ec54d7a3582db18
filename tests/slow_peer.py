"""A slow local HTTP peer for subprocess tests: /slow?ms=N answers after N ms."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import orjson
from aiohttp import web

from tests.peers.base import AppThread


class SlowServer(AppThread):
    """An aiohttp app on 127.0.0.1:0 in a thread: /slow?ms=N answers after N ms."""

    def __init__(self) -> None:
        super().__init__("slow-peer", handler_cancellation=True)
        self.in_flight: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/slow", self._slow)
        return app

    async def _slow(self, request: web.Request) -> web.Response:
        tag = request.query.get("tag", "")
        self.in_flight[tag] += 1
        self.requests[tag] += 1
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


def write_jobs(path: Path, port: int, n: int, ms: int) -> set[str]:
    """Jobs tagged with their directory's name, so the server can count each test's requests."""
    tag = path.parent.name
    with path.open("w") as f:
        for i in range(n):
            url = f"http://127.0.0.1:{port}/slow?ms={ms}&tag={tag}&i={i}"
            f.write(f'{{"id": "j{i}", "url": "{url}"}}\n')
    return {f"j{i}" for i in range(n)}


def assert_each_id_once(path: Path, ids: set[str]) -> None:
    """The results file has exactly one line for each of ``ids``, and no other."""
    counts = Counter(r["id"] for r in read_results(path))
    assert set(counts) == ids
    assert max(counts.values()) == 1


def read_results(path: Path) -> list[dict[str, object]]:
    """Every line must be a whole JSON object."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "output ends in a torn line"
    return [orjson.loads(line) for line in data.splitlines()]
