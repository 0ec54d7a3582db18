"""Every exception the client libraries can raise, and the error type each one becomes.

The class lists are walked from the libraries themselves (``aiohttp.client_exceptions``,
``aiosmtplib.errors``, and the ``ssl`` and ``OSError`` families they raise), so a release that
adds an exception class fails ``test_*_every_class_has_a_row`` until someone decides where it
belongs, instead of its errors landing silently in the wrong bucket. The instances are built
by hand; they go through the very functions the handlers call (``fetcher.http.classify``,
``fetcher.mail.classify``).
"""

from __future__ import annotations

import errno
import inspect
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.client_exceptions as client_exceptions
import aiohttp_socks
import aiosmtplib
import aiosmtplib.errors as smtp_errors
import pytest
import python_socks
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from fetcher import http, mail
from fetcher.config import SmtpProfile
from fetcher.errors import JobError
from fetcher.netpolicy import BlockedAddress
from fetcher.robots import RobotsRefused

RAISED = "re-raised"  # not a job's failure: classify() lets it through (a bug, or a TypeError)
#  Where an OSError subclass may come from while a request or an SMTP session runs.
SYSTEM_MODULES = {"builtins", "socket", "_socket", "ssl", "_ssl"}


@dataclass(frozen=True)
class Row:
    exc: BaseException
    type: str
    retry: bool

    def __str__(self) -> str:
        args = getattr(self.exc, "errno", None) or getattr(self.exc, "status", None) or ""
        return f"{type(self.exc).__name__}{f'({args})' if args else ''}"


def subclasses(root: type[BaseException]) -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def classes_in(module: Any) -> set[type[BaseException]]:
    return {
        obj
        for name in module.__all__
        if inspect.isclass(obj := getattr(module, name)) and issubclass(obj, BaseException)
    }


def family(root: type[BaseException], library: str) -> set[type[BaseException]]:
    """``root`` and its subclasses from the system's modules and from ``library``."""
    return {
        cls
        for cls in subclasses(root)
        if cls.__module__.split(".")[0] in {*SYSTEM_MODULES, library}
    }


# -- http -----------------------------------------------------------------------------------------

KEY = ConnectionKey("origin.test", 443, True, True, None, None, None, None)
INFO = RequestInfo(
    URL("https://origin.test/"), "GET", CIMultiDictProxy(CIMultiDict()), URL("https://origin.test/")
)
REFUSED = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


def response_error(cls: type[aiohttp.ClientResponseError], status: int) -> BaseException:
    return cls(INFO, (), status=status, message="Reason")


def cert_error() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "self-signed certificate"
    return exc


