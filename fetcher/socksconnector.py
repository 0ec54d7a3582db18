"""aiohttp-socks' ``ProxyConnector`` with the bounded idle pool and the network policy
(socks.py says how SOCKS proxies are used; this module is imported with the first one).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp.client_proto import ResponseHandler
from aiohttp_socks import ProxyConnector, ProxyType
from yarl import URL

from .connector import BoundedConnector
from .netpolicy import BlockedAddress, NetworkPolicy
from .socks import SCHEMES


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


def connector_options(proxy: str) -> dict[str, Any]:
    """``ProxyConnector`` keyword arguments of a SOCKS proxy URL (credentials included:
    they never leave this dict)."""
    url = URL(proxy)
    scheme = url.scheme.lower()
    proxy_type = ProxyType.SOCKS5 if scheme.startswith("socks5") else ProxyType.SOCKS4
    return {
        "proxy_type": proxy_type,
        "host": url.host or "",
        "port": url.port or 1080,
        "username": url.user,
        "password": url.password,
        "rdns": SCHEMES[scheme],
    }
