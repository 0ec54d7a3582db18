"""A small HTTP forward proxy on asyncio streams, the way squid or tinyproxy looks to a client.

- ``CONNECT host:port`` opens a tunnel (https jobs); an absolute-form request
  (``GET http://host:port/path``) is forwarded and its answer relayed (plain-http jobs).
- With ``username``/``password`` a request without the matching ``Proxy-Authorization`` gets
  ``407`` with ``Proxy-Authenticate``, as real proxies answer.
- ``mode`` makes it refuse: ``connect_407`` (every CONNECT, whatever the credentials),
  ``connect_503`` (every CONNECT, as squid does when the origin cannot be reached),
  ``plain_407`` (every plain-http request), ``plain_503`` (every plain-http request, with
  squid's ``X-Squid-Error`` marker). ``allow`` refuses nothing but bad credentials.

It tunnels and forwards to loopback only: a test can never make it reach another address.
``seen`` records each request's method, target and whether its credentials were right.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from dataclasses import dataclass

from .base import StreamThread, copy, pipe_both

MODES = ("allow", "connect_407", "connect_503", "plain_407", "plain_503")


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    authorized: bool


class ForwardProxy(StreamThread):
    def __init__(
        self, mode: str = "allow", *, username: str | None = None, password: str | None = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        super().__init__("forward-proxy")
        self.mode = mode
        self.seen: list[Request] = []
        self._auth = (
            "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            if username is not None
            else None
        )

    def url(self, username: str | None = None, password: str | None = None) -> str:
        """The proxy URL for a config, with credentials when given."""
        userinfo = f"{username}:{password or ''}@" if username is not None else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def count(self, method: str) -> int:
        return sum(1 for r in self.seen if r.method == method)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One request a connection: each answer says `Connection: close`.
        head = await reader.readuntil(b"\r\n\r\n")
        await self._answer(head, reader, writer)

    async def _answer(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        authorized = self._auth is None or headers.get("proxy-authorization") == self._auth
        self.seen.append(Request(method, target, authorized))
        connect = method == "CONNECT"
        if not authorized or self.mode == ("connect_407" if connect else "plain_407"):
            await _refuse(writer, 407, "Proxy Authentication Required", {
                "Proxy-Authenticate": 'Basic realm="test proxy"',
            })  # fmt: skip
            return
        if self.mode == ("connect_503" if connect else "plain_503"):
            await _refuse(writer, 503, "Service Unavailable", {
                "X-Squid-Error": "ERR_CONNECT_FAIL 111",
            })  # fmt: skip
            return
        if connect:
            host, _, port = target.rpartition(":")
            await self._tunnel(host, int(port), reader, writer)
        else:
            await self._forward(method, target, headers, reader, writer)

    async def _tunnel(
        self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upstream = await _open_loopback(host, port, writer)
        if upstream is None:
            return
        up_reader, up_writer = upstream
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await pipe_both(reader, writer, up_reader, up_writer)

    async def _forward(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if not target.startswith("http://"):
            await _refuse(writer, 400, "Bad Request", {})
            return
        authority, _, path = target[len("http://") :].partition("/")
        host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "80")
        upstream = await _open_loopback(host, int(port), writer)
        if upstream is None:
            return
        up_reader, up_writer = upstream
        length = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
        kept = {
            k: v
            for k, v in headers.items()
            if k not in ("proxy-authorization", "proxy-connection", "connection", "keep-alive")
        }
        lines = [f"{method} /{path} HTTP/1.1", *(f"{k}: {v}" for k, v in kept.items())]
        lines.append("Connection: close")
        up_writer.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
        await up_writer.drain()
        # The origin closes after its answer (Connection: close); relay it as it comes.
        await copy(up_reader, writer)
        up_writer.close()


async def _open_loopback(
    host: str, port: int, writer: asyncio.StreamWriter
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        await _refuse(writer, 403, "Forbidden", {})
        return None
    try:
        return await asyncio.open_connection(host, port)
    except OSError:
        await _refuse(writer, 502, "Bad Gateway", {"X-Squid-Error": "ERR_CONNECT_FAIL 111"})
        return None


async def _refuse(
    writer: asyncio.StreamWriter, status: int, reason: str, headers: dict[str, str]
) -> None:
    body = f"{status} {reason}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    await writer.drain()
