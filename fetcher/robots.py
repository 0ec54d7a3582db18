"""--robots: robots.txt of each origin, fetched once per run and obeyed (RFC 9309).

``RobotsGate.check(url)`` answers whether fetcher's user agent may fetch ``url`` and, when the
origin's robots.txt has a ``Crawl-delay``, waits for that origin's next turn. The first job to
an origin starts the fetch of its robots.txt as a task of its own; every job to that origin
awaits the same task (one future per origin), so a robots.txt is never fetched twice, and a job
cancelled while waiting does not cancel it for the others.

The fetch goes through the run's own session: the network policy, the connection limits and
the proxy apply to it as to any job, under the run's ``timeout``. What the answer means follows
RFC 9309 and the major crawlers:

- 2xx: parsed with Protego (Scrapy's parser); at most ``MAX_BYTES`` of it are read, as Google does.
- 4xx (but 429): there are no rules, everything is allowed.
- 429, 5xx, or no answer at all (dns, connect, timeout, blocked): the origin is disallowed
  for the run.

The cache is bounded (least recently used origins are forgotten first, ``MAX_ORIGINS``), so
memory follows the concurrency, not the number of origins in the job file; an origin forgotten
and met again is fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from .errors import JobError
from .netpolicy import is_blocked_error
from .wire import CURRENT

if TYPE_CHECKING:
    from protego import Protego

MAX_BYTES = 500 * 1024
MAX_ORIGINS = 10_000
#  A Crawl-delay past this is read as this: a robots.txt cannot stall a run for hours.
MAX_CRAWL_DELAY = 60.0


class RobotsRefused(Exception):
    """Raised by the redirect check: the next hop is disallowed."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class Rules:
    """What one origin's robots.txt says: a parser, or everything allowed / disallowed."""

    parser: Protego | None
    allow_all: bool
    reason: str  # why the origin is disallowed, when it is
    delay: float = 0.0
    next_start: float = 0.0

    def allows(self, url: str, agent: str) -> bool:
        if self.parser is None:
            return self.allow_all
        return bool(self.parser.can_fetch(url, agent))


def origin_of(url: URL) -> str:
    return f"{url.scheme}://{url.raw_host}:{url.port}"


class RobotsGate:
    """The robots.txt rules of every origin a run meets."""

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        *,
        user_agent: str,
        timeout: float,
        rate: float | None,
        middlewares: tuple[Any, ...] = (),
        max_origins: int = MAX_ORIGINS,
    ) -> None:
        self._session = session
        # robots.txt groups name a product token ("fetcher"), not the whole header value.
        self.agent = user_agent.split("/", 1)[0].strip() or user_agent
        self._timeout = timeout
        # --rate already spaces requests this far apart: a shorter Crawl-delay adds nothing.
        self._rate_interval = 1.0 / rate if rate else 0.0
        self._middlewares = middlewares
        self._max = max_origins
        self._rules: OrderedDict[str, asyncio.Task[Rules]] = OrderedDict()
        self.fetches = 0

    async def redirect_check(
        self, req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """A client middleware (it runs for every redirect hop): a hop robots.txt disallows is
        not sent, and the job ends with error ``robots``. Crawl-delay paces jobs, not hops."""
        refusal = await self.check(req.url, pace=False)
        if refusal is not None:
            raise RobotsRefused(refusal)
        return await handler(req)

    async def check(self, url: URL, *, pace: bool = True) -> JobError | None:
        """None when ``url`` may be fetched (after its origin's Crawl-delay), else the error."""
        origin = origin_of(url)
        task = self._rules.get(origin)
        if task is None:
            task = asyncio.create_task(self._fetch(origin), name=f"robots {origin}")
            self._rules[origin] = task
            if len(self._rules) > self._max:
                self._rules.popitem(last=False)  # its waiters still hold the task
        else:
            self._rules.move_to_end(origin)
        rules = await asyncio.shield(task)
        if not rules.allows(str(url), self.agent):
            return JobError("robots", rules.reason or f"robots.txt of {origin} disallows this URL")
        if rules.delay and pace:
            await _pace(rules)
        return None

    async def _fetch(self, origin: str) -> Rules:
        CURRENT.set(None)  # not part of the job that happened to need it (--trace)
        self.fetches += 1
        where = f"{origin}/robots.txt"
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session().get(
                    URL(origin).with_path("/robots.txt"),
                    middlewares=self._middlewares,
                    max_redirects=5,
                ) as resp,
            ):
                status = resp.status
                body = await resp.content.read(MAX_BYTES) if status < 300 else b""
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the origin is unreachable
            return Rules(None, False, f"{where} could not be fetched ({_what(exc)})")
        if status == 429 or status >= 500:
            return Rules(None, False, f"{where} answered {status}: origin disallowed for the run")
        if status >= 400:
            return Rules(None, True, "")
        if status >= 300:  # redirected more than max_redirects allowed
            return Rules(None, True, "")
        from protego import Protego  # loaded with the first robots.txt, not by every run

        parser = Protego.parse(body.decode("utf-8", errors="replace"))
        rules = Rules(parser, True, f"{where} disallows this URL")
        delay = parser.crawl_delay(self.agent)
        if delay and float(delay) > self._rate_interval:
            rules.delay = min(float(delay), MAX_CRAWL_DELAY)
        return rules

    async def close(self) -> None:
        tasks = list(self._rules.values())
        self._rules.clear()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _pace(rules: Rules) -> None:
    """Start at most one request every ``rules.delay`` seconds to the origin."""
    now = time.monotonic()
    start = max(now, rules.next_start)
    rules.next_start = start + rules.delay
    if start > now:
        await asyncio.sleep(start - now)


def _what(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and is_blocked_error(exc):
        return "blocked by the network policy"
    if isinstance(exc, aiohttp.ClientConnectorError) and is_blocked_error(exc.os_error):
        return "blocked by the network policy"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(exc, aiohttp.ClientConnectorError | OSError):
        return "connect"
    return type(exc).__name__
