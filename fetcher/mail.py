"""The mail handler: pooled SMTP connections per profile, one attempt of a MailJob -> Outcome.

An aiosmtplib connection carries one transaction at a time, so each SMTP profile keeps up to
``pool_size`` of them and reuses each for many messages. A connection is replaced when it dies,
answers 421, or has carried ``max_messages_per_connection`` messages; one left unused for
``idle_timeout`` seconds is closed with QUIT, and all are closed with QUIT when the handler closes.

The transaction is driven with ``mail()``, ``rcpt()`` and ``data()`` rather than
``send_message()`` so that every reply code is known: the result's ``status`` is the code of the
final reply to DATA or of the command that failed, and a failure can be told apart by phase
(nothing sent yet, or the message body already on the wire).

Passwords are read from the environment when a connection logs in, and kept nowhere else: not in
the handler, not in a connection object, not in an error message (server replies to AUTH are
scrubbed of the password before they are quoted).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import aiosmtplib

from .config import Settings, SmtpProfile
from .errors import ErrorType, JobError
from .jobs import MailJob
from .message import build_message
from .ratelimit import KeyedRate
from .results import Outcome
from .tls import smtp_ssl_context

log = logging.getLogger("fetcher")


QUIT_TIMEOUT = 2.0
SERVICE_CLOSING = 421


class _Failed(Exception):
    """A failure already classified: carried out of the transaction to ``attempt``."""

    def __init__(self, error: JobError, *, retry: bool, status: int | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry
        self.status = status


@dataclass(slots=True, eq=False)
class _Conn:
    smtp: aiosmtplib.SMTP
    sent: int = 0
    idle_since: float = 0.0
    #  The transport as last seen (it changes at STARTTLS). Kept because aiosmtplib forgets it
    #  when it closes the connection itself (after a 421 or a timeout).
    transport: asyncio.BaseTransport | None = None

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def drop(self) -> None:
        """Close now. A TLS transport's polite close waits for the peer's close_notify, up to
        30 s, and a loop that ends first leaks the socket; aborting ends it at once, which
        costs nothing once the SMTP session is over or broken."""
        if self.transport is not None:
            cast(asyncio.Transport, self.transport).abort()
            self.transport = None
        self.smtp.close()


@dataclass(slots=True)
class _Attempt:
    """Where one attempt got to: its phase names a timeout, its fields become the result's."""

    phase: str = "connect"
    status: int | None = None
    recipients: list[str] = field(default_factory=list)
    refused: dict[str, list[Any]] = field(default_factory=dict)
    conn: _Conn | None = None