HTTP_ROWS = [
    # aiohttp.client_exceptions
    Row(aiohttp.ClientError(), "protocol", True),
    Row(aiohttp.ClientConnectionError(), "protocol", True),
    Row(aiohttp.ClientConnectionResetError(), "connect", True),
    Row(aiohttp.ClientOSError(errno.ECONNRESET, "reset"), "connect", True),
    Row(aiohttp.ClientConnectorError(KEY, REFUSED), "connect", True),
    Row(aiohttp.ClientConnectorError(KEY, BlockedAddress("10.0.0.1", "private")), "blocked", False),
    Row(client_exceptions.UnixClientConnectorError("/run/x.sock", KEY, REFUSED), "connect", True),
    Row(aiohttp.ClientProxyConnectionError(KEY, REFUSED), "connect", True),
    Row(
        aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(socket.EAI_NONAME, "unknown")),
        "dns",
        False,
    ),
    Row(
        aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(socket.EAI_AGAIN, "try again")),
        "dns",
        True,
    ),
    Row(aiohttp.ClientSSLError(KEY, ssl.SSLError(1, "handshake failure")), "tls", False),
    Row(aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError(1, "handshake failure")), "tls", False),
    Row(aiohttp.ClientConnectorCertificateError(KEY, cert_error()), "tls", False),
    Row(aiohttp.ServerConnectionError(), "protocol", True),
    Row(aiohttp.ServerDisconnectedError(), "connect", True),
    Row(aiohttp.ServerTimeoutError(), "timeout", True),
    Row(aiohttp.ConnectionTimeoutError(), "timeout", True),
    Row(aiohttp.SocketTimeoutError(), "timeout", True),
    Row(aiohttp.ServerFingerprintMismatch(b"a", b"b", "origin.test", 443), "tls", False),
    Row(response_error(aiohttp.ClientResponseError, 400), "protocol", True),
    Row(response_error(aiohttp.ContentTypeError, 200), "protocol", True),
    Row(response_error(aiohttp.WSServerHandshakeError, 400), "protocol", True),
    Row(response_error(aiohttp.TooManyRedirects, 302), "too_many_redirects", False),
    Row(response_error(aiohttp.ClientHttpProxyError, 407), "proxy", False),
    Row(response_error(aiohttp.ClientHttpProxyError, 403), "proxy", False),
    Row(response_error(aiohttp.ClientHttpProxyError, 502), "proxy", True),
    Row(response_error(aiohttp.ClientHttpProxyError, 503), "proxy", True),
    Row(response_error(aiohttp.ClientHttpProxyError, 504), "proxy", True),
    Row(aiohttp.ClientPayloadError("cut short"), "protocol", True),
    Row(aiohttp.UploadAbortedError("not sent"), "connect", True),
    Row(aiohttp.InvalidURL("http://[::1"), "invalid_url", False),
    Row(aiohttp.InvalidUrlClientError("http://[::1"), "invalid_url", False),
    Row(aiohttp.NonHttpUrlClientError("ftp://origin.test/"), "invalid_url", False),
    Row(aiohttp.RedirectClientError("ftp://origin.test/"), "too_many_redirects", False),
    Row(aiohttp.InvalidUrlRedirectClientError("http://[::1"), "too_many_redirects", False),
    Row(aiohttp.NonHttpUrlRedirectClientError("ftp://x/"), "too_many_redirects", False),
    Row(aiohttp.WSMessageTypeError("not text"), RAISED, False),
    # aiohttp-socks (SOCKS proxies), and the python_socks classes it converts
    Row(aiohttp_socks.ProxyConnectionError("cannot connect"), "connect", True),
    Row(aiohttp_socks.ProxyTimeoutError("slow"), "timeout", True),
    Row(aiohttp_socks.ProxyError("Host unreachable", error_code=4), "proxy", True),
    Row(aiohttp_socks.ProxyError("Connection refused", error_code=5), "proxy", True),
    Row(aiohttp_socks.ProxyError("Connection not allowed by ruleset", 2), "proxy", False),
    Row(aiohttp_socks.ProxyError("Username and password authentication failure"), "proxy", False),
    Row(python_socks.ProxyConnectionError(errno.ECONNREFUSED, "refused"), "connect", True),
    Row(python_socks.ProxyTimeoutError("slow"), "timeout", True),
    Row(python_socks.ProxyError("General SOCKS server failure", 1), "proxy", True),
    # fetcher's own: a redirect hop robots.txt disallows (--robots)
    Row(RobotsRefused(JobError("robots", "robots.txt of x disallows this URL")), "robots", False),
    # asyncio and the deadline
    Row(TimeoutError(), "timeout", True),
    # ssl, raised bare (outside aiohttp's handshake wrapping)
    Row(ssl.SSLError(1, "bad record mac"), "tls", False),
    Row(cert_error(), "tls", False),
    Row(ssl.SSLZeroReturnError(6, "closed"), "connect", True),
    Row(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "connect", True),
    Row(ssl.SSLSyscallError(5, "syscall"), "connect", True),
    Row(ssl.SSLWantReadError(2, "want read"), "tls", False),
    Row(ssl.SSLWantWriteError(3, "want write"), "tls", False),
    # OSError and the classes its errno picks (OSError(errno.ECONNREFUSED) is a
    # ConnectionRefusedError), and the network policy's refusal
    Row(OSError(errno.ENETUNREACH, "Network is unreachable"), "connect", True),
    Row(OSError(errno.EHOSTUNREACH, "No route to host"), "connect", True),
    Row(OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), "connect", True),
    Row(OSError(errno.EMFILE, "Too many open files"), "connect", True),
    Row(OSError(errno.ECONNREFUSED, "Connection refused"), "connect", True),
    Row(OSError(errno.ETIMEDOUT, "Connection timed out"), "timeout", True),
    Row(ConnectionError(), "connect", True),
    Row(ConnectionResetError(errno.ECONNRESET, "reset"), "connect", True),
    Row(ConnectionAbortedError(errno.ECONNABORTED, "aborted"), "connect", True),
    Row(BrokenPipeError(errno.EPIPE, "Broken pipe"), "connect", True),
    Row(BlockingIOError(errno.EAGAIN, "again"), "connect", True),
    Row(InterruptedError(errno.EINTR, "interrupted"), "connect", True),
    Row(PermissionError(errno.EACCES, "Permission denied"), "connect", True),
    Row(BlockedAddress("169.254.169.254", "link-local"), "blocked", False),
    Row(FileNotFoundError(errno.ENOENT, "No such file"), "connect", True),
    Row(FileExistsError(errno.EEXIST, "exists"), "connect", True),
    Row(IsADirectoryError(errno.EISDIR, "is a directory"), "connect", True),
    Row(NotADirectoryError(errno.ENOTDIR, "not a directory"), "connect", True),
    Row(ChildProcessError(errno.ECHILD, "no child"), "connect", True),
    Row(ProcessLookupError(errno.ESRCH, "no process"), "connect", True),
    Row(socket.gaierror(socket.EAI_NONAME, "unknown"), "connect", True),
    Row(socket.herror(1, "unknown host"), "connect", True),
]


