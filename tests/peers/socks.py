"""A small SOCKS5 server on asyncio streams (RFC 1928, CONNECT only), with optional
username/password authentication (RFC 1929), the way dante or ssh -D looks to a client.

It connects to loopback only: a destination that is not a loopback address or ``localhost`` is
refused with reply 2 (not allowed by ruleset), so a test can never make it reach another
address. A destination that refuses the connection gets reply 5. ``seen`` records each
CONNECT: the address type asked for (1 IPv4, 3 a name, 4 IPv6), the host, the port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

from .base import StreamThread, pipe_both


@dataclass(frozen=True)
class Connect:
    atyp: int
    host: str
    port: int


class Socks5Proxy(StreamThread):
    def __init__(self, *, username: str | None = None, password: str | None = None) -> None:
        super().__init__("socks5-proxy")
        self._credentials = None if username is None else (username, password or "")
        self.seen: list[Connect] = []
        self.logins: list[bool] = []  # each RFC 1929 login, right or wrong

    def url(
        self, scheme: str = "socks5", username: str | None = None, password: str | None = None
    ) -> str:
        userinfo = f"{username}:{password or ''}@" if username is not None else ""
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await self._negotiate(reader, writer):
            await self._connect(reader, writer)

    async def _negotiate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        version, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        if version != 5:
            return False
        wanted = 0x00 if self._credentials is None else 0x02
        if wanted not in methods:
            writer.write(b"\x05\xff")  # no acceptable methods
            await writer.drain()
            return False
        writer.write(bytes([5, wanted]))
        await writer.drain()
        if self._credentials is None:
            return True
        # RFC 1929: VER 1, ULEN, UNAME, PLEN, PASSWD -> VER 1, STATUS
        _, ulen = await reader.readexactly(2)
        username = (await reader.readexactly(ulen)).decode()
        (plen,) = await reader.readexactly(1)
        password = (await reader.readexactly(plen)).decode()
        ok = (username, password) == self._credentials
        self.logins.append(ok)
        writer.write(b"\x01\x00" if ok else b"\x01\x01")
        await writer.drain()
        return ok

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, command, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        elif atyp == 3:
            (length,) = await reader.readexactly(1)
            host = (await reader.readexactly(length)).decode()
        else:
            await _reply(writer, 8)  # address type not supported
            return
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        self.seen.append(Connect(atyp, host, port))
        if command != 1:
            await _reply(writer, 7)  # command not supported
            return
        if not _loopback(host):
            await _reply(writer, 2)  # not allowed by ruleset
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            await _reply(writer, 5)  # connection refused
            return
        await _reply(writer, 0)
        await pipe_both(reader, writer, up_reader, up_writer)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _reply(writer: asyncio.StreamWriter, code: int) -> None:
    writer.write(bytes([5, code, 0, 1]) + b"\0\0\0\0\0\0")
    await writer.drain()
