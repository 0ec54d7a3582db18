"""What happened on the wire: the peer of a response (always) and, with ``--trace``, the
phases of an attempt and the TLS session that carried it.

``remote_addr`` and ``http_version`` cost one ``getpeername`` per response, taken when the
response starts: aiohttp lets go of the connection as soon as a small body is in, before
``request()`` even returns.

``--trace`` adds an ``aiohttp.TraceConfig`` to the session (only then: its callbacks run for every
request, so a run without ``--trace`` pays nothing). One ``Wire`` per attempt collects the
moments of the final hop (a redirect starts a new hop):

    hop start ─ dns ─ connect ─ tls ─┬─ ttfb ─ download
    (request or redirect)   reused ──┘

aiohttp reports a new connection as one event, TCP and TLS together. The boundary between the
two is the moment the connector asks for the connection's protocol object, which the event loop
does once the socket is connected and before the TLS handshake starts (also after an HTTP
proxy's CONNECT, and after a SOCKS handshake). That call happens in the request's task, so
the attempt's ``Wire`` is found through a context variable.
"""

from __future__ import annotations

import socket
import ssl
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp.connector import Connection

#  The attempt being traced in this task, if any.
CURRENT: ContextVar[Wire | None] = ContextVar("fetcher_wire", default=None)


def peer_text(address: Any) -> str | None:
    """``"ip:port"`` of a ``getpeername()`` answer (IPv6 in brackets, as in a URL)."""
    if not address or not isinstance(address, tuple):
        return None  # a Unix socket, or no socket at all
    host = address[0]
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


class PeerResponse(aiohttp.ClientResponse):
    """A response that remembers the address it came from (``remote_addr``,
    ``WARC-IP-Address``), taken when the response starts."""

    peername: Any = None

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        transport = connection.transport
        if transport is not None:
            self.peername = transport.get_extra_info("peername")
        return await super().start(connection)


class TracedResponse(PeerResponse):
    """With --trace: also notes when the status line and headers were in, and the TLS
    session of the connection (for the final hop, the last one noted wins)."""

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        # The transport before the headers are read: a small body lets it go in the meantime.
        transport = connection.transport
        resp = await super().start(connection)
        wire = CURRENT.get()
        if wire is not None:
            wire.headers = time.monotonic()
            ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
            wire.tls = None if ssl_object is None else tls_facts(ssl_object)
        return resp


@dataclass(slots=True)
class Wire:
    """Moments (``time.monotonic()``) of one attempt's current hop."""

    hop: float = field(default_factory=time.monotonic)
    dns_start: float | None = None
    dns_end: float | None = None
    create_start: float | None = None
    tcp_end: float | None = None
    ready: float | None = None
    headers: float | None = None
    tls: dict[str, Any] | None = None

    def new_hop(self) -> None:
        self.hop = time.monotonic()
        self.dns_start = self.dns_end = self.create_start = self.tcp_end = None
        self.ready = self.headers = None
        self.tls = None

    def timings(self, done: float | None) -> dict[str, float | None]:
        """The phases of the hop in milliseconds, null for one that did not happen."""
        dns = connect = tls = ttfb = download = None
        ready, headers = self.ready, self.headers
        if self.dns_start is not None and self.dns_end is not None:
            dns = round((self.dns_end - self.dns_start) * 1000, 3)
        if self.create_start is not None:
            begin = self.dns_end if self.dns_end is not None else self.create_start
            end = self.tcp_end if self.tcp_end is not None else ready
            if end is not None:
                connect = round((end - begin) * 1000, 3)
            if self.tls is not None and self.tcp_end is not None and ready is not None:
                tls = round((ready - self.tcp_end) * 1000, 3)
        if headers is not None:
            ttfb = round((headers - (self.hop if ready is None else ready)) * 1000, 3)
            if done is not None:
                download = round((done - headers) * 1000, 3)
        return {
            "dns_ms": dns,
            "connect_ms": connect,
            "tls_ms": tls,
            "ttfb_ms": ttfb,
            "download_ms": download,
        }


#  The callbacks: ``trace_request_ctx`` is the attempt's Wire, or None for a request of
#  fetcher's own (robots.txt), which is not traced.


async def _new_hop(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    if (wire := ctx.trace_request_ctx) is not None:
        wire.new_hop()


async def _dns_start(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    if (wire := ctx.trace_request_ctx) is not None:
        wire.dns_start = time.monotonic()


async def _dns_end(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    if (wire := ctx.trace_request_ctx) is not None:
        wire.dns_end = time.monotonic()


async def _create_start(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    if (wire := ctx.trace_request_ctx) is not None:
        wire.create_start = time.monotonic()


async def _ready(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    if (wire := ctx.trace_request_ctx) is not None:
        wire.ready = time.monotonic()


def trace_config() -> aiohttp.TraceConfig:
    """The session's TraceConfig under --trace: each callback notes one moment in the
    request's ``Wire`` (passed as ``trace_request_ctx``; a new Wire is its first hop's start)."""
    config = aiohttp.TraceConfig()
    config.on_request_redirect.append(_new_hop)
    config.on_dns_resolvehost_start.append(_dns_start)
    config.on_dns_resolvehost_end.append(_dns_end)
    config.on_connection_create_start.append(_create_start)
    config.on_connection_create_end.append(_ready)
    config.on_connection_reuseconn.append(_ready)
    return config


def time_tcp_connected(connector: aiohttp.BaseConnector) -> None:
    """Make ``connector`` note the end of TCP connect (see the module's docstring)."""
    make_protocol = connector._factory

    def factory() -> Any:
        wire = CURRENT.get()
        if wire is not None:
            wire.tcp_end = time.monotonic()
        return make_protocol()

    connector._factory = factory  # type: ignore[assignment]


# -- TLS ------------------------------------------------------------------------------------------

#  RFC 4514's short names for the attribute types ``getpeercert()`` spells out.
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def tls_facts(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """``{"version", "cipher", "cert"}`` of a TLS session. ``cert`` is null when the
    certificate was not verified (--insecure): Python decodes only a verified one."""
    cipher = ssl_object.cipher()
    return {
        "version": ssl_object.version(),
        "cipher": None if cipher is None else cipher[0],
        "cert": cert_facts(ssl_object.getpeercert()),
    }


def cert_facts(cert: dict[str, Any] | None) -> dict[str, Any] | None:
    """subject and issuer as RFC 4514 strings, not_after as ISO 8601 UTC, the SAN values."""
    if not cert:
        return None
    not_after = cert.get("notAfter")
    when = (
        None
        if not_after is None
        else datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC)
    )
    return {
        "subject": _dn(cert.get("subject", ())),
        "issuer": _dn(cert.get("issuer", ())),
        "not_after": None if when is None else when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "san": [_san_value(kind, value) for kind, value in cert.get("subjectAltName", ())],
    }


def _dn(rdns: Any) -> str:
    # RFC 4514 writes the most specific part first: the reverse of the certificate's order.
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = "".join(f"\\{c}" if c in ',+"\\<>;' else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _san_value(kind: str, value: str) -> str:
    if kind == "IP Address" and ":" in value:
        # Python writes an IPv6 SAN in full, one group of hex digits per colon.
        try:
            return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, value))
        except OSError:
            return value
    return value
