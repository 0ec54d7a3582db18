"""SOCKS proxies (``socks5://``, ``socks5h://``, ``socks4://``, ``socks4a://``) through
aiohttp-socks, whose ``ProxyConnector`` is a ``TCPConnector`` with its own connect path.

A connector serves one proxy, so each SOCKS proxy a run uses gets a session of its own, made
like the run's main one (same headers, limits, TLS, middlewares): ``SocksSessions`` keeps them,
at most ``MAX_PROXIES``, the least recently used idle one closed first.

The network policy through SOCKS: aiohttp-socks opens the socket to the proxy itself, so the
policy's socket factory never sees it. ``PolicedSocksConnector`` checks the proxy's address
before each connection, and for the types that resolve names here (``socks5``, ``socks4``) the
destination's addresses too. With ``socks5h`` / ``socks4a`` the proxy resolves the names: the
policy then judges only the proxy's address, IP literals and pinned names (the middleware of
netpolicy.py), as for an HTTP proxy.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp_socks import ProxyConnector, ProxyType
from yarl import URL

from .connector import BoundedConnector
from .netpolicy import BlockedAddress, NetworkPolicy

#  scheme -> (type, names resolved by the proxy)
SCHEMES = {
    "socks5": (ProxyType.SOCKS5, False),
    "socks5h": (ProxyType.SOCKS5, True),
    "socks4": (ProxyType.SOCKS4, False),
    "socks4a": (ProxyType.SOCKS4, True),
}
MAX_PROXIES = 32


def is_socks(proxy: str) -> bool:
    return proxy.split(":", 1)[0].lower() in SCHEMES


class PolicedSocksConnector(BoundedConnector, ProxyConnector):
    """aiohttp-socks' connector, with the bounded idle pool and the network policy."""

    def __init__(
        self,
        *,
        policy: NetworkPolicy,
        resolve: Callable[[str, int], Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._policy = policy
        self._lookup = resolve

    async def _connect_via_proxy(
        self,
        host: str,
        port: int,
        ssl: ssl.SSLContext | None = None,
        timeout: float | None = None,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        await self._check(self._proxy_host, self._proxy_port)
        if not self._rdns:
            # The names resolved here are resolved again by aiohttp-socks, from the same
            # system resolver: the address checked is the address the proxy is asked for.
            await self._check(host, port)
        return await super()._connect_via_proxy(host, port, ssl=ssl, timeout=timeout)

    async def _check(self, host: str, port: int) -> None:
        try:
            addresses = [host.strip("[]")] if _is_literal(host) else await self._lookup(host, port)
        except OSError:
            return  # aiohttp-socks reports the failed lookup itself
        for address in addresses:
            reason = self._policy.refusal(address)
            if reason is not None:
                raise BlockedAddress(address, reason)


def _is_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host.strip("[]"))
    except OSError:
        return False
    return True


@dataclass(slots=True)
class _Entry:
    session: aiohttp.ClientSession
    users: int = 0


class SocksSessions:
    """One session per SOCKS proxy URL; ``make(url)`` builds one."""

    def __init__(
        self,
        make: Callable[[str], aiohttp.ClientSession],
        max_proxies: int = MAX_PROXIES,
    ) -> None:
        self._make = make
        self._max = max_proxies
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def acquire(self, proxy: str) -> aiohttp.ClientSession:
        entry = self._entries.get(proxy)
        if entry is None:
            entry = self._entries[proxy] = _Entry(self._make(proxy))
            self._evict()
        else:
            self._entries.move_to_end(proxy)
        entry.users += 1
        return entry.session

    def release(self, proxy: str) -> None:
        entry = self._entries.get(proxy)
        if entry is not None:
            entry.users -= 1

    def _evict(self) -> None:
        while len(self._entries) > self._max:
            idle = next((k for k, e in self._entries.items() if e.users == 0), None)
            if idle is None:
                return  # every one in use: over the bound until one is let go
            task = asyncio.create_task(self._entries.pop(idle).session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        sessions = [e.session for e in self._entries.values()]
        self._entries.clear()
        await asyncio.gather(*(s.close() for s in sessions), *self._closing)


def connector_options(proxy: str) -> dict[str, Any]:
    """``ProxyConnector`` keyword arguments of a SOCKS proxy URL (credentials included:
    they never leave this dict)."""
    url = URL(proxy)
    proxy_type, rdns = SCHEMES[url.scheme.lower()]
    return {
        "proxy_type": proxy_type,
        "host": url.host or "",
        "port": url.port or 1080,
        "username": url.user,
        "password": url.password,
        "rdns": rdns,
    }
