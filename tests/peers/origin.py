"""The fault server of tests/app.py on its own thread, over http or (with an SSL context) https."""

from __future__ import annotations

import ssl

from aiohttp import web

from tests.app import make_app

from .base import AppThread


class Origin(AppThread):
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__("origin", ssl_context=ssl_context)

    def make_app(self) -> web.Application:
        return make_app()