def http_classes() -> set[type[BaseException]]:
    return (
        subclasses(aiohttp.ClientError)
        | classes_in(client_exceptions)
        | {TimeoutError}
        | family(ssl.SSLError, "aiohttp")
        | family(OSError, "aiohttp")
        | {BlockedAddress}  # from the network policy's socket factory
        | classes_in(aiohttp_socks)
        | classes_in(python_socks)
    )


def classify_http(exc: BaseException) -> tuple[str, bool]:
    try:
        error, retry, _ = http.classify(exc, 30.0, proxy="127.0.0.1:3128")
    except type(exc):
        return RAISED, False
    return error.type, retry


def test_http_every_class_has_a_row() -> None:
    missing = http_classes() - {type(row.exc) for row in HTTP_ROWS}
    assert not missing, f"no row in HTTP_ROWS for {sorted(c.__qualname__ for c in missing)}"


@pytest.mark.parametrize("row", HTTP_ROWS, ids=str)
def test_http_error_type(row: Row) -> None:
    assert classify_http(row.exc) == (row.type, row.retry)


def test_http_messages_are_one_short_line() -> None:
    for row in HTTP_ROWS:
        if row.type != RAISED:
            error, _, _ = http.classify(row.exc, 30.0, proxy="127.0.0.1:3128")
            message = error.message
            assert message and "\n" not in message and len(message) <= 300, (row, message)


def test_refused_tunnel_message_is_the_proxy_status_line() -> None:
    error, retry, reached = http.classify(
        response_error(aiohttp.ClientHttpProxyError, 503), 30.0, proxy="10.0.0.5:3128"
    )
    assert error.message == "proxy 10.0.0.5:3128 refused the tunnel: 503 Reason"
    assert retry and not reached  # nothing reached the origin: a POST may be retried too


# -- mail -----------------------------------------------------------------------------------------


def smtp_recipient(code: int) -> aiosmtplib.SMTPRecipientRefused:
    return aiosmtplib.SMTPRecipientRefused(code, "no", "a@example.test")


