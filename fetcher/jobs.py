"""Jobs as read from a job file: validation into HttpJob / MailJob, or an InvalidJob.

Plain data, no I/O. ``JobParser.parse`` turns one decoded object into a job, never raising for bad
input: whatever is wrong with it becomes an InvalidJob that the run reports as one result line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from yarl import URL

from .config import expand_env
from .errors import ErrorType, JobError
from .results import refused
from .timeutil import utc_now_iso

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#  \Z, not $: "$" also matches before a trailing newline, which would let "GET\n" through.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#  Control characters other than HTAB have no place in a header value (RFC 9110 field-vchar).
_BAD_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#  ... and in a mail header neither has any character that str.splitlines() breaks at: the email
#  package folds and re-parses headers with it, so \x85 or U+2028 in a subject can start a new
#  header line just as CRLF does.
_BAD_MAIL_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
#  Limits on one job's shape, so that nothing downstream (${NAME} expansion, validation, the
#  JSON writer, whose own limit is 255 levels) ever meets a structure too deep or too big.
MAX_JOB_DEPTH = 100
MAX_JOB_NODES = 100_000
#  Methods that change state on the server: never retried once the request may have reached it.
UNSAFE_METHODS = frozenset({"POST", "PATCH"})


def _no_line_breaks(v: str) -> str:
    if _BAD_MAIL_VALUE.search(v):
        raise ValueError("must not contain line breaks (CR, LF, U+2028, ...) or control characters")
    return v


def _method(v: str) -> str:
    if not _TOKEN.match(v):
        raise ValueError("must be an HTTP token (letters, no spaces or control characters)")
    return v.upper()


def _hex_digest(v: str) -> str:
    if not _SHA256.match(v):
        raise ValueError("must be a sha256 hex digest (64 hex digits)")
    return v.lower()


_SHA256 = re.compile(r"\A[0-9A-Fa-f]{64}\Z")
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h", "socks4", "socks4a")


def _proxy_url(v: str) -> str:
    try:
        url = URL(v)
    except ValueError:
        url = None
    if url is None or url.scheme.lower() not in PROXY_SCHEMES or not url.host:
        # The value may hold credentials: the message does not repeat it.
        raise ValueError(f"must be a proxy URL with a host ({', '.join(PROXY_SCHEMES)})")
    return v


def _header_map(v: dict[str, str]) -> dict[str, str]:
    for name, value in v.items():
        if not _TOKEN.match(name):
            raise ValueError(f"header name {name!r} is not a valid token")
        if _BAD_HEADER_VALUE.search(value):
            raise ValueError(f"header {name} must not contain CR, LF, NUL or control characters")
    return v


def _mail_header_map(v: dict[str, str]) -> dict[str, str]:
    _header_map(v)
    for name, value in v.items():
        if _BAD_MAIL_VALUE.search(value):
            raise ValueError(f"header {name} must not contain line breaks or control characters")
    return v


SafeStr = Annotated[str, AfterValidator(_no_line_breaks)]
Headers = Annotated[dict[str, str], AfterValidator(_header_map)]
MailHeaders = Annotated[dict[str, str], AfterValidator(_mail_header_map)]
ParamValue = str | int | float | bool


class _Job(BaseModel):
    # strict: a job file's types are exact ("retries": "3" is a wrong type, not 3).
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, strict=True, defer_build=True
    )

    id: str
    timeout: float | None = Field(default=None, gt=0)
    retries: int | None = Field(default=None, ge=0, le=100)
    meta: Any = None
    """Anything the user wants carried into the result line untouched (e.g. a row key)."""

    _line: int = PrivateAttr(0)

    @property
    def line(self) -> int:
        """1-based line (JSONL) or position (YAML) of the job in its input."""
        line: int = self.__pydantic_private__["_line"]  # type: ignore[index]  # as in target
        return line


class HttpJob(_Job):
    """An http job, validated: a job-file line with ``"url"`` (``kind`` may be left out).

    Build one with keyword arguments (``HttpJob(id="a", url="https://example.com/")``, the
    request body as ``json=``) or let ``JobParser`` / ``Runner.run`` validate a dict.
    """

    kind: Literal["http"] = "http"
    url: str
    method: Annotated[str, AfterValidator(_method)] = "GET"
    headers: Headers = Field(default_factory=dict)
    params: dict[str, ParamValue] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    data: str | None = None
    max_bytes: int | None = Field(default=None, ge=0)
    allow_redirects: bool = True
    body: Literal["none", "text", "base64", "json"] = "none"
    retry_unsafe: bool = False
    #  The body's expected digest: a mismatch is error checksum (and no file kept).
    sha256: Annotated[str, AfterValidator(_hex_digest)] | None = None
    #  This job's proxy, over the config's: http(s)://, socks5://, socks5h://, socks4://.
    proxy: Annotated[str, AfterValidator(_proxy_url)] | None = Field(default=None, repr=False)

    _url: URL = PrivateAttr()

    @model_validator(mode="after")
    def _one_body(self) -> HttpJob:
        if "json_body" in self.model_fields_set and self.data is not None:
            raise ValueError("give at most one of 'json' and 'data'")
        return self

    @property
    def has_json(self) -> bool:
        return "json_body" in self.model_fields_set

    @property
    def target(self) -> URL:
        """The parsed URL (validated when the job was read)."""
        # Read from the private-attribute dict directly: ``self._url`` goes through pydantic's
        # ``__getattr__`` (~30x slower), and this runs on every attempt.
        url: URL = self.__pydantic_private__["_url"]  # type: ignore[index]
        return url


class MailJob(_Job):
    """A mail job, validated: ``"kind": "mail"``, ``from`` (``sender=`` in Python), ``to``,
    ``cc``, ``bcc`` (a string or a list), ``subject``, ``text`` and/or ``html``, ``headers``,
    sent through the SMTP profile named by ``smtp``."""

    kind: Literal["mail"] = "mail"
    smtp: str = "default"
    sender: SafeStr = Field(alias="from")
    to: list[SafeStr]
    cc: list[SafeStr] = Field(default_factory=list)
    bcc: list[SafeStr] = Field(default_factory=list)
    subject: SafeStr = ""
    text: str | None = None
    html: str | None = None
    headers: MailHeaders = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _listify(cls, data: Any) -> Any:
        # `to`, `cc` and `bcc` accept one address as a plain string.
        if isinstance(data, dict):
            for key in ("to", "cc", "bcc"):
                if isinstance(data.get(key), str):
                    data = {**data, key: [data[key]]}
        return data

    @model_validator(mode="after")
    def _has_recipient(self) -> MailJob:
        if not (self.to or self.cc or self.bcc):
            raise ValueError("needs at least one recipient in 'to', 'cc' or 'bcc'")
        return self

    @model_validator(mode="after")
    def _check_addresses(self) -> MailJob:
        # Checked here, not when sending, so that `fetcher validate` catches them.
        groups = (("from", [self.sender]), ("to", self.to), ("cc", self.cc), ("bcc", self.bcc))
        for field, values in groups:
            for value in values:
                reason = MailJob.address_problem(value)
                if reason:
                    raise ValueError(f"{field}: {value!r} {reason}")
        # The message builder writes these from the job's own fields. Message-ID is allowed:
        # a job may fix its own so that receivers can drop a duplicate.
        reserved = {"from", "to", "cc", "bcc", "subject", "date", "mime-version"}
        reserved |= {"content-type", "content-transfer-encoding"}
        for name, value in self.headers.items():
            if name.lower() in reserved:
                raise ValueError(f"headers: {name} is set from the job's own fields")
            if name.lower() == "message-id" and not (
                value.startswith("<") and value.endswith(">") and "@" in value
            ):
                raise ValueError("headers: Message-ID must look like <id@domain>")
        return self

    @staticmethod
    def address_problem(value: str) -> str:
        """Why ``value`` is not one usable mail address (``Name <a@b>`` or ``a@b``); "" if it is."""
        from email.policy import default

        try:
            header = default.header_factory("to", value)
            addresses = header.addresses
        except Exception:  # noqa: BLE001 - the stdlib parser raises assorted errors on odd input
            return "is not a mail address"
        if len(addresses) != 1:
            return "must be exactly one address (give a list for several)"
        if header.defects or not addresses[0].username or not addresses[0].domain:
            return "is not a mail address"
        if not addresses[0].addr_spec.isascii():
            return "has a non-ASCII address part (only the display name may be non-ASCII)"
        return ""

    @staticmethod
    def addr_spec(value: str) -> str:
        """The bare ``local@domain`` of a validated address, as the SMTP envelope needs it."""
        from email.policy import default

        addr: str = default.header_factory("to", value).addresses[0].addr_spec
        return addr


Job = HttpJob | MailJob


@dataclass(slots=True, frozen=True)
class InvalidJob:
    """A job refused before any attempt; its result line says why and where."""

    id: str
    line: int
    kind: str | None
    type: ErrorType
    message: str
    read_at: str
    url: str | None = None

    def to_result(self) -> dict[str, Any]:
        return refused(
            self.id,
            self.kind,
            line=self.line,
            started_at=self.read_at,
            error=JobError(self.type, self.message),
            url=self.url,
        )


def merge_defaults(defaults: dict[str, Any], job: Any) -> Any:
    """The job over its defaults; ``headers`` and ``params`` are merged one level deep."""
    if not isinstance(job, dict):
        return job
    merged = {**defaults, **job}
    for key in ("headers", "params"):
        if isinstance(defaults.get(key), dict) and isinstance(job.get(key), dict):
            merged[key] = {**defaults[key], **job[key]}
    return merged


#  What can start a malformed URL before its userinfo: a scheme, and any slashes after it.
_SCHEME_PREFIX = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*:[/\\]*")


def mask_url(url: str) -> str:
    """The URL with any password in it replaced by ``***``."""
    if "@" not in url:
        return url
    try:
        u = URL(url)
        u.port  # noqa: B018 - a bad port raises only when read
        well_formed = u.absolute and u.host is not None
    except (ValueError, TypeError):
        well_formed = False
    if not well_formed:
        # yarl finds no userinfo in "http:/u:pw@h/" or "u:pw@h/x", and raises on others, yet
        # such a URL is shown in its invalid_url line and may be one typo from a real one.
        return _mask_userinfo(url)
    if u.password is None:
        return url  # any @ is in the path, query or fragment
    return str(u.with_password("***"))


def _mask_userinfo(url: str) -> str:
    """Mask what looks like ``user:password@`` in a URL yarl could not make sense of.

    Everything between the first colon of the would-be userinfo and the last ``@`` is hidden:
    a password in a malformed URL may hold ``/``, ``?``, ``#``, ``:`` or ``@`` unescaped.
    """
    head, _, tail = url.rpartition("@")
    prefix = _SCHEME_PREFIX.match(head)
    keep = prefix.group() if prefix else ""
    rest = head[len(keep) :]
    if ":" in rest:
        masked = f"{keep}{rest.partition(':')[0]}:***@{tail}"
    elif keep.endswith(":"):
        masked = f"{keep}***@{tail}"  # "u:pw@h": what looks like a scheme may be the user
    else:
        return url  # a user name alone: nothing secret
    # The masked URL also goes into one-line messages (``--redis URL: ...``).
    return _CONTROL.sub("", masked)


def _describe(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    # A field name is the job file's text: keep control characters out of the one-line message.
    return _CONTROL.sub("?", f"{loc}: {msg}" if loc else msg)


def _expand(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return expand_env(node, environ) if "${" in node else node  # type: ignore[arg-type]
    if isinstance(node, dict):
        return {k: _expand(v, environ) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, environ) for v in node]
    return node


#  An http(s) URL of only these characters (a lowercase host name or IPv4 address, a port
#  without a leading zero, a path; no user info, percent-escapes or fragment) is already in the
#  form yarl would encode it to, once dot segments are ruled out too: it is taken as encoded,
#  which spares yarl's quoting and path normalization, a third of its parsing cost
#  (tests/test_parser_props.py compares the two).
_CANONICAL_URL = re.compile(
    r"https?://[a-z0-9.-]+(?::[1-9][0-9]{0,4})?/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*"
    r"(?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@/?]*)?\Z"
)


def check_url(url: str) -> tuple[URL | None, str]:
    """Parse an http(s) URL; return (URL, "") or (None, reason)."""
    if _CANONICAL_URL.match(url) and "/." not in url:
        u = URL(url, encoded=True)
    else:
        if _CONTROL.search(url) or " " in url:
            return None, "URL contains control characters or spaces"
        try:
            u = URL(url)
        except (ValueError, TypeError):
            return None, "URL cannot be parsed"
        if u.scheme not in ("http", "https"):
            return None, "only absolute http:// and https:// URLs are fetched"
        if not u.host:
            return None, "URL has no host"
    try:
        u.port  # noqa: B018 - a bad port raises only when read
    except ValueError:
        return None, "URL has an invalid port"
    return u, ""


class JobParser:
    """Turns decoded job objects into jobs; knows the SMTP profile names to check against."""

    def __init__(
        self,
        *,
        smtp_profiles: Collection[str] = ("default",),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._profiles = frozenset(smtp_profiles)
        self._environ = os.environ if environ is None else environ

    @property
    def environ(self) -> Mapping[str, str]:
        """Where ``${NAME}`` references are looked up."""
        return self._environ

    def invalid(
        self, line: int, message: str, *, id: str | None = None, kind: str | None = None
    ) -> InvalidJob:
        return InvalidJob(
            id=id if id is not None else str(line),
            line=line,
            kind=kind,
            type="invalid_job",
            message=message,
            read_at=utc_now_iso(),
        )

    def parse_json(
        self,
        raw: bytes,
        line: int,
        *,
        defaults: dict[str, Any] | None = None,
        expand_defaults: bool = False,
    ) -> HttpJob | MailJob | InvalidJob:
        """One job as JSON text: a JSONL line, or the job of a Redis stream entry. The one path
        from bytes to a job, for job files and workers alike."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            return self.invalid(line, f"not valid JSON: {detail}")
        # Expanding ${NAME} walks the whole job; skip the walk when the line holds no reference.
        if defaults:
            return self.parse(
                merge_defaults(defaults, obj), line, expand=expand_defaults or b"${" in raw
            )
        return self.parse(obj, line, expand=b"${" in raw)

    def parse(self, obj: Any, line: int, *, expand: bool = True) -> HttpJob | MailJob | InvalidJob:
        """Validate one job object read at ``line``; never raises for bad input."""
        if not isinstance(obj, dict):
            return self.invalid(line, f"a job must be an object, got {_json_type(obj)}")
        if obj.keys() <= _PLAIN_KEYS and (plain := _plain_http_job(obj, line)) is not None:
            return plain
        if (problem := _shape_problem(obj)) is not None:
            return self.invalid(line, problem)
        raw_id = obj.get("id")
        id_ = raw_id if isinstance(raw_id, str) else str(line)
        kind = obj.get("kind")
        if kind is None:
            kind = "http" if "url" in obj else None
        known_kind = kind if kind in ("http", "mail") else None
        if raw_id is not None and not isinstance(raw_id, str):
            return self.invalid(line, "id: must be a string", id=id_, kind=known_kind)
        if known_kind is None:
            msg = (
                "missing field 'url' (or 'kind': 'mail')"
                if kind is None
                else ("kind: must be 'http' or 'mail'")
            )
            return self.invalid(line, msg, id=id_)
        if expand:
            try:
                obj = _expand(obj, self._environ)
            except KeyError as exc:
                return self.invalid(
                    line, f"environment variable {exc.args[0]} is not set", id=id_, kind=kind
                )
        if raw_id is None:
            obj = {**obj, "id": id_}
        try:
            model: type[HttpJob | MailJob] = HttpJob if kind == "http" else MailJob
            job = model.model_validate(obj)
        except ValidationError as exc:
            return self.invalid(line, _describe(exc), id=id_, kind=kind)
        except RecursionError:
            return self.invalid(line, "job is nested too deeply", id=id_, kind=kind)
        job._line = line
        if isinstance(job, HttpJob):
            url, reason = check_url(job.url)
            if url is None:
                return InvalidJob(
                    id=id_,
                    line=line,
                    kind="http",
                    type="invalid_url",
                    message=reason,
                    read_at=utc_now_iso(),
                    url=mask_url(job.url),
                )
            job._url = url
        elif job.smtp not in self._profiles:
            return self.invalid(line, f"smtp: unknown profile {job.smtp!r}", id=id_, kind=kind)
        return job


