"""What happened on the wire: the peer of a response (always) and, with ``--trace``, the
phases of an attempt and the TLS session that carried it.

``remote_addr`` and ``http_version`` cost one ``getpeername`` per response, taken when the
response starts: aiohttp lets go of the connection as soon as a small body is in, before
``request()`` even returns.

``--trace`` notes its moments from the connector's own steps and the transport's own info,
not from an ``aiohttp.TraceConfig``: a session with a TraceConfig, even an empty one, builds
every signal's parameters (and a URL with its query) on every request, listener or not, which
alone cost 4-6 % of a run of small pages. The hooks are installed only under ``--trace``
(``trace_connector``), so a run without it pays nothing. One ``Wire`` per attempt, found
through a context variable (every hook runs in the request's task, or in a task it started),
collects the moments of the final hop:

    connect() ─ dns ─ connect ─ tls ─┬─ ready ─ ttfb ─ download
    (each hop asks for a connection)  reused ─┘

Each ``connect()`` starts a new hop: the first one, the one after a redirect, and aiohttp's own
retry after a dropped keep-alive connection. A new connection is made in ``_create_connection``
(its start), TCP and TLS together; the boundary between the two is the moment the connector
asks for the connection's protocol object, which the event loop does once the socket is
connected and before the TLS handshake starts (also after an HTTP proxy's CONNECT, and after
a SOCKS handshake). ``dns`` is the resolver's call, made only on a miss of the DNS cache.
The TLS facts are read once per connection (a reused one keeps its certificate), when the
line is built.
"""

from __future__ import annotations

import socket
import ssl
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from time import monotonic_ns
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
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


class TracedResponse(aiohttp.ClientResponse):
    """With --trace: a PeerResponse that also notes when the status line and headers were in,
    and the TLS session of the connection (for the final hop, the last one noted wins).
    Not a subclass of PeerResponse: one coroutine frame less on every response."""

    peername: Any = None

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        # The transport before the headers are read: a small body lets it go in the meantime.
        transport = connection.transport
        if transport is not None:
            self.peername = transport.get_extra_info("peername")
        resp = await super().start(connection)
        wire = CURRENT.get()
        if wire is not None:
            wire.headers = monotonic_ns()
            wire.ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
        return resp


@dataclass(slots=True)
class Wire:
    """Moments (``time.monotonic_ns()``) of one attempt's current hop, and its TLS session."""

    dns_start: int | None = None
    dns_end: int | None = None
    create_start: int | None = None
    tcp_end: int | None = None
    ready: int | None = None
    headers: int | None = None
    ssl_object: ssl.SSLObject | None = None

    def new_hop(self) -> None:
        self.dns_start = self.dns_end = self.create_start = self.tcp_end = None
        self.ready = self.headers = None
        self.ssl_object = None

    def timings(self, done: int | None) -> dict[str, float | None]:
        """The phases of the hop in milliseconds, null for one that did not happen."""
        dns = connect = tls = ttfb = download = None
        ready, headers, tcp_end = self.ready, self.headers, self.tcp_end
        if self.dns_start is not None and self.dns_end is not None:
            dns = _ms(self.dns_start, self.dns_end)
        if self.create_start is not None:
            begin = self.dns_end if self.dns_end is not None else self.create_start
            end = tcp_end if tcp_end is not None else ready
            if end is not None:
                connect = _ms(begin, end)
            if self.ssl_object is not None and tcp_end is not None and ready is not None:
                tls = _ms(tcp_end, ready)
        if headers is not None and ready is not None:
            ttfb = _ms(ready, headers)
            if done is not None:
                download = _ms(headers, done)
        return {
            "dns_ms": dns,
            "connect_ms": connect,
            "tls_ms": tls,
            "ttfb_ms": ttfb,
            "download_ms": download,
        }


def _ms(start: int, end: int) -> float:
    """Nanoseconds to milliseconds with three decimals, in integers: ``round(x, 3)`` of a
    float goes through its decimal digits, several times dearer on every line."""
    return (end - start + 500) // 1000 / 1000


class _TimedResolver(AbstractResolver):
    """The connector's resolver, noting the lookup's start and end in the attempt's Wire.
    aiohttp calls it only on a miss of its DNS cache, in a task started by the first request
    that missed (a copy of that request's context): requests that wait for the same lookup,
    or find the answer cached, have no ``dns`` phase."""

    def __init__(self, resolver: AbstractResolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        wire = CURRENT.get()
        if wire is None:
            return await self._resolver.resolve(host, port, family)
        wire.dns_start = monotonic_ns()
        try:
            return await self._resolver.resolve(host, port, family)
        finally:
            wire.dns_end = monotonic_ns()

    async def close(self) -> None:
        await self._resolver.close()


def trace_connector(connector: aiohttp.TCPConnector) -> None:
    """Make ``connector`` note the moments of each traced hop (see the module's docstring).

    The hooks wrap the instance's own steps (``connect``, ``_create_connection``, the protocol
    factory, the resolver), so they work the same for every TCPConnector subclass, SOCKS
    included, and cost one ``ContextVar.get`` when the request is not traced (robots.txt)."""
    connect = connector.connect
    create_connection = connector._create_connection
    make_protocol = connector._factory

    async def traced_connect(
        req: ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        wire = CURRENT.get()
        if wire is None:
            return await connect(req, traces, timeout)
        if wire.create_start is not None or wire.ready is not None:
            wire.new_hop()  # a hop before this one got as far as the connector: forget it
        conn = await connect(req, traces, timeout)
        wire.ready = monotonic_ns()  # from the pool, or new: the request can be sent
        return conn

    async def traced_create_connection(
        req: ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        wire = CURRENT.get()
        if wire is not None:
            wire.create_start = monotonic_ns()
        return await create_connection(req, traces, timeout)

    def factory() -> Any:
        wire = CURRENT.get()
        if wire is not None:
            wire.tcp_end = monotonic_ns()
        return make_protocol()

    connector.connect = traced_connect  # type: ignore[method-assign]
    connector._create_connection = traced_create_connection  # type: ignore[method-assign]
    connector._factory = factory  # type: ignore[assignment]
    connector._resolver = _TimedResolver(connector._resolver)


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


#  The facts of each TLS session seen, for as long as its connection lives: read once, not on
#  every request the connection carries.
_SESSIONS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def session_facts(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> dict[str, Any] | None:
    """``tls_facts`` of the connection's session (null for plain http), each result its own
    copy: a result line's fields are the caller's to change."""
    if ssl_object is None:
        return None
    facts = _SESSIONS.get(ssl_object)
    if facts is None:
        facts = _SESSIONS[ssl_object] = tls_facts(ssl_object)
    cert = facts["cert"]
    return {**facts, "cert": None if cert is None else {**cert, "san": list(cert["san"])}}


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