class ProfilePool:
    """The connections of one SMTP profile: at most ``pool_size`` open, each reused."""

    def __init__(self, name: str, profile: SmtpProfile) -> None:
        self.name = name
        self.profile = profile
        self.slots = asyncio.Semaphore(profile.pool_size)
        self.rate = KeyedRate(profile.rate)
        #  Most recently used last: checkout takes the warmest connection and the coldest ones
        #  age out under the idle reaper.
        self.idle: list[_Conn] = []
        self.busy: set[_Conn] = set()
        self.opened = 0
        #  A login refused with a permanent code is not tried again in this run: hammering a
        #  server with a wrong password locks accounts and gains nothing.
        self.auth_error: JobError | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.tls_lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return f"{self.profile.host}:{self.profile.port}"

    def take_idle(self, now: float) -> _Conn | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.alive and now - conn.idle_since < self.profile.idle_timeout:
                self.busy.add(conn)
                return conn
            # Dead, or idle so long that the server has likely dropped it already.
            conn.drop()
        return None

    def give_back(self, conn: _Conn) -> bool:
        """Return a healthy connection to the idle list; False when it must be retired."""
        self.busy.discard(conn)
        if conn.alive and conn.sent < self.profile.max_messages_per_connection:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
            return True
        return False

    def discard(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        conn.drop()

    def expired(self, now: float) -> list[_Conn]:
        """Take the connections idle longer than ``idle_timeout`` off the idle list."""
        limit = self.profile.idle_timeout
        old = [c for c in self.idle if now - c.idle_since >= limit or not c.alive]
        if old:
            self.idle = [c for c in self.idle if c not in old]
        return old


async def _quit(conn: _Conn) -> None:
    """Close politely with QUIT when the connection is still up; never raises but cancellation."""
    try:
        if conn.smtp.is_connected:
            await conn.smtp.quit(timeout=QUIT_TIMEOUT)
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        conn.drop()


class MailHandler:
    """Runs MailJob attempts over pooled SMTP connections. Use as an async context manager."""

    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None) -> None:
        self._settings = settings
        self._environ = os.environ if environ is None else environ
        self._pools = {name: ProfilePool(name, p) for name, p in settings.smtp.items()}
        self._local_hostname: str | None = None
        self._reaper: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<MailHandler profiles={sorted(self._pools)}>"

    @property
    def pools(self) -> Mapping[str, ProfilePool]:
        return self._pools

    async def __aenter__(self) -> MailHandler:
        interval = min(p.idle_timeout for p in self._settings.smtp.values()) / 2
        self._reaper = asyncio.create_task(self._reap(interval), name="fetcher-smtp-reaper")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        conns: list[_Conn] = []
        for pool in self._pools.values():
            conns += pool.idle
            pool.idle = []
            # Connections still in use belong to attempts that were cancelled mid-way.
            for conn in pool.busy:
                conn.drop()
            pool.busy.clear()
        await asyncio.gather(*(_quit(c) for c in conns))
        # Aborted transports close their sockets on the loop's next turn: let it come now,
        # while the loop surely still runs.
        await asyncio.sleep(0)

    async def _reap(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            old = [c for pool in self._pools.values() for c in pool.expired(now)]
            if old:
                await asyncio.gather(*(_quit(c) for c in old))

    # -- one attempt -----------------------------------------------------------------------

    async def attempt(self, job: MailJob) -> Outcome:
        pool = self._pools[job.smtp]
        st = _Attempt()
        try:
            message_id, data, sender, rcpts = build_message(job)
        except (ValueError, TypeError) as exc:
            return _outcome(st, None, JobError("invalid_job", f"cannot build message: {exc}"))
        if pool.auth_error is not None:
            return _outcome(st, message_id, pool.auth_error)
        await pool.rate.acquire(pool.name)
        await pool.slots.acquire()
        timeout = job.timeout or pool.profile.timeout
        try:
            # The deadline starts once this job holds a connection slot: waiting behind other
            # messages to the same server is not the server's fault.
            async with asyncio.timeout(timeout):
                await self._transact(pool, st, sender, rcpts, data, timeout)
        except asyncio.CancelledError:
            if st.conn is not None:
                pool.discard(st.conn)
                st.conn = None
            raise
        except Exception as exc:  # noqa: BLE001 - classified below, anything else re-raised
            # A refusal (after RSET) leaves the connection usable; anything else may have left
            # it mid-command, so it is dropped.
            if st.conn is not None and not (_keeps_connection(exc, st) and st.conn.alive):
                pool.discard(st.conn)
                st.conn = None
            error, retry = classify(exc, st, pool, timeout)
            return _outcome(st, message_id, error, retry=retry)
        else:
            return _outcome(st, message_id, _st_error(st), retry=_st_retry(st))
        finally:
            conn, st.conn = st.conn, None
            try:
                if conn is not None and not pool.give_back(conn):
                    await _quit(conn)  # retired after max_messages_per_connection
            finally:
                pool.slots.release()

    async def _transact(
        self,
        pool: ProfilePool,
        st: _Attempt,
        sender: str,
        rcpts: list[str],
        data: bytes,
        timeout: float,
    ) -> None:
        st.conn = pool.take_idle(time.monotonic())
        reused = st.conn is not None
        if st.conn is None:
            st.conn = await self._open(pool, st, timeout)
        try:
            await self._send(pool, st, sender, rcpts, data, timeout, reused=reused)
        except aiosmtplib.SMTPResponseException as exc:
            if st.conn is not None and st.conn.alive and _keeps_connection(exc, st):
                await _rset(st.conn)
            raise

    async def _send(
        self,
        pool: ProfilePool,
        st: _Attempt,
        sender: str,
        rcpts: list[str],
        data: bytes,
        timeout: float,
        *,
        reused: bool,
    ) -> None:
        assert st.conn is not None
        st.phase = "mail"
        try:
            await st.conn.smtp.mail(sender)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPSenderRefused) as exc:
            gone = isinstance(exc, aiosmtplib.SMTPServerDisconnected) or (
                exc.code == SERVICE_CLOSING
            )
            if not (reused and gone):
                raise
            # A pooled connection the server closed while it sat idle: nothing was sent on it,
            # so open a fresh one and carry on within this attempt.
            pool.discard(st.conn)
            st.conn = None
            st.phase = "connect"
            st.conn = await self._open(pool, st, timeout)
            st.phase = "mail"
            await st.conn.smtp.mail(sender)
        smtp = st.conn.smtp
        st.phase = "rcpt"
        for rcpt in rcpts:
            try:
                await smtp.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                st.refused[rcpt] = [exc.code, _clean(exc.message)]
                st.status = exc.code
                if exc.code == SERVICE_CLOSING:
                    raise
            else:
                st.recipients.append(rcpt)
        if not st.recipients:
            await _rset(st.conn)
            return
        st.phase = "data"
        try:
            reply = await smtp.data(data)
        except aiosmtplib.SMTPDataError:
            st.recipients = []
            raise
        st.status = reply.code
        st.conn.sent += 1

    async def _open(self, pool: ProfilePool, st: _Attempt, timeout: float) -> _Conn:
        profile = pool.profile
        st.phase = "connect"
        if self._local_hostname is None:
            # Looked up once per run; aiosmtplib would otherwise ask for every connection.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        ctx = await self._tls_context(pool) if profile.security != "none" else None
        smtp = aiosmtplib.SMTP(
            hostname=profile.host,
            port=profile.port,
            use_tls=profile.security == "tls",
            # Never the library's default (None), which upgrades only when offered and would
            # otherwise send in clear to a server, or a man in the middle, that hides STARTTLS.
            start_tls=False,
            tls_context=ctx,
            timeout=timeout,
            local_hostname=self._local_hostname,
        )
        conn = _Conn(smtp)
        pool.busy.add(conn)
        pool.opened += 1
        try:
            await smtp.connect()
            conn.transport = smtp.transport
            if profile.security == "starttls":
                st.phase = "starttls"
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    raise _Failed(
                        JobError(
                            "tls",
                            f"{pool.where} does not offer STARTTLS; "
                            "profile security is starttls, so nothing is sent in clear",
                        ),
                        retry=False,
                    )
                await smtp.starttls()
                conn.transport = smtp.transport
            if profile.username:
                st.phase = "login"
                await self._login(pool, smtp)
        except BaseException:
            pool.discard(conn)
            raise
        return conn

    async def _tls_context(self, pool: ProfilePool) -> ssl.SSLContext:
        async with pool.tls_lock:
            if pool.tls_context is None:
                pool.tls_context = await asyncio.to_thread(
                    smtp_ssl_context, self._settings, pool.profile
                )
            return pool.tls_context

    async def _login(self, pool: ProfilePool, smtp: aiosmtplib.SMTP) -> None:
        profile = pool.profile
        user = profile.username or ""
        var = profile.password_env
        password = self._environ.get(var) if var else None
        if password is None:
            error = JobError(
                "smtp_auth",
                f"environment variable {var} (password_env of smtp profile {pool.name}) is not set"
                if var
                else f"smtp profile {pool.name} has a username but no password_env",
            )
            pool.auth_error = error
            raise _Failed(error, retry=False)
        try:
            await smtp.login(user, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            text = _scrub(_clean(exc.message), user, password)
            if 400 <= exc.code < 500:
                raise _Failed(
                    JobError(
                        "smtp_temporary",
                        f"{pool.where} deferred login as {user}: {exc.code} {text}",
                    ),
                    retry=True,
                    status=exc.code,
                ) from None
            error = JobError(
                "smtp_auth", f"{pool.where} refused login as {user}: {exc.code} {text}"
            )
            pool.auth_error = error
            raise _Failed(error, retry=False, status=exc.code) from None
        except aiosmtplib.SMTPResponseException:
            raise  # a 421 or similar: classified like any other reply
        except aiosmtplib.SMTPException as exc:
            if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPTimeoutError):
                raise
            # No AUTH offered (or no method in common): a setup problem, not a passing one.
            error = JobError(
                "smtp_auth", f"cannot log in to {pool.where}: {_scrub(exc.message, user, password)}"
            )
            pool.auth_error = error
            raise _Failed(error, retry=False) from None