MAIL_ROWS = [
    Row(aiosmtplib.SMTPException("odd reply"), "protocol", True),
    Row(aiosmtplib.SMTPNotSupported("no such extension"), "protocol", True),
    Row(aiosmtplib.SMTPServerDisconnected("gone"), "connect", True),
    Row(aiosmtplib.SMTPConnectError("refused"), "connect", True),
    Row(aiosmtplib.SMTPConnectResponseError(421, "busy"), "smtp_temporary", True),
    Row(aiosmtplib.SMTPConnectResponseError(554, "go away"), "smtp_rejected", False),
    Row(aiosmtplib.SMTPTimeoutError("slow"), "timeout", True),
    Row(aiosmtplib.SMTPConnectTimeoutError("slow"), "timeout", True),
    Row(aiosmtplib.SMTPReadTimeoutError("slow"), "timeout", True),
    Row(aiosmtplib.SMTPResponseException(451, "later"), "smtp_temporary", True),
    Row(aiosmtplib.SMTPResponseException(550, "no"), "smtp_rejected", False),
    Row(aiosmtplib.SMTPHeloError(421, "busy"), "smtp_temporary", True),
    Row(aiosmtplib.SMTPHeloError(501, "bad helo"), "smtp_rejected", False),
    Row(aiosmtplib.SMTPAuthenticationError(454, "later"), "smtp_temporary", True),
    Row(aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), "smtp_auth", False),
    Row(aiosmtplib.SMTPSenderRefused(451, "later", "s@example.test"), "smtp_temporary", True),
    Row(aiosmtplib.SMTPSenderRefused(553, "no", "s@example.test"), "smtp_rejected", False),
    Row(smtp_recipient(421), "smtp_temporary", True),
    Row(smtp_recipient(550), "smtp_rejected", False),
    Row(aiosmtplib.SMTPRecipientsRefused([smtp_recipient(550)]), "smtp_rejected", False),
    Row(
        aiosmtplib.SMTPRecipientsRefused([smtp_recipient(550), smtp_recipient(450)]),
        "smtp_temporary",
        True,
    ),
    Row(aiosmtplib.SMTPDataError(452, "full"), "smtp_temporary", True),
    Row(aiosmtplib.SMTPDataError(554, "spam"), "smtp_rejected", False),
    Row(TimeoutError(), "timeout", True),
    Row(ssl.SSLError(1, "handshake failure"), "tls", False),
    Row(cert_error(), "tls", False),
    Row(ssl.SSLZeroReturnError(6, "closed"), "tls", False),
    Row(ssl.SSLEOFError(8, "EOF"), "tls", False),
    Row(ssl.SSLSyscallError(5, "syscall"), "tls", False),
    Row(ssl.SSLWantReadError(2, "want read"), "tls", False),
    Row(ssl.SSLWantWriteError(3, "want write"), "tls", False),
    Row(OSError(errno.ENETUNREACH, "Network is unreachable"), "connect", True),
    Row(OSError(errno.ECONNREFUSED, "Connection refused"), "connect", True),
    Row(OSError(errno.ETIMEDOUT, "Connection timed out"), "timeout", True),
    Row(ConnectionError(), "connect", True),
    Row(ConnectionResetError(errno.ECONNRESET, "reset"), "connect", True),
    Row(ConnectionAbortedError(errno.ECONNABORTED, "aborted"), "connect", True),
    Row(BrokenPipeError(errno.EPIPE, "Broken pipe"), "connect", True),
    Row(BlockingIOError(errno.EAGAIN, "again"), "connect", True),
    Row(InterruptedError(errno.EINTR, "interrupted"), "connect", True),
    Row(PermissionError(errno.EACCES, "Permission denied"), "connect", True),
    Row(BlockedAddress("169.254.169.254", "link-local"), "connect", True),
    Row(FileNotFoundError(errno.ENOENT, "No such file"), "connect", True),
    Row(FileExistsError(errno.EEXIST, "exists"), "connect", True),
    Row(IsADirectoryError(errno.EISDIR, "is a directory"), "connect", True),
    Row(NotADirectoryError(errno.ENOTDIR, "not a directory"), "connect", True),
    Row(ChildProcessError(errno.ECHILD, "no child"), "connect", True),
    Row(ProcessLookupError(errno.ESRCH, "no process"), "connect", True),
    Row(socket.gaierror(socket.EAI_NONAME, "unknown"), "connect", True),
    Row(socket.herror(1, "unknown host"), "connect", True),
    Row(ValueError("a bug"), RAISED, False),
]


def mail_classes() -> set[type[BaseException]]:
    smtp = subclasses(aiosmtplib.SMTPException) | classes_in(smtp_errors)
    return (
        smtp | {TimeoutError} | family(ssl.SSLError, "aiosmtplib") | family(OSError, "aiosmtplib")
    )


def classify_mail(exc: BaseException, phase: str = "mail") -> tuple[str, bool]:
    pool = mail.ProfilePool("default", SmtpProfile(host="mx.test", port=25))
    st = mail._Attempt(phase=phase)
    assert isinstance(exc, Exception)
    try:
        error, retry = mail.classify(exc, st, pool, 30.0)
    except type(exc):
        return RAISED, False
    return error.type, retry


def test_mail_every_class_has_a_row() -> None:
    missing = mail_classes() - {type(row.exc) for row in MAIL_ROWS}
    assert not missing, f"no row in MAIL_ROWS for {sorted(c.__qualname__ for c in missing)}"


@pytest.mark.parametrize("row", MAIL_ROWS, ids=str)
def test_mail_error_type(row: Row) -> None:
    assert classify_mail(row.exc) == (row.type, row.retry)


def test_mail_reply_during_starttls_is_tls() -> None:
    assert classify_mail(aiosmtplib.SMTPResponseException(454, "no tls"), "starttls") == (
        "tls",
        False,
    )