#  A job of only these fields, all plain ASCII strings, is the common case of a big batch
#  ({"id": ..., "url": ...}): it is built without the model's validator, which would check
#  nothing more, at a fifth of the cost.
_PLAIN_KEYS = frozenset({"id", "url", "kind"})
_PLAIN_FIELDS_SET = frozenset({"id", "url"})
_HTTP_DEFAULTS = {
    name: field.get_default(call_default_factory=True)
    for name, field in HttpJob.model_fields.items()
    if not field.is_required()
}


def _plain_http_job(obj: dict[str, Any], line: int) -> HttpJob | None:
    """The job for a plain ``{"id", "url"[, "kind": "http"]}`` object, or None to take the
    full path (anything else, including every invalid job, is validated by the model)."""
    url = obj.get("url")
    id_ = obj.get("id")
    if (
        type(url) is not str
        or not url.isascii()
        or "${" in url
        or obj.get("kind", "http") != "http"
    ):
        return None
    if id_ is None:
        id_ = str(line)
    elif type(id_) is not str or not id_.isascii() or "${" in id_:
        return None
    target, _ = check_url(url)
    if target is None:
        return None
    job = _new_object(HttpJob)
    values = dict(_HTTP_DEFAULTS)
    values["id"] = id_
    values["url"] = url
    values["headers"] = {}
    values["params"] = {}
    _set_attr(job, "__dict__", values)
    _set_attr(job, "__pydantic_fields_set__", set(_PLAIN_FIELDS_SET))
    _set_attr(job, "__pydantic_extra__", None)
    _set_attr(job, "__pydantic_private__", {"_line": line, "_url": target})
    return job


