"""aiohttp's TCPConnector with a bound on idle keep-alive connections across all hosts.

aiohttp's ``limit`` counts only the connections in use (``_available_connections`` subtracts
``len(self._acquired)``). A connection released after its response waits for reuse in a per-host
deque (``self._conns[key]``) until ``keepalive_timeout``, and nothing bounds the sum of those
deques. One busy host needs no more idle connections than the concurrency; a job file over
thousands of hosts leaves one or more idle sockets behind at every host it touched, so open
sockets (and their buffers, TLS state above all) grow with the number of hosts, past the fd limit.

``BoundedConnector`` keeps aiohttp's pool and connection logic as they are and adds one
``OrderedDict`` of the idle connections in the order they were released: ``_release`` appends
(after aiohttp has put the connection in its per-host deque), ``_get`` takes out the one it hands
back for reuse. When more than ``idle_limit`` are waiting, the least recently released is taken
out of its host's deque and closed. So open sockets stay at most ``limit`` in use plus
``idle_limit`` idle, whatever the number of hosts, and a busy host keeps its warm connections,
the most recently used ones.

How many idle connections are worth keeping depends on the job file: over a list of distinct
hosts (one URL per domain) an idle connection is never used again and only costs memory; over
a few thousand hosts that come back, closing it means a new TCP (and TLS) handshake each time.
``idle_limit`` therefore adapts between ``min_idle`` and ``max_idle`` the way ARC sizes its
lists: the keys of evicted connections are remembered (up to ``max_idle`` of them, a few hundred
bytes each); a new connection to a remembered key means eviction cost a reuse, and the limit
grows by an eighth; a remembered key forgotten without coming back means the room was not
needed, and the limit shrinks by one.

A job file can say more than its past: with a ``forecast`` (forecast.py) the pool also knows,
as a connection goes idle, whether its host has jobs still to come. One whose host has none is
put first in line for eviction (its last job may still follow a redirect back to it); one whose
host has more makes room for itself, growing ``idle_limit`` by one up to ``max_idle`` unless a
finished host's connection can go instead (so hosts that come back keep their connections from
the first pass on). Connections the
forecast cannot speak for (hosts the file does not name as written, or before the count has
got that far) are kept and evicted as without it.

Connections aiohttp drops on its own (closed by the peer, expired by keep-alive) may still have
an entry here; such an entry is skipped when its turn to be evicted comes, and the dict never
holds more than ``idle_limit`` entries, so a stale one at worst closes a live connection early.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from .forecast import HostForecast


class BoundedConnector(aiohttp.TCPConnector):
    """A TCPConnector that keeps at most ``idle_limit`` idle connections, over all hosts;
    ``idle_limit`` adapts between ``min_idle`` and ``max_idle``."""

    def __init__(
        self,
        *,
        min_idle: int,
        max_idle: int,
        forecast: HostForecast | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.min_idle = min(min_idle, max_idle)
        self.max_idle = max_idle
        self.idle_limit = self.min_idle
        self.forecast = forecast
        self._idle: OrderedDict[ResponseHandler, ConnectionKey] = OrderedDict()
        self._evicted: OrderedDict[ConnectionKey, None] = OrderedDict()

    @property
    def idle_count(self) -> int:
        """Idle connections waiting for reuse (entries not yet found stale included)."""
        return len(self._idle)

    def _release(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        super()._release(key, protocol, should_close=should_close)
        conns = self._conns.get(key)
        if not conns or conns[-1][0] is not protocol:
            return  # closed rather than kept (or the connector is closed)
        idle = self._idle
        idle[protocol] = key
        forecast = self.forecast
        if forecast is not None:
            ahead = forecast.ahead(key.host)
            if ahead is False:
                # No job left for its host, but the last one may still follow a redirect
                # back to it: kept, first in line to go.
                idle.move_to_end(protocol, last=False)
            elif ahead and len(idle) > self.idle_limit:
                first = next(iter(idle.values()))
                if forecast.ahead(first.host) is not False:
                    self.idle_limit = min(self.max_idle, self.idle_limit + 1)
        while len(idle) > self.idle_limit:
            self._evict(*idle.popitem(last=False))

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        conn = await super()._get(key, traces)
        if conn is not None:
            self._idle.pop(conn.protocol, None)  # type: ignore[arg-type]
        elif self._evicted and self._evicted.pop(key, 0) is None:
            # A new connection where an evicted one would have served: keep more.
            self.idle_limit = min(self.max_idle, self.idle_limit + max(1, self.idle_limit >> 3))
        return conn

    def _evict(self, protocol: ResponseHandler, key: ConnectionKey) -> None:
        if not self._take_out(protocol, key):
            return  # already gone: reused, expired or closed by the peer
        if self.forecast is not None and self.forecast.ahead(key.host) is False:
            return  # its host is done: nothing to learn from this eviction
        evicted = self._evicted
        evicted[key] = None
        evicted.move_to_end(key)
        if len(evicted) > self.max_idle:
            evicted.popitem(last=False)
            # Forgotten without coming back: that room was not needed.
            self.idle_limit = max(self.min_idle, self.idle_limit - 1)

    def _take_out(self, protocol: ResponseHandler, key: ConnectionKey) -> bool:
        """Close an idle connection and take it out of aiohttp's pool: False if not there."""
        conns = self._conns.get(key)
        if conns is None:
            return False
        for entry in conns:
            if entry[0] is protocol:
                conns.remove(entry)
                break
        else:
            return False
        if not conns:
            del self._conns[key]
        protocol.close()
        return True

    def _close(self, *, abort_ssl: bool = False) -> list[Any]:
        self._idle.clear()
        self._evicted.clear()
        return super()._close(abort_ssl=abort_ssl)
