"""A real SMTP peer for the mail tests: aiosmtpd on 127.0.0.1, port 0, with a recording handler.

The server runs in aiosmtpd's own thread and event loop. ``Recorder`` keeps what it received
(envelopes, parsed messages, connection and QUIT counts) and can be told to misbehave: refuse
some recipients, every sender or every message, defer a message once, close the session with
421, answer 421 to DATA and stay connected, drop the connection in the middle of DATA, answer
slowly, or quote a refused password back.

Fixtures: ``smtp_peer`` (a factory: ``smtp_peer(**options) -> Peer``), ``tls_certs``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

USER = "mailer"
PASSWORD = "s3cret-Pa55"


@dataclass
class Delivery:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    tls: bool  # the session was upgraded with STARTTLS


@dataclass
class Recorder:
    """aiosmtpd handler that records deliveries; the attributes below script its misbehaviour."""

    refuse: dict[str, str] = field(default_factory=dict)  # address -> reply to its RCPT
    defer_data_once: bool = False  # 451 to the first DATA, 250 afterwards
    close_at_mail_once: bool = False  # 421 to the first MAIL, then close the connection
    drop_in_data_once: bool = False  # close the connection before replying to the first DATA
    closing_at_data_once: bool = False  # 421 to the first DATA, and the connection left open
    mail_reply: str | None = None  # the reply to every MAIL FROM, instead of 250
    data_reply: str | None = None  # the reply to the end of every DATA, instead of 250
    echo_credentials: bool = False  # a refused login's reply quotes the user and password
    data_delay: float = 0.0  # seconds before replying to DATA
    deliveries: list[Delivery] = field(default_factory=list)
    connections: int = 0
    quits: int = 0
    mail_commands: int = 0
    mechanisms: list[str] = field(default_factory=list)  # of each AUTH attempt
    lock: threading.Lock = field(default_factory=threading.Lock)
    quit_event: threading.Event = field(default_factory=threading.Event)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.mail_commands += 1
        if self.close_at_mail_once:
            self.close_at_mail_once = False
            await server.push("421 4.3.2 Service shutting down")
            assert server.transport is not None
            server.transport.close()
            return "421 4.3.2 Service shutting down"  # not sent: the transport is closed
        if self.mail_reply is not None:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.drop_in_data_once:
            self.drop_in_data_once = False
            assert server.transport is not None
            server.transport.abort()
            return "250 never seen"
        if self.defer_data_once:
            self.defer_data_once = False
            return "451 4.3.0 Try again later"
        if self.closing_at_data_once:
            # A server that says it is closing but does not (or not yet): the client must not
            # take its word for the connection being usable, nor wait for it to go.
            self.closing_at_data_once = False
            return "421 4.3.2 Service shutting down"
        if self.data_reply is not None:
            return self.data_reply
        raw = envelope.original_content or b""
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self.lock:
            self.deliveries.append(
                Delivery(
                    envelope.mail_from or "",
                    list(envelope.rcpt_tos),
                    msg,
                    raw,
                    tls=session.ssl is not None,
                )
            )
        return "250 2.0.0 Message accepted"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        self.quit_event.set()
        return "221 Bye"

    def by_message_id(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.deliveries:
            mid = str(d.message["Message-ID"])
            counts[mid] = counts.get(mid, 0) + 1
        return counts


class _CountingSMTP(SMTP):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the second call after STARTTLS
            self.event_handler.connections += 1
        super().connection_made(transport)


class _Controller(Controller):
    """Controller on a socket bound to 127.0.0.1:0, so the port is the kernel's choice."""

    def __init__(self, handler: Recorder, **kwargs: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        port = self._sock.getsockname()[1]
        super().__init__(
            handler, hostname="127.0.0.1", port=port, server_hostname="localhost", **kwargs
        )

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock, ssl=self.ssl_context)

    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class Peer:
    recorder: Recorder
    port: int
    controller: _Controller

    def profile(self, **overrides: Any) -> dict[str, Any]:
        """An smtp profile pointing at this server (plain, no login) with fast test timeouts."""
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "security": "none",
            "timeout": 5,
            "pool_size": 2,
            "idle_timeout": 30,
        }
        base.update(overrides)
        return base


@dataclass
class TlsCerts:
    server_context: ssl.SSLContext
    ca_path: Path
    other_ca_path: Path  # a CA that did not sign the server's certificate


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    d = tmp_path_factory.mktemp("smtp-certs")
    ca_path = d / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    other = d / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    return TlsCerts(ctx, ca_path, other)


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    recorder = server.event_handler
    recorder.mechanisms.append(mechanism)
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    if not ok and recorder.echo_credentials and isinstance(auth_data, LoginPassword):
        # A careless (or hostile) server: the client must not repeat what it is told here.
        login, password = auth_data.login.decode(), auth_data.password.decode()
        return AuthResult(
            success=False, handled=False, message=f"535 5.7.8 no user {login} with {password}"
        )
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_peer(tls_certs: TlsCerts) -> Iterator[Any]:
    """Factory: ``smtp_peer(mode="plain"|"starttls"|"tls", auth=False, exclude=(), **recorder)``."""
    started: list[_Controller] = []

    def start(
        mode: str = "plain",
        *,
        auth: bool = False,
        exclude: tuple[str, ...] = (),
        **recorder_options: Any,
    ) -> Peer:
        recorder = Recorder(**recorder_options)
        kwargs: dict[str, Any] = {}
        if mode == "starttls":
            kwargs.update(tls_context=tls_certs.server_context, require_starttls=True)
        elif mode == "tls":
            kwargs["ssl_context"] = tls_certs.server_context
        if auth:
            kwargs.update(authenticator=_authenticate, auth_exclude_mechanism=list(exclude))
            if mode == "tls":
                kwargs["auth_require_tls"] = False  # implicit TLS is invisible to the SMTP layer
        controller = _Controller(recorder, **kwargs)
        controller.start()
        started.append(controller)
        recorder.connections = 0  # the controller's own start-up probe is not a client
        return Peer(recorder, controller.port, controller)

    yield start
    for controller in started:
        controller.stop()
