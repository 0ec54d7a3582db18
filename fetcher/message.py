"""Building a mail job's message: headers, body parts, Message-ID and the SMTP envelope.

Plain data in, bytes out, no I/O. Messages are built with ``EmailMessage`` and a clone of
``email.policy.SMTP`` (the default policy with CRLF line ends), which refuses CR/LF in header
values; the job's fields were already checked for injection when it was read.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.policy import EmailPolicy
from email.utils import format_datetime, make_msgid
from typing import Any

from .jobs import MailJob


class _HeaderRegistry(HeaderRegistry):
    """The stdlib registry builds a new header class on every lookup (a third of the cost of
    building a message); the classes depend only on the header name, so keep them.

    Parsing a header value is most of the rest, and most values repeat from message to message
    (the sender, Content-Type, MIME-Version, the Date within a second): a parsed header is an
    immutable ``str``, so one made for a name and value serves every message that has them.
    """

    MAX_KEPT = 4096
    MAX_VALUE = 256

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[Any]] = {}
        self._made: dict[tuple[str, str], Any] = {}

    def __getitem__(self, name: str) -> type[Any]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls

    def __call__(self, name: str, value: Any) -> Any:
        if type(value) is not str or len(value) > self.MAX_VALUE:
            return super().__call__(name, value)
        key = (name, value)
        header: Any = self._made.get(key)
        if header is None:
            header = super().__call__(name, value)
            if len(self._made) >= self.MAX_KEPT:
                self._made.clear()  # unique values (To, Subject) must not grow it forever
            self._made[key] = header
            header._fetcher_folds = {}  # see _Policy.fold_binary
        return header


class _Policy(EmailPolicy):
    """Folds a header the registry keeps once, not in every message it appears in: folding
    walks the header's parse tree, half of what serialising a small message costs."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        folds: dict[tuple[Any, ...], bytes] | None = getattr(value, "_fetcher_folds", None)
        if folds is None:
            return super().fold_binary(name, value)
        key = (name, self.max_line_length, self.linesep, self.utf8, self.cte_type)
        folded = folds.get(key)
        if folded is None:
            folded = folds[key] = super().fold_binary(name, value)
        return folded


#  email.policy.default with CRLF line ends, as SMTP wants them. cte_type 7bit makes non-ASCII
#  bodies quoted-printable or base64, so no server needs 8BITMIME to carry them intact.
POLICY = _Policy(
    **{**SMTP_POLICY.__dict__, "cte_type": "7bit", "header_factory": _HeaderRegistry()}
)
#  A bare local@domain, the common case: its envelope form is itself, no parsing needed.
_BARE_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
#  Longest wait for a courtesy QUIT: a server that does not answer it is simply dropped.


def build_message(job: MailJob) -> tuple[str, bytes, str, list[str]]:
    """(Message-ID, message bytes, envelope sender, envelope recipients) for ``job``.

    Bcc recipients are in the envelope only, never in a header.
    """
    sender = _addr_spec(job.sender)
    msg = EmailMessage(policy=POLICY)
    msg["From"] = job.sender
    if job.to:
        msg["To"] = ", ".join(job.to)
    if job.cc:
        msg["Cc"] = ", ".join(job.cc)
    msg["Subject"] = job.subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    extra = {k.lower(): (k, v) for k, v in job.headers.items()}
    given = extra.pop("message-id", None)
    # make_msgid without a domain looks up the host name, which can be very slow.
    message_id = given[1] if given else make_msgid(domain=sender.rpartition("@")[2])
    msg["Message-ID"] = message_id
    for name, value in extra.values():
        msg[name] = value
    if job.text is not None and job.html is not None:
        msg.set_content(job.text)
        msg.add_alternative(job.html, subtype="html")
    elif job.html is not None:
        msg.set_content(job.html, subtype="html")
    else:
        msg.set_content(job.text or "")
    rcpts: list[str] = []
    seen: set[str] = set()
    for addr in (*job.to, *job.cc, *job.bcc):
        spec = _addr_spec(addr)
        if spec.lower() not in seen:
            seen.add(spec.lower())
            rcpts.append(spec)
    return message_id, msg.as_bytes(), sender, rcpts


@functools.lru_cache(maxsize=1024)
def _addr_spec(value: str) -> str:
    # Cached: a run sends from the same few addresses again and again.
    return value if _BARE_ADDRESS.fullmatch(value) else MailJob.addr_spec(value)