def _keeps_connection(exc: Exception, st: _Attempt) -> bool:
    """Whether a connection that raised ``exc`` may be reset and reused.

    Only a refusal may. Not after a failed login (the session is in no state to reuse), nor after
    421 at any step: the server said it is closing. aiosmtplib closes the connection itself on a
    421 to an ordinary command but not on one to DATA, where the server may keep it open.
    """
    return (
        isinstance(exc, aiosmtplib.SMTPResponseException)
        and exc.code != SERVICE_CLOSING
        and st.phase != "login"
    )


async def _rset(conn: _Conn) -> None:
    """After a refused transaction RSET keeps the connection usable; failing that, drop it."""
    try:
        await conn.smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        conn.drop()


def _outcome(
    st: _Attempt, message_id: str | None, error: JobError | None, *, retry: bool = False
) -> Outcome:
    fields: dict[str, Any] = {
        "status": st.status,
        "message_id": message_id,
        "recipients": st.recipients if error is None else [],
        "refused": st.refused,
    }
    return Outcome(fields, error, retry=retry)


def _st_error(st: _Attempt) -> JobError | None:
    """The error of a transaction that ran to its end: none unless every recipient was refused."""
    if st.recipients:
        return None
    codes = [c for c, _ in st.refused.values()]
    if any(400 <= c < 500 for c in codes):
        return JobError("smtp_temporary", f"every recipient deferred ({_codes(st)})")
    return JobError("smtp_rejected", f"every recipient refused ({_codes(st)})")


