"""Which destination addresses a run may connect to.

The check runs in the connector's socket factory, on the address about to be connected, so it
holds for names that resolve there, for IP literals (which never reach the resolver), for every
redirect hop and against DNS rebinding: no earlier lookup is trusted.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#  Refused whatever the config says: link-local (where cloud metadata services live) and the
#  metadata addresses that are not link-local.
ALWAYS_DENIED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")
)
#  Refused with block_private: loopback, RFC 1918, CGNAT, unique-local IPv6, and the unspecified
#  addresses (connecting to 0.0.0.0 reaches the local host on Linux).
PRIVATE: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "0.0.0.0/8",
        "::1/128",
        "::/128",
        "fc00::/7",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

BLOCKED_MARK = "refused by the network policy"


class BlockedAddress(OSError):
    """Raised from the socket factory for a refused destination."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(errno.EACCES, f"{address} {BLOCKED_MARK} ({reason})")
        self.address = address


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped or NAT64), if any."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class NetworkPolicy:
    def __init__(
        self,
        *,
        block_private: bool = False,
        deny: Iterable[str] = (),
        allow: Iterable[str] = (),
    ) -> None:
        self._refused = (PRIVATE if block_private else ()) + tuple(
            ipaddress.ip_network(n, strict=False) for n in deny
        )
        self._allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allow)

    def refusal(self, address: str) -> str | None:
        """Why ``address`` may not be connected to, or None when it may."""
        try:
            ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        candidates = [ip]
        if (v4 := _embedded_v4(ip)) is not None:
            candidates.append(v4)
        for cand in candidates:
            if any(cand in net for net in ALWAYS_DENIED if net.version == cand.version):
                return "link-local or cloud metadata address"
        for cand in candidates:
            if any(cand in net for net in self._refused if net.version == cand.version) and not any(
                cand in net for net in self._allowed if net.version == cand.version
            ):
                return "private or denied network"
        return None

    def socket_factory(self, addr_info: Any) -> socket.socket:
        """aiohttp's ``socket_factory`` hook: refuse before the socket connects."""
        family, type_, proto, _, sockaddr = addr_info
        reason = self.refusal(sockaddr[0])
        if reason is not None:
            raise BlockedAddress(sockaddr[0], reason)
        return socket.socket(family=family, type=type_, proto=proto)

    def proxied_destination_check(self, pinned: Mapping[str, str]) -> ClientMiddlewareType:
        """A client middleware that checks each request's own host, for runs through a proxy.

        Through a proxy the only socket this process opens goes to the proxy, so the socket
        factory sees the proxy's address, never the destination's. This middleware runs for
        every redirect hop and refuses destinations it can judge locally: IP literals and
        pinned names. Other names are resolved by the proxy, out of this process's sight.
        """
        pins = {k.lower().rstrip("."): v for k, v in pinned.items()}

        async def check(req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
            host = (req.url.host or "").lower().rstrip(".")
            address = pins.get(host, host.strip("[]"))
            try:
                ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return await handler(req)  # a name: the proxy resolves it
            reason = self.refusal(address)
            if reason is not None:
                raise BlockedAddress(address, reason)
            return await handler(req)

        return check


def is_blocked_error(exc: BaseException) -> bool:
    """True when an OSError (possibly combined by happy eyeballs) came from a refusal."""
    return isinstance(exc, BlockedAddress) or BLOCKED_MARK in str(exc)
