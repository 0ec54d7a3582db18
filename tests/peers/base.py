"""A server thread: an event loop of its own, so sync tests can block on a subprocess while
the peer answers it, and async tests on another loop can use it alike."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

from aiohttp import web

T = TypeVar("T")


class LoopThread:
    """Subclasses write ``_start()`` (bind, set ``self.port``) and ``_stop()``."""

    def __init__(self, name: str) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the peer's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> None:
        self._thread.start()
        self.call(self._start())

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            # Settled on the peer's own loop: the caller may be running a loop of its own.
            self.call(_settle())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


async def _settle() -> None:
    """End what still runs on this loop (handlers waiting on a peer that never hung up)."""
    this = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not this]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class AppThread(LoopThread):
    """An aiohttp.web application on 127.0.0.1, port 0, served from its own thread: over https
    when given an SSL context. Subclasses build the application in ``make_app`` (called on the
    peer's loop); ``runner_options`` go to ``web.AppRunner``."""

    def __init__(
        self, name: str, *, ssl_context: ssl.SSLContext | None = None, **runner_options: Any
    ) -> None:
        super().__init__(name)
        self._ssl = ssl_context
        self._options: dict[str, Any] = {"access_log": None, "shutdown_timeout": 0.1}
        self._options.update(runner_options)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    def make_app(self) -> web.Application:
        raise NotImplementedError

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.make_app(), **self._options)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class StreamThread(LoopThread):
    """A raw asyncio stream server on 127.0.0.1, port 0, from its own thread (the proxies):
    subclasses answer one connection in ``_handle``; the connections still open are cancelled
    when it stops."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client went away or sent garbage: nothing to answer
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Relay bytes both ways between a client and the upstream it asked for, to the end."""
    try:
        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
    finally:
        up_writer.close()


async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Bytes from ``src`` to ``dst`` until ``src`` ends, then end ``dst`` too."""
    with contextlib.suppress(ConnectionError):
        while chunk := await src.read(65536):
            dst.write(chunk)
            await dst.drain()
    with contextlib.suppress(OSError):
        if dst.can_write_eof():
            dst.write_eof()
