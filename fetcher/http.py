"""The HTTP handler: one shared ClientSession, one attempt of an HttpJob -> Outcome.

Every aiohttp and OS exception is mapped here, at the module's edge, to one of SPEC's error types
with a one-line message built from known parts (never ``str(exc)`` of a client error, which can
carry the URL and request headers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Collection
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_middlewares import ClientMiddlewareType
from aiohttp.compression_utils import (
    HAS_BROTLI,
    HAS_ZSTD,
    BrotliDecompressor,
    ZLibDecompressor,
    ZSTDDecompressor,
)
from aiohttp.helpers import DEFAULT_CHUNK_SIZE, get_env_proxy_for_url
from yarl import URL

from .config import Settings, TlsSettings
from .connector import BoundedConnector
from .deadline import Deadlines
from .errors import JobError
from .fdlimit import idle_bounds
from .forecast import HostForecast
from .jobs import UNSAFE_METHODS, HttpJob, mask_url
from .netpolicy import NetworkPolicy, is_blocked_error
from .ratelimit import PRESSURE_STATUSES, AdaptiveSlots, KeyedRate, KeyedSlots
from .results import Outcome
from .robots import RobotsGate, RobotsRefused
from .save import (
    READ_BUFSIZE,
    BodyFile,
    BodyStore,
    NameTemplate,
    SaveFailed,
    name_values,
    safe_name,
)
from .socks import SocksSessions, is_socks, socks_error_kind
from .tls import ssl_context
from .warc import Hop, RawSpool, WarcWriter, target_uri
from .warc import discard as discard_hops
from .wire import (
    CURRENT,
    PeerResponse,
    TracedResponse,
    Wire,
    peer_text,
    session_facts,
    trace_connector,
)

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#  A proxy that could not reach the origin, or is overloaded, may do better on a later try;
#  what else it refuses with (407 wrong credentials, 403 a destination it denies) will not.
PROXY_RETRY_STATUSES = frozenset({502, 503, 504})
DNS_CACHE_SECONDS = 300


class Resolver(AbstractResolver):
    """Answers reserved and pinned names itself; asks the system's resolver for the rest.

    Pinned names (config ``resolve``, like curl's ``--resolve``) map a host name to an address.
    Names under ``.invalid`` fail at once and ``localhost`` is the loopback, as RFC 6761 asks,
    so neither ever costs a query to a name server.
    """

    def __init__(self, pinned: dict[str, str]) -> None:
        # Names as written are most often already in the form looked up: then the config's
        # own dict serves (a copy of 50,000 pins is 6 MB).
        normal = all(k.lower() == k and not k.endswith(".") for k in pinned)
        self._pinned = pinned if normal else {k.lower().rstrip("."): v for k, v in pinned.items()}
        self._system: AbstractResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.lower().rstrip(".")
        if name in self._pinned:
            return [_result(host, self._pinned[name], port)]
        if name == "invalid" or name.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if name == "localhost" or name.endswith(".localhost"):
            return [_result(host, "127.0.0.1", port)]
        if self._system is None:
            self._system = aiohttp.DefaultResolver()
        return await self._system.resolve(host, port, family)

    async def close(self) -> None:
        if self._system is not None:
            await self._system.close()


def _result(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return ResolveResult(
        hostname=host,
        host=address,
        port=port,
        family=family,
        proto=0,
        flags=socket.AI_NUMERICHOST,
    )


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpHandler:
    """Runs HttpJob attempts through one shared session. Use as an async context manager."""

    def __init__(
        self,
        settings: Settings,
        *,
        forecast: HostForecast | None = None,
        fields: Collection[str] | None = None,
    ) -> None:
        """``fields``: the result fields to fill in (None: all of them); the others are never
        computed (a projected run: shaping.computed_fields)."""
        self._settings = settings
        self._forecast = forecast
        self._timeout = settings.timeout
        self._max_bytes = settings.max_bytes
        # aiohttp raises on reaching its limit (and takes 0 as "no limit"): one more lets
        # exactly max_redirects redirects through.
        self._plain_options: dict[str, Any] = {"max_redirects": settings.max_redirects + 1}
        # The adaptive controller caps each host at --per-host, or at -n when that is 0.
        self._adaptive = (
            AdaptiveSlots(
                settings.per_host or settings.concurrency, max_pause=settings.retry_after_max
            )
            if settings.adaptive
            else None
        )
        self._slots: KeyedSlots | AdaptiveSlots = (
            KeyedSlots(settings.per_host) if self._adaptive is None else self._adaptive
        )
        self._rate = KeyedRate(settings.rate)
        #  Without a per-host cap or the adaptive controller, no per-host bookkeeping at all.
        self._limit_hosts = bool(settings.per_host) or self._adaptive is not None
        net = settings.network
        self.policy = NetworkPolicy(
            block_private=net.block_private, deny=net.deny_networks, allow=net.allow_networks
        )
        self._resolver = Resolver(settings.resolve)
        self._deadlines = Deadlines()
        self._session: aiohttp.ClientSession | None = None
        save = settings.save
        self._store = None if save.dir is None else BodyStore(save.dir, NameTemplate(save.name))
        self._warc: WarcWriter | None = None  # opened in __aenter__
        #  A body streamed to disk or to a WARC takes every field: those paths read them.
        streamed = self._store is not None or settings.warc.file is not None
        self._kept = None if fields is None or streamed else _response_getters(fields)
        self._hash = fields is None or "sha256" in fields or streamed
        #  Taking the peer's address (remote_addr, WARC-IP-Address) as each response starts
        #  costs a coroutine frame per response: skipped when no kept field needs it.
        self._peer = fields is None or streamed or "remote_addr" in fields
        self._proxy = _host_port(URL(settings.proxy)) if settings.proxy else None
        self._socks_config = settings.proxy is not None and is_socks(settings.proxy)
        self._trace = settings.trace
        self._robots: RobotsGate | None = None  # --robots, made with the session
        self._socks: SocksSessions | None = None
        self._middlewares: tuple[ClientMiddlewareType, ...] = ()
        self._job_middlewares: tuple[ClientMiddlewareType, ...] = ()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpHandler used outside 'async with'")
        return self._session

    async def __aenter__(self) -> HttpHandler:
        s = self._settings
        if self._store is not None:
            self._store.prepare()
        if s.warc.file is not None:
            self._warc = WarcWriter(
                s.warc.file, s.warc.max_size, append=s.resume, software=s.user_agent
            )
        # Through a proxy the socket factory sees only the proxy's address (netpolicy.py).
        proxied = s.proxy or s.trust_env
        self._middlewares = (self.policy.proxied_destination_check(s.resolve),)
        middlewares = self._middlewares if proxied else ()
        robots_check: tuple[ClientMiddlewareType, ...] = ()
        if s.robots:
            user_agent = next(
                (v for k, v in s.headers.items() if k.lower() == "user-agent"), s.user_agent
            )
            self._robots = RobotsGate(
                lambda: self.session,
                user_agent=user_agent,
                timeout=s.timeout,
                rate=s.rate,
                middlewares=middlewares,
            )
            robots_check = (self._robots.redirect_check,)
        self._session = self._new_session(s.proxy, middlewares + robots_check)
        # Per-job SOCKS proxies: a session each (socks.py); per-job HTTP proxies share ours.
        self._socks = SocksSessions(
            lambda proxy: self._new_session(proxy or None, self._middlewares + robots_check)
        )
        self._job_middlewares = self._middlewares + robots_check
        return self

    def _new_session(
        self, proxy: str | None, middlewares: tuple[ClientMiddlewareType, ...]
    ) -> aiohttp.ClientSession:
        """A session with the run's settings, direct or through ``proxy``."""
        s = self._settings
        # Sockets in use stay under -n (aiohttp's limit), idle ones under the idle pool: open
        # sockets follow the concurrency, not the number of hosts (connector.py).
        fewest_idle, most_idle = idle_bounds(s)
        options: dict[str, Any] = {
            "min_idle": fewest_idle,
            "max_idle": most_idle,
            "forecast": self._forecast,
            "limit": s.concurrency,
            "limit_per_host": s.per_host,
            "ttl_dns_cache": DNS_CACHE_SECONDS,
            # With the default TLS settings aiohttp's own verified context serves (TLS >= 1.2,
            # as ssl_context() makes): building another costs a read of the CA store at start-up.
            "ssl": ssl_context(s) if s.tls != TlsSettings() else True,
        }
        socks = proxy is not None and is_socks(proxy)
        connector: BoundedConnector
        if proxy is not None and socks:
            # Imported with the first SOCKS proxy: a run without one never loads aiohttp-socks.
            from .socksconnector import PolicedSocksConnector
            from .socksconnector import connector_options as socks_options

            connector = PolicedSocksConnector(
                policy=self.policy, resolve=self._addresses, **options, **socks_options(proxy)
            )
        else:
            connector = BoundedConnector(
                resolver=self._resolver, socket_factory=self.policy.socket_factory, **options
            )
        if self._trace:
            # The connector's own steps note the phases (wire.py): no TraceConfig, whose
            # dispatch alone costs every request more than the notes do.
            trace_connector(connector)
        return aiohttp.ClientSession(
            connector=connector,
            # Jobs are independent: no cookie carries over from one to another.
            cookie_jar=aiohttp.DummyCookieJar(),
            # The deadline is ours (deadline.py, per attempt); aiohttp's `total` would also
            # count the wait for a free connection (aio-libs/aiohttp#10313).
            timeout=aiohttp.ClientTimeout(total=None),
            headers={"User-Agent": s.user_agent, **s.headers},
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            # A WARC keeps the bytes as they came (content-encoding and all): _Decoder decodes.
            auto_decompress=self._warc is None,
            # The peer's address is taken when each response starts (wire.py).
            response_class=(
                TracedResponse
                if self._trace
                else PeerResponse
                if self._peer
                else aiohttp.ClientResponse
            ),
            trust_env=s.trust_env and not socks,
            proxy=None if socks else proxy,
            middlewares=middlewares,
            # Under --save every body is streamed to disk: a small buffer per reader keeps
            # memory per download bounded (save.READ_BUFSIZE says why and what it measured).
            read_bufsize=READ_BUFSIZE if self._store is not None else DEFAULT_CHUNK_SIZE,
        )

    async def _addresses(self, host: str, port: int) -> list[str]:
        return [r["host"] for r in await self._resolver.resolve(host, port)]

    async def __aexit__(self, *exc: object) -> None:
        self._deadlines.close()
        if self._robots is not None:
            await self._robots.close()
        if self._session is not None:
            await self._session.close()
        if self._socks is not None:
            await self._socks.close()
        await self._resolver.close()
        if self._store is not None:
            self._store.close()
        if self._warc is not None:
            await self._warc.close()

    async def attempt(self, job: HttpJob) -> Outcome:
        url = job.target
        # "@" first: a URL without one has no credentials, and yarl decodes them on first read.
        if (
            "@" in job.url
            and url.user is not None
            and any(
                name.lower() == "authorization" for name in (*job.headers, *self._settings.headers)
            )
        ):
            # An explicit Authorization header wins over credentials in the URL, as in curl
            # (aiohttp refuses the two together with a ValueError).
            url = url.with_user(None)
        if self._robots is not None:
            refusal = await self._robots.check(url)
            if refusal is not None:
                # Never sent: the pool's count of attempts is overridden (SPEC: attempts 0).
                return Outcome({**_empty_fields(job), "attempts": 0}, refusal)
        # The host as written in the URL (IDNA-encoded): ``url.host`` decodes it again, through
        # the idna package, for every host past yarl's cache of 256 (~1 ms a job over 5,000 hosts).
        host = url.raw_host or ""
        if self._forecast is not None:
            self._forecast.arrive(host)
        if self._rate.interval:
            await self._rate.acquire(host)
        if self._limit_hosts:
            await self._slots.acquire(host)
        resp: aiohttp.ClientResponse | None = None
        timeout = job.timeout or self._timeout
        outcome: Outcome | None = None
        started = time.monotonic() if self._adaptive is not None else 0.0
        # The deadline starts once this job holds its host slot: waiting behind other jobs
        # to the same host is not the server's fault.
        task = self._deadlines.start(timeout)
        options = self._options(job)
        wire = None
        if self._trace:
            wire = Wire()
            traced = CURRENT.set(wire)
        history: tuple[aiohttp.ClientResponse, ...] = ()
        session = self.session
        pinned = None  # the per-job session in use, let go at the end
        if job.proxy is not None:
            if is_socks(job.proxy):
                pinned = job.proxy
            else:
                # aiohttp takes an HTTP proxy per request; through the main session unless
                # that one speaks SOCKS to the config's proxy.
                options = {**options, "proxy": job.proxy, "middlewares": self._job_middlewares}
                pinned = "" if self._socks_config else None
            if pinned is not None and self._socks is not None:
                session = self._socks.acquire(pinned)
        try:
            async with session.request(job.method, url, **options) as resp:
                outcome = await self._read(job, resp)
                history = resp.history
                return outcome
        except asyncio.CancelledError:
            if not self._deadlines.passed(task):
                raise
            outcome = self._failure(job, TimeoutError(), resp, timeout)
            return outcome
        except Exception as exc:  # noqa: BLE001 - classified below, anything else re-raised
            outcome = self._failure(job, exc, resp, timeout)
            history = resp.history if resp is not None else getattr(exc, "history", ())
            return outcome
        finally:
            self._deadlines.stop(task)
            if pinned is not None and self._socks is not None:
                self._socks.release(pinned)
            if wire is not None:
                CURRENT.reset(traced)
                if outcome is not None:
                    _add_trace(outcome.fields, wire, history)
            if self._adaptive is not None and outcome is not None:
                _feedback(self._adaptive, host, resp, outcome, started)
            if self._limit_hosts:
                self._slots.release(host)

    def _options(self, job: HttpJob) -> dict[str, Any]:
        """The request's keyword arguments; a job with none of its own shares one dict (each
        keyword passed costs aiohttp a little, on every request)."""
        if (
            job.headers
            or job.params
            or job.data is not None
            or job.has_json
            or not job.allow_redirects
        ):
            return {
                **self._plain_options,
                "headers": job.headers or None,
                "params": job.params or None,
                "json": job.json_body if job.has_json else None,
                "data": job.data,
                "allow_redirects": job.allow_redirects,
            }
        return self._plain_options

    async def _read(self, job: HttpJob, resp: aiohttp.ClientResponse) -> Outcome:
        max_bytes = self._max_bytes if job.max_bytes is None else job.max_bytes
        cap = max_bytes or None  # 0: no cap
        kept = self._kept
        if kept is None:
            fields = _response_fields(job, resp)
        else:
            fields = {name: get(job, resp) for name, get in kept}
        length = resp.content_length
        # Content-Length is the size on the wire; only without an encoding is it the body's size.
        # A HEAD response (and a 204 or 304) has no body, whatever its Content-Length says.
        unencoded = "Content-Encoding" not in resp.headers
        bodiless = job.method == "HEAD" or resp.status in (204, 304)
        if cap is not None and length is not None and length > cap and unencoded and not bodiless:
            resp.close()
            return _too_large(fields, max_bytes)
        if self._store is not None:
            fields["path"] = None
        if self._store is not None or self._warc is not None:
            return await self._stream(job, resp, fields, cap, max_bytes, bodiless)
        if cap is not None and length is not None and unencoded:
            # The common case: the parser stops at Content-Length, just checked against
            # max_bytes, so one read is bounded (and cheaper than a loop of chunks).
            body: bytes | None = await resp.read()
        else:
            body = await _read_bounded(resp, cap)
        if body is None:
            resp.close()  # drop the connection rather than drain a huge or endless body
            return _too_large(fields, max_bytes)
        fields["bytes"] = len(body)
        if self._hash or job.sha256 is not None:
            fields["sha256"] = digest = hashlib.sha256(body).hexdigest()
            if job.sha256 is not None and digest != job.sha256:
                return _checksum_mismatch(fields, job.sha256, digest)
        if job.body != "none":
            _put_body(fields, job.body, body, resp.charset)
        return self._status_outcome(job, resp, fields)

    async def _stream(
        self,
        job: HttpJob,
        resp: aiohttp.ClientResponse,
        fields: dict[str, Any],
        cap: int | None,
        max_bytes: int,
        bodiless: bool,
    ) -> Outcome:
        """Read the body chunk by chunk: to a file under --save DIR (save.py; never whole in
        memory unless the job also asked for it in the result line) and, raw, to the WARC."""
        store = self._store
        if bodiless or (resp.status >= 400 and not self._settings.save.errors):
            store = None
        file: BodyFile | None = None if store is None else store.open()
        kept: list[bytes] | None = None if job.body == "none" else []
        hops: list[Hop] | None = None
        decoder: _Decoder | None = None
        if self._warc is not None:
            hops = _hops(job, resp, self._warc.folder)
            decoder = _Decoder(fields["headers"].get("content-encoding"))
        spool = None if hops is None else hops[-1].payload
        digest = hashlib.sha256()
        size = 0

        async def take(chunk: bytes) -> bool:
            """Count, hash and keep one decoded chunk; False once past the cap."""
            nonlocal size
            size += len(chunk)
            if cap is not None and size > cap:
                return False
            if file is not None:
                await file.write(chunk)  # hashed in its writer's thread
            else:
                digest.update(chunk)
            if kept is not None:
                kept.append(chunk)
            return True

        try:
            content = resp.content
            if file is not None and store is not None:
                # Reads of the socket no larger than save.READ_SIZE (save.READ_BUFSIZE says why).
                connection = resp.connection
                store.bound_reads(None if connection is None else connection.transport)
            fits = True
            while fits and (raw := await content.readany()):
                if spool is not None:
                    await spool.write(raw)
                room = 0 if cap is None else cap - size + 1
                fits = await take(raw if decoder is None else decoder.decode(raw, room))
            if fits and decoder is not None:
                fits = await take(decoder.flush())
            if not fits:
                resp.close()
                await _drop(file, hops)
                return _too_large(fields, max_bytes)
            fields["bytes"] = size
            if file is not None and store is not None:
                expected = job.sha256

                def name(hexdigest: str) -> str | None:  # in the writer's thread
                    if expected is not None and hexdigest != expected:
                        return None
                    values = name_values(
                        job.id, resp.url, resp.status, fields["content_type"], hexdigest
                    )
                    return safe_name(store.template.render(values))

                hexdigest, fields["path"] = await file.commit(name)
            else:
                hexdigest = digest.hexdigest()
            fields["sha256"] = hexdigest
            outcome = None
            if job.sha256 is not None and hexdigest != job.sha256:
                outcome = _checksum_mismatch(fields, job.sha256, hexdigest)
            if hops is not None and self._warc is not None:
                fields["warc"] = await self._warc.record(hops)
                hops = None
        except SaveFailed as exc:
            await _drop(file, hops)
            root = store.root if store is not None else ""
            return Outcome(fields, JobError("save", f"cannot save the body in {root}: {exc}"))
        except BaseException:
            await _drop(file, hops)
            raise
        if outcome is not None:
            return outcome
        if kept is not None:
            _put_body(fields, job.body, b"".join(kept), resp.charset)
        return self._status_outcome(job, resp, fields)

    def _status_outcome(
        self, job: HttpJob, resp: aiohttp.ClientResponse, fields: dict[str, Any]
    ) -> Outcome:
        status = resp.status
        if status < 400:
            return Outcome(fields)
        # A plain-http request goes to the proxy as a whole, so a refusal can be the proxy's
        # own answer; over https the proxy only tunnels, and what comes back is the origin's.
        proxy = self._proxy_of(resp.url, job) if resp.url.scheme == "http" else None
        # A SOCKS proxy only relays bytes: every HTTP answer is the origin's.
        socks = is_socks(job.proxy) if job.proxy else self._socks_config
        error = proxy_refusal(resp, proxy) if proxy is not None and not socks else None
        retryable = PROXY_RETRY_STATUSES if error is not None else RETRY_STATUSES
        retry = status in retryable and self._may_retry(job, reached=True)
        return Outcome(
            fields,
            error or JobError("http_status", f"HTTP {status} {resp.reason or ''}".rstrip()),
            retry=retry,
            retry_after=retry_after_seconds(resp.headers.get("Retry-After")) if retry else None,
        )

    def _may_retry(self, job: HttpJob, *, reached: bool) -> bool:
        return not reached or job.retry_unsafe or job.method not in UNSAFE_METHODS

    def _proxy_of(self, url: URL, job: HttpJob) -> str | None:
        """``host:port`` of the forward proxy a request for ``url`` goes through, if any."""
        if job.proxy is not None:
            return _host_port(URL(job.proxy))
        if self._proxy is not None or not self._settings.trust_env:
            return self._proxy
        try:
            proxy, _ = get_env_proxy_for_url(url)
        except LookupError:  # no proxy variable for its scheme, or NO_PROXY names the host
            return None
        return _host_port(proxy)

    def _failure(
        self, job: HttpJob, exc: Exception, resp: aiohttp.ClientResponse | None, timeout: float
    ) -> Outcome:
        fields = _response_fields(job, resp) if resp is not None else _empty_fields(job)
        if self._store is not None:
            fields.setdefault("path", None)
        proxy = (
            self._proxy_of(job.target, job)
            if isinstance(exc, aiohttp.ClientHttpProxyError) or socks_error_kind(exc)
            else None
        )
        error, retryable, reached = classify(exc, timeout, proxy=proxy)
        if isinstance(exc, aiohttp.TooManyRedirects):
            fields["redirects"] = max(0, len(exc.history) - 1)  # the last one was not followed
        retry = retryable and self._may_retry(job, reached=reached)
        return Outcome(fields, error, retry=retry)


def _feedback(
    adaptive: AdaptiveSlots,
    host: str,
    resp: aiohttp.ClientResponse | None,
    outcome: Outcome,
    started: float,
) -> None:
    """Tell the adaptive controller how an attempt to ``host`` went."""
    status = None if resp is None else resp.status
    retry_after = None
    if resp is not None and status in PRESSURE_STATUSES:
        retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
    adaptive.feedback(
        host,
        status=status,
        error=None if outcome.error is None else outcome.error.type,
        retry_after=retry_after,
        latency=time.monotonic() - started,
    )


def _add_trace(
    fields: dict[str, Any], wire: Wire, history: tuple[aiohttp.ClientResponse, ...]
) -> None:
    """--trace: the final hop's phases, the hops before it, its TLS session."""
    done = time.monotonic_ns() if wire.headers is not None else None
    fields["timings"] = wire.timings(done)
    fields["redirect_chain"] = [
        {"url": mask_url(str(hop.url)), "status": hop.status} for hop in history
    ]
    fields["tls"] = None if wire.ssl_object is None else session_facts(wire.ssl_object)


def _empty_fields(job: HttpJob) -> dict[str, Any]:
    return {
        "url": mask_url(job.url),
        "final_url": None,
        "method": job.method,
        "status": None,
        "headers": None,
        "content_type": None,
        "bytes": None,
        "sha256": None,
        "redirects": 0,
        "remote_addr": None,
        "http_version": None,
    }


def _lowered(raw: Any) -> dict[str, str]:
    """Response headers as a result line holds them: names lower-cased, a repeated header's
    values joined in order."""
    headers = {name.lower(): value for name, value in raw.items()}
    if len(headers) < len(raw):
        headers = {}
        for name, value in raw.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _response_fields(job: HttpJob, resp: aiohttp.ClientResponse) -> dict[str, Any]:
    headers = _lowered(resp.headers)
    url = mask_url(job.url)
    final = resp.url
    return {
        "url": url,
        # Not redirected and not rewritten (no params, no fragment, no credentials): the URL
        # requested, already masked, spares formatting the URL object again.
        "final_url": url if final is job.target else mask_url(str(final)),
        "method": job.method,
        "status": resp.status,
        "headers": headers,
        "content_type": headers.get("content-type"),
        "bytes": None,
        "sha256": None,
        "redirects": len(resp.history),
        "remote_addr": peer_text(getattr(resp, "peername", None)),
        "http_version": _version_text(resp.version),
    }


def _final_url(job: HttpJob, resp: aiohttp.ClientResponse) -> str:
    final = resp.url
    return mask_url(job.url) if final is job.target else mask_url(str(final))


def _content_type(job: HttpJob, resp: aiohttp.ClientResponse) -> str | None:
    # As _lowered() has it, without copying every header: each value, joined in order.
    values = resp.headers.getall("Content-Type", ())
    return ", ".join(values) if values else None


Getter = Callable[[HttpJob, aiohttp.ClientResponse], Any]
#  Each response field of a result line on its own, for a run that writes only some of them
#  (the full line is built at once, by _response_fields). ``bytes`` and ``sha256`` come with
#  the body.
_GETTERS: dict[str, Getter] = {
    "url": lambda job, resp: mask_url(job.url),
    "final_url": _final_url,
    "method": lambda job, resp: job.method,
    "status": lambda job, resp: resp.status,
    "headers": lambda job, resp: _lowered(resp.headers),
    "content_type": _content_type,
    "redirects": lambda job, resp: len(resp.history),
    "remote_addr": lambda job, resp: peer_text(getattr(resp, "peername", None)),
    "http_version": lambda job, resp: _version_text(resp.version),
}


def _response_getters(fields: Collection[str]) -> tuple[tuple[str, Getter], ...]:
    return tuple((name, get) for name, get in _GETTERS.items() if name in fields)


#  Formatted once: the version of every response of a run is one of these.
_VERSIONS = {aiohttp.HttpVersion11: "1.1", aiohttp.HttpVersion10: "1.0"}


def _version_text(version: aiohttp.HttpVersion | None) -> str | None:
    if version is None:
        return None
    return _VERSIONS.get(version) or f"{version.major}.{version.minor}"


def _peer_ip(resp: aiohttp.ClientResponse) -> str | None:
    address = getattr(resp, "peername", None)
    return str(address[0]) if address else None


async def _read_bounded(resp: aiohttp.ClientResponse, cap: int | None) -> bytes | None:
    """The (decompressed) body, or None as soon as it passes ``cap`` (None: no cap)."""
    if cap is None:
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    read = resp.content.readany
    while chunk := await read():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _checksum_mismatch(fields: dict[str, Any], expected: str, got: str) -> Outcome:
    return Outcome(
        fields, JobError("checksum", f"body sha256 is {got}, the job expects {expected}")
    )


def _too_large(fields: dict[str, Any], max_bytes: int) -> Outcome:
    return Outcome(fields, JobError("too_large", f"body is larger than max_bytes ({max_bytes})"))


async def _drop(file: BodyFile | None, hops: list[Hop] | None) -> None:
    """Let go of what a body that will not be kept had written so far."""
    if file is not None:
        await file.discard()
    if hops is not None:
        discard_hops(hops)


class _Decoder:
    """Content-Encoding decoding when a WARC is written: the session then keeps the raw bytes
    (for the record) and ``bytes``, ``sha256``, the saved file and the body are decoded here,
    with aiohttp's own decompressors. An encoding they do not know passes through as is."""

    def __init__(self, encoding: str | None) -> None:
        name = (encoding or "").strip().lower()
        self._codec: ZLibDecompressor | BrotliDecompressor | ZSTDDecompressor | None = None
        if name in ("gzip", "x-gzip", "deflate"):
            self._codec = ZLibDecompressor(encoding="deflate" if name == "deflate" else "gzip")
        elif name == "br" and HAS_BROTLI:
            self._codec = BrotliDecompressor()
        elif name == "zstd" and HAS_ZSTD:
            self._codec = ZSTDDecompressor()

    def decode(self, data: bytes, room: int) -> bytes:
        """``data`` decoded, at most ``room`` bytes of it (0: all)."""
        if self._codec is None:
            return data
        try:
            return self._codec.decompress_sync(data, room)
        except Exception as exc:  # noqa: BLE001 - zlib, brotli and zstd each have their own
            raise aiohttp.ClientPayloadError(f"cannot decode the body: {exc}") from None

    def flush(self) -> bytes:
        if self._codec is None:
            return b""
        try:
            return self._codec.flush()
        except Exception as exc:  # noqa: BLE001
            raise aiohttp.ClientPayloadError(f"cannot decode the body: {exc}") from None


def _hops(job: HttpJob, resp: aiohttp.ClientResponse, folder: Path) -> list[Hop]:
    """The exchanges behind ``resp`` for the WARC: its redirect hops, then itself."""
    chunked = "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
    hops = [_hop(r, None) for r in resp.history]
    hops.append(_hop(resp, RawSpool(folder, chunked)))
    if job.data is not None:
        hops[0].request_body = job.data.encode()
    elif job.has_json:
        hops[0].request_body = orjson.dumps(job.json_body)
    return hops


def _hop(resp: aiohttp.ClientResponse, payload: RawSpool | None) -> Hop:
    info = resp.request_info
    url = info.real_url
    version = resp.version
    length = resp.headers.get("Content-Length", "")
    return Hop(
        uri=target_uri(str(url)),
        request_line=f"{info.method} {url.raw_path_qs or '/'} HTTP/1.1",
        request_headers=list(info.headers.items()),
        status_line=f"{resp.status} {resp.reason or ''}".rstrip(),
        protocol="HTTP/1.1" if version is None else f"HTTP/{version.major}.{version.minor}",
        response_headers=resp.raw_headers,
        ip=_peer_ip(resp),
        payload=payload,
        announced_body=(length not in ("", "0")) or "Transfer-Encoding" in resp.headers,
    )


def _put_body(fields: dict[str, Any], mode: str, body: bytes, charset: str | None) -> None:
    if mode == "text":
        try:
            fields["body"] = body.decode(charset or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            fields["body"] = body.decode("utf-8", errors="replace")
    elif mode == "base64":
        fields["body"] = base64.b64encode(body).decode("ascii")
    else:
        # A body that is not JSON does not fail the fetch: the job got its response.
        try:
            fields["body"] = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            fields["body"] = None
            fields["body_error"] = f"not valid JSON: {str(exc).splitlines()[0]}"


def _host_port(url: URL) -> str:
    """A proxy as it may be shown: its address, never its credentials."""
    return f"{url.host}:{url.port}"


def proxy_refusal(resp: aiohttp.ClientResponse, proxy: str) -> JobError | None:
    """The proxy's own refusal of a plain-http request sent through it, or None for the origin's.

    Only what proxies mark as theirs can be told: a 407 (proxy authentication, which proxies
    send with ``Proxy-Authenticate``; an origin has no use for it) and squid's error pages,
    which carry ``X-Squid-Error``. A proxy's unmarked 502 or 503 reads like the origin's own.
    """
    squid = resp.headers.get("X-Squid-Error")
    if resp.status != 407 and squid is None:
        return None
    message = f"proxy {proxy} answered {resp.status} {_clean(resp.reason or '')}".rstrip()
    if squid:
        message += f" (X-Squid-Error: {_clean(squid)})"
    return JobError("proxy", message)


def classify(
    exc: BaseException, timeout: float, *, proxy: str | None = None
) -> tuple[JobError, bool, bool]:
    """(error, retryable, may have reached the server) for an exception of one attempt.

    ``proxy`` names the proxy (``host:port``) for the message of a refused tunnel.
    """
    if isinstance(exc, RobotsRefused):  # a redirect to a URL robots.txt disallows
        return exc.error, False, True
    socks = socks_error_kind(exc)
    if socks is not None:
        return _socks_failure(exc, socks, proxy)
    if isinstance(exc, TimeoutError):  # our deadline, or aiohttp's own socket timeouts
        return JobError("timeout", f"no complete response within {timeout:g} s"), True, True
    if isinstance(exc, OSError) and is_blocked_error(exc):  # from the proxied-destination check
        return JobError("blocked", _os_message(exc)), False, False
    if isinstance(exc, aiohttp.ClientConnectorError):
        where = f"{exc.host}:{exc.port}"
        os_error = exc.os_error
        if is_blocked_error(os_error):
            return JobError("blocked", f"{where}: {_os_message(os_error)}"), False, False
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            temporary = getattr(os_error, "errno", None) == socket.EAI_AGAIN
            return (
                JobError("dns", f"cannot resolve {exc.host}: {_os_message(os_error)}"),
                temporary,
                False,
            )
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            cert = exc.certificate_error
            reason = (
                getattr(cert, "verify_message", None) or getattr(cert, "reason", None) or "invalid"
            )
            return JobError("tls", f"certificate of {where} not accepted: {reason}"), False, False
        if isinstance(exc, aiohttp.ClientSSLError):
            reason = getattr(os_error, "reason", None) or _os_message(os_error)
            return JobError("tls", f"TLS handshake with {where} failed: {reason}"), False, False
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return (
                JobError("connect", f"cannot connect to proxy {where}: {_os_message(os_error)}"),
                True,
                False,
            )
        return (
            JobError("connect", f"cannot connect to {where}: {_os_message(os_error)}"),
            True,
            False,
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        # The proxy answered an https job's CONNECT itself: nothing reached the origin.
        who = f"proxy {proxy}" if proxy else "the proxy"
        status_line = f"{exc.status} {_clean(exc.message)}".rstrip()
        return (
            JobError("proxy", f"{who} refused the tunnel: {status_line}"),
            exc.status in PROXY_RETRY_STATUSES,
            False,
        )
    if isinstance(exc, aiohttp.TooManyRedirects):
        return JobError("too_many_redirects", "too many redirects"), False, True
    if isinstance(exc, aiohttp.RedirectClientError):
        return JobError("too_many_redirects", "redirect to a URL that is not http(s)"), False, True
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return JobError("invalid_url", "URL cannot be requested"), False, False
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return JobError("tls", "certificate does not match the pinned fingerprint"), False, False
    if isinstance(exc, aiohttp.UploadAbortedError):
        return JobError("connect", "connection lost before the request was sent"), True, True
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return JobError("connect", "server closed the connection without a response"), True, True
    if isinstance(exc, aiohttp.ClientPayloadError):
        return JobError("protocol", "connection closed or body malformed mid-body"), True, True
    if isinstance(exc, aiohttp.ClientResponseError):
        # The response parser reports malformed status lines and header limits this way; what
        # follows ": b'" is the peer's own bytes, which have no place in a result line.
        reason = str(exc.message).split(": b'", 1)[0].split(': b"', 1)[0]
        return JobError("protocol", f"malformed response: {_clean(reason)}"), True, True
    if isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
    ):
        # A TLS failure after the handshake (which aiohttp reports as ClientConnectorSSLError);
        # a TLS stream cut short is a lost connection, below.
        return JobError("tls", f"TLS error: {_os_message(exc)}"), False, True
    if isinstance(exc, aiohttp.ClientOSError | OSError):
        return JobError("connect", f"connection failed: {_os_message(exc)}"), True, True
    if isinstance(exc, aiohttp.ClientError):
        return JobError("protocol", f"HTTP client error: {type(exc).__name__}"), True, True
    raise exc


#  SOCKS5 replies that say the proxy could not reach the origin (general failure, network or
#  host unreachable, connection refused, TTL expired): like an HTTP proxy's 502/503/504, worth
#  another try. A ruleset refusal (2), an unsupported command or address type, a failed login
#  and a server that does not speak SOCKS are not.
SOCKS_RETRY_REPLIES = frozenset({1, 3, 4, 5, 6})


def _socks_failure(exc: BaseException, kind: str, proxy: str | None) -> tuple[JobError, bool, bool]:
    who = f"SOCKS proxy {proxy}" if proxy else "the SOCKS proxy"
    if kind == "timeout":
        return JobError("timeout", f"{who} did not answer in time"), True, False
    if kind == "connect":
        return JobError("connect", f"cannot connect to {who}"), True, False
    code = getattr(exc, "error_code", None)
    # python_socks' messages name the failure ("Host unreachable", "Username and password
    # authentication failure"), never the credentials.
    return (
        JobError("proxy", f"{who} failed the handshake: {_clean(str(exc))}"),
        code in SOCKS_RETRY_REPLIES,
        False,
    )


def _os_message(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    code = getattr(exc, "errno", None)
    text = getattr(exc, "strerror", None)
    # The system's wording for a plain socket error ("Connection refused"), not the event
    # loop's ("Connect call failed ('127.0.0.1', 1)"); resolver, TLS and policy errors keep theirs.
    plain = not isinstance(exc, socket.gaierror | ssl.SSLError) and not is_blocked_error(exc)
    if plain and isinstance(code, int) and code > 0:
        text = os.strerror(code)
    text = text or str(exc) or type(exc).__name__
    return _clean(text)


def _clean(text: str) -> str:
    """One short printable line."""
    line = " ".join(str(text).split())
    return line[:200]
