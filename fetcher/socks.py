"""SOCKS proxies (``socks5://``, ``socks5h://``, ``socks4://``, ``socks4a://``) through
aiohttp-socks, whose ``ProxyConnector`` is a ``TCPConnector`` with its own connect path.

A connector serves one proxy, so each SOCKS proxy a run uses gets a session of its own, made
like the run's main one (same headers, limits, TLS, middlewares): ``SocksSessions`` keeps them,
at most ``MAX_PROXIES``, the least recently used idle one closed first.

The connector itself (socksconnector.py) is imported with the first SOCKS proxy a run meets:
a run without one never loads aiohttp-socks (about 65M instructions and 0.5 MB at start-up).

The network policy through SOCKS: aiohttp-socks opens the socket to the proxy itself, so the
policy's socket factory never sees it. its ``PolicedSocksConnector`` checks the proxy's address
before each connection, and for the types that resolve names here (``socks5``, ``socks4``) the
destination's addresses too. With ``socks5h`` / ``socks4a`` the proxy resolves the names: the
policy then judges only the proxy's address, IP literals and pinned names (the middleware of
netpolicy.py), as for an HTTP proxy.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

#  scheme -> names resolved by the proxy
SCHEMES = {"socks5": False, "socks5h": True, "socks4": False, "socks4a": True}
MAX_PROXIES = 32


def is_socks(proxy: str) -> bool:
    return proxy.split(":", 1)[0].lower() in SCHEMES


def socks_error_kind(exc: BaseException) -> str | None:
    """``"timeout"``, ``"connect"`` or ``"handshake"`` for an error of the SOCKS libraries,
    None for any other. Their classes are looked up only if they are loaded: until then
    nothing can have raised one."""
    for name in ("aiohttp_socks", "python_socks"):
        module = sys.modules.get(name)
        if module is None:
            continue
        if isinstance(exc, module.ProxyTimeoutError):
            return "timeout"
        if isinstance(exc, module.ProxyConnectionError):
            return "connect"
        if isinstance(exc, module.ProxyError):
            return "handshake"
    return None


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
