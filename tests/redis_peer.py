"""Real peers for the scale-out tests: a redis-server process and a small HTTP target.

``RedisPeer`` runs the ``redis-server`` binary on a free loopback port in a temporary directory,
with no snapshots (``--save ''``) unless a test asks for one with ``restart()``, which saves,
stops and starts the server again on the same port, the way a Redis restart looks to workers.

Without the binary the tests are skipped, except in CI (``CI`` set), where they must run: a
missing redis-server there fails them.

``HttpPeer`` is an aiohttp.web application on 127.0.0.1, port 0, served from its own thread so
that tests can block on subprocesses while it answers the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiohttp import web

from tests.peers.base import AppThread


def redis_binary() -> str:
    """The redis-server path; skips the test when missing (fails it in CI)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI must run the Redis tests")
        pytest.skip("redis-server is not installed")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class RedisPeer:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.dir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start on ``self.port`` (a free one the first time); waits until PING answers."""
        for _ in range(5):
            port = self.port or free_port()
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.dir),
                    "--dbfilename", "dump.rdb",
                    "--loglevel", "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self.port = port
            if self._wait_ready():
                return
            self.proc.kill()
            self.proc.wait()
            time.sleep(0.2)
        raise RuntimeError("redis-server did not start")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(redis.exceptions.RedisError):
                if self.client().ping():
                    return True
            time.sleep(0.05)
        return False

    def stop(self, *, save: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if save:
            # SHUTDOWN SAVE writes a snapshot even with `--save ''`: the restart keeps the data.
            with contextlib.suppress(redis.exceptions.ConnectionError):
                self.client().shutdown(save=True)
            self.proc.wait(10)
        else:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, down_for: float = 0.0) -> None:
        """Save, stop, stay down ``down_for`` seconds, start again on the same port."""
        self.stop(save=True)
        time.sleep(down_for)
        self.start()


@contextlib.contextmanager
def redis_peer(workdir: Path) -> Iterator[RedisPeer]:
    peer = RedisPeer(redis_binary(), workdir)
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


class HttpPeer(AppThread):
    """Routes: /ok/{name} (200), /status/{code}, /slow/{ms}, /hang/{key} (never answers),
    /gate/{gate}/{key} (answers 200 once the test calls ``open_gate(gate)``).

    ``hits`` counts requests per path, so a test can tell when a worker has reached a job.
    """

    def __init__(self) -> None:
        super().__init__("http-peer")
        self.hits: Counter[str] = Counter()
        self._gates: dict[str, asyncio.Event] = {}  # used on the server's loop only

    def open_gate(self, gate: str) -> None:
        """Let every request to /gate/{gate}/..., waiting or still to come, have its answer."""
        self._loop.call_soon_threadsafe(lambda: self._gate(gate).set())

    def _gate(self, gate: str) -> asyncio.Event:
        return self._gates.setdefault(gate, asyncio.Event())

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ok/{name}", self._ok)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/slow/{ms}", self._slow)
        app.router.add_get("/hang/{key}", self._hang)
        app.router.add_get("/gate/{gate}/{key}", self._gated)
        return app

    def _count(self, request: web.Request) -> None:
        self.hits[request.path] += 1

    async def _ok(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(text=f"hello {request.match_info['name']}\n")

    async def _status(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(status=int(request.match_info["code"]), text="status\n")

    async def _slow(self, request: web.Request) -> web.Response:
        self._count(request)
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.Response(text="slow\n")

    async def _hang(self, request: web.Request) -> web.Response:
        self._count(request)
        await asyncio.sleep(3600)
        return web.Response(text="never\n")

    async def _gated(self, request: web.Request) -> web.Response:
        self._count(request)
        await self._gate(request.match_info["gate"]).wait()
        return web.Response(text="opened\n")


@contextlib.contextmanager
def http_peer() -> Iterator[HttpPeer]:
    peer = HttpPeer()
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()