_new_object = object.__new__
_set_attr = object.__setattr__


def _shape_problem(obj: Any) -> str | None:
    """Why ``obj`` is not plain JSON data of a sane size, or None.

    Walked without recursion and stopped at the first problem, so a YAML alias bomb or a
    self-referencing structure costs at most MAX_JOB_NODES steps.
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    seen = 1  # values pushed so far, counted before pushing so the stack stays small too
    too_many = f"job has more than {MAX_JOB_NODES} values"
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JOB_DEPTH:
            return f"job is nested more than {MAX_JOB_DEPTH} levels deep"
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode()
                except UnicodeEncodeError:
                    return "job holds a string that is not valid Unicode (a lone surrogate)"
        elif isinstance(node, dict):
            seen += 2 * len(node)
            if seen > MAX_JOB_NODES:
                return too_many
            for key, value in node.items():
                if not isinstance(key, str):
                    return f"job holds a mapping key of type {type(key).__name__}, not a string"
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            seen += len(node)
            if seen > MAX_JOB_NODES:
                return too_many
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, bool | float) or node is None:
            pass
        elif isinstance(node, int):
            if not -(2**63) <= node < 2**64:
                return "job holds an integer outside the 64-bit range"
        else:
            return f"job holds a value of type {type(node).__name__}, which JSON cannot hold"
    return None


def _json_type(obj: Any) -> str:
    if obj is None:
        return "null"
    return {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(obj), type(obj).__name__)
