"""The fault server of tests/app.py on its own thread, over http or (with an SSL context) https."""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web

from tests.app import make_app

from .base import LoopThread


class Origin(LoopThread):
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__("origin")
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(), shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