def _st_retry(st: _Attempt) -> bool:
    return not st.recipients and any(400 <= c < 500 for c, _ in st.refused.values())


def _codes(st: _Attempt) -> str:
    return "; ".join(f"{addr}: {code} {text}" for addr, (code, text) in st.refused.items())[:300]


def _reply_error(code: int, text: str, what: str) -> tuple[JobError, bool]:
    kind: ErrorType = "smtp_temporary" if 400 <= code < 500 else "smtp_rejected"
    return JobError(kind, f"{what}: {code} {_clean(text)}".rstrip()), kind == "smtp_temporary"


def classify(
    exc: Exception, st: _Attempt, pool: ProfilePool, timeout: float
) -> tuple[JobError, bool]:
    """(error, retryable) for an exception of one attempt; sets ``st.status`` from replies."""
    where = pool.where
    if isinstance(exc, _Failed):
        if exc.status is not None:
            st.status = exc.status
        return exc.error, exc.retry
    ssl_error = _ssl_cause(exc)
    if ssl_error is not None:
        reason = getattr(ssl_error, "verify_message", None) or getattr(ssl_error, "reason", None)
        return JobError(
            "tls", f"TLS with {where} failed: {reason or type(ssl_error).__name__}"
        ), False
    if isinstance(exc, TimeoutError):
        if st.phase == "data":
            # The message may be complete on the server, its 250 lost with the connection:
            # a retry can deliver it twice (RFC 1047). README explains the trade.
            msg = (
                f"no reply to the end of DATA from {where} within {timeout:g} s "
                "(the server may have accepted the message)"
            )
        else:
            msg = f"no reply from {where} within {timeout:g} s (during {st.phase})"
        return JobError("timeout", msg), True
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        st.recipients = []
        return (
            JobError("connect", f"{where} closed the connection during {st.phase}; not sent"),
            True,
        )
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        st.status = exc.code
        return _reply_error(exc.code, exc.message, f"{where} refused the connection")
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        cause = exc.__cause__
        text = _clean(getattr(cause, "strerror", None) or str(cause or "") or "failed")
        return JobError("connect", f"cannot connect to {where}: {text}"), True
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):  # a 421 in the middle of RCPT
        st.recipients = []
        return _reply_error(exc.code, exc.message, f"{where} closed the session at RCPT")
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        st.status = exc.code
        return _reply_error(exc.code, exc.message, f"{where} refused MAIL FROM")
    if isinstance(exc, aiosmtplib.SMTPDataError):
        st.status = exc.code
        return _reply_error(exc.code, exc.message, f"{where} refused the message")
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):  # as _login() reports it
        st.status = exc.code
        if 400 <= exc.code < 500:
            return _reply_error(exc.code, exc.message, f"{where} deferred login")
        return JobError("smtp_auth", f"{where} refused login: {exc.code}"), False
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):  # every recipient, from sendmail()
        codes = [r.code for r in exc.recipients]
        deferred = any(400 <= c < 500 for c in codes)
        listed = "; ".join(f"{r.recipient}: {r.code} {_clean(r.message)}" for r in exc.recipients)
        kind: ErrorType = "smtp_temporary" if deferred else "smtp_rejected"
        return JobError(kind, f"{where} refused every recipient ({listed[:300]})"), deferred
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        st.status = exc.code
        error, retry = _reply_error(exc.code, exc.message, f"{where} answered {st.phase}")
        if st.phase == "starttls":
            return JobError("tls", error.message), False
        return error, retry
    if isinstance(exc, aiosmtplib.SMTPException):
        return JobError("protocol", f"SMTP error with {where}: {_clean(exc.message)}"), True
    if isinstance(exc, OSError):
        text = _clean(exc.strerror or type(exc).__name__)
        return JobError("connect", f"connection to {where} failed: {text}"), True
    raise exc


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        if isinstance(node, ssl.SSLError):
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


def _scrub(text: str, user: str, password: str) -> str:
    """``text`` without the password, plain or in the base64 forms AUTH sends it."""
    if not password:
        return text
    forms = [
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(f"\0{user}\0{password}".encode()).decode(),
    ]
    for form in forms:
        text = text.replace(form, "***")
    return text


def _clean(text: str) -> str:
    """One short printable line."""
    return " ".join(str(text).split())[:200]
