"""JobParser: one decoded object -> HttpJob / MailJob, or an InvalidJob that says why and where."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fetcher.jobs import HttpJob, InvalidJob, JobParser, MailJob, check_url, mask_url

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def parse(obj: Any, line: int = 7, **env: str) -> HttpJob | MailJob | InvalidJob:
    return JobParser(smtp_profiles=("default", "bulk"), environ=env).parse(obj, line)


def refused(obj: Any, line: int = 7, **env: str) -> InvalidJob:
    item = parse(obj, line, **env)
    assert isinstance(item, InvalidJob), item
    return item


def test_minimal_http_job_gets_defaults_and_its_line_as_id() -> None:
    job = parse({"url": "https://example.test/a?b=1"}, line=12)
    assert isinstance(job, HttpJob)
    assert job.id == "12"
    assert job.line == 12
    assert job.kind == "http"
    assert job.method == "GET"
    assert job.headers == {} and job.params == {}
    assert job.body == "none"
    assert job.allow_redirects is True
    assert job.retry_unsafe is False
    assert job.timeout is None and job.retries is None and job.max_bytes is None
    assert str(job.target) == "https://example.test/a?b=1"


def test_full_http_job() -> None:
    job = parse(
        {
            "id": "api-1",
            "kind": "http",
            "method": "post",
            "url": "http://api.test/v1/items",
            "headers": {"Authorization": "Bearer x"},
            "params": {"q": "x", "n": 2, "f": 1.5, "b": True},
            "json": {"name": "a"},
            "timeout": 10,
            "retries": 3,
            "max_bytes": 1048576,
            "body": "text",
            "allow_redirects": False,
            "retry_unsafe": True,
            "meta": {"row": 4},
        }
    )
    assert isinstance(job, HttpJob)
    assert job.id == "api-1"
    assert job.method == "POST"
    assert job.has_json and job.json_body == {"name": "a"}
    assert job.timeout == 10 and job.retries == 3 and job.max_bytes == 1048576
    assert job.body == "text" and job.allow_redirects is False and job.retry_unsafe is True
    assert job.meta == {"row": 4}


def test_json_null_is_still_a_json_body() -> None:
    job = parse({"url": "http://a.test/", "json": None})
    assert isinstance(job, HttpJob) and job.has_json
    assert not parse({"url": "http://a.test/"}).has_json  # type: ignore[union-attr]


def test_mail_job_takes_one_address_as_a_string() -> None:
    job = parse({"kind": "mail", "from": "a@x.test", "to": "b@x.test", "subject": "Hi"})
    assert isinstance(job, MailJob)
    assert job.to == ["b@x.test"] and job.sender == "a@x.test" and job.smtp == "default"


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "must be an object, got an array"),
        ("http://a.test/", "must be an object, got a string"),
        (None, "must be an object, got null"),
        (5, "must be an object, got a number"),
        ({}, "missing field 'url'"),
        ({"kind": "ftp", "url": "http://a.test/"}, "kind"),
    ],
)
def test_not_a_job_is_invalid_job_with_unknown_kind(obj: Any, message: str) -> None:
    bad = refused(obj, line=3)
    assert bad.type == "invalid_job"
    assert message in bad.message
    assert bad.kind is None
    assert bad.id == "3" and bad.line == 3


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"timeout": "soon"}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"retries": -1}, "retries"),
        ({"retries": "3"}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retry_unsafe": 1}, "retry_unsafe"),
        ({"allow_redirects": "true"}, "allow_redirects"),
        ({"max_bytes": -5}, "max_bytes"),
        ({"headers": ["X-A: 1"]}, "headers"),
        ({"headers": {"X-A": 1}}, "headers"),
        ({"params": {"a": [1, 2]}}, "params"),
        ({"method": "GE T"}, "method"),
        ({"method": 5}, "method"),
        ({"body": "xml"}, "body"),
        ({"allow_redirects": "sometimes"}, "allow_redirects"),
        ({"data": {"a": 1}}, "data"),
        ({"json": {"a": 1}, "data": "x"}, "at most one"),
        ({"bogus": 1}, "bogus: unknown field"),
        ({"url": 5}, "url"),
    ],
)
def test_wrong_field_types_are_invalid_job_keeping_id_and_kind(
    fields: dict[str, Any], where: str
) -> None:
    bad = refused({"id": "x1", "url": "http://a.test/", **fields}, line=9)
    assert bad.type == "invalid_job"
    assert where in bad.message
    assert bad.id == "x1" and bad.kind == "http" and bad.line == 9


def test_non_string_id_is_invalid_job_with_the_line_as_id() -> None:
    bad = refused({"id": 42, "url": "http://a.test/"}, line=5)
    assert bad.type == "invalid_job" and "id" in bad.message
    assert bad.id == "5" and bad.kind == "http"


@pytest.mark.parametrize(
    "fields",
    [
        {"headers": {"X-A": "ok\r\nX-Injected: 1"}},
        {"headers": {"X-A": "nul\x00"}},
        {"headers": {"Bad Name": "v"}},
        {"method": "GET\r\nX: y"},
    ],
)
def test_line_breaks_in_headers_or_method_are_invalid_job(fields: dict[str, Any]) -> None:
    assert refused({"url": "http://a.test/", **fields}).type == "invalid_job"


@pytest.mark.parametrize(
    "fields",
    [
        {"to": ["b@x.test\r\nBcc: victim@x.test"]},
        {"from": "a@x.test\n"},
        {"subject": "Hi\r\nBcc: victim@x.test"},
    ],
)
def test_line_breaks_in_mail_fields_are_invalid_job(fields: dict[str, Any]) -> None:
    job = {"kind": "mail", "from": "a@x.test", "to": ["b@x.test"], **fields}
    bad = refused(job)
    assert bad.type == "invalid_job" and bad.kind == "mail"


#  Every character str.splitlines() breaks a line at (the email package folds and parses
#  headers with it), NUL and the other C0 controls but TAB, and DEL.
LINE_BREAKERS = sorted(
    {chr(cp) for cp in range(0x110000) if len(f"a{chr(cp)}b".splitlines()) > 1}
    | {chr(cp) for cp in range(0x20) if cp != 0x09}
    | {"\x7f"}
)


def test_line_breakers_include_the_unicode_ones() -> None:
    # The list above is computed; make sure it holds what the email package would split on.
    for ch in "\v\f\x1c\x1d\x1e\x85\u2028\u2029\r\n\x00":
        assert ch in LINE_BREAKERS


MAIL_FIELDS: list[tuple[str, Any, str]] = [
    ("subject", "Hi{}Bcc: victim@x.test", "subject"),
    ("from", "Ann{}<a@x.test>", "from"),
    ("to", ["b@x.test{}"], "to"),
    ("cc", ["C{}<c@x.test>"], "cc"),
    ("bcc", "d@x.test{}", "bcc"),
    ("headers", {"X-A": "v{}Bcc: victim@x.test"}, "headers"),
]


def _with_char(value: Any, ch: str) -> Any:
    if isinstance(value, str):
        return value.format(ch)
    if isinstance(value, list):
        return [v.format(ch) for v in value]
    return {k: v.format(ch) for k, v in value.items()}


@pytest.mark.parametrize("ch", LINE_BREAKERS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize(("field", "value", "where"), MAIL_FIELDS, ids=[f[0] for f in MAIL_FIELDS])
def test_line_breaks_and_controls_in_mail_fields_are_invalid_job(
    field: str, value: Any, where: str, ch: str
) -> None:
    job = {"id": "m", "kind": "mail", "from": "a@x.test", "to": ["b@x.test"]}
    job[field] = _with_char(value, ch)
    bad = refused(job, line=5)
    assert bad.type == "invalid_job" and bad.kind == "mail", bad
    assert bad.line == 5 and bad.id == "m"
    assert bad.message.startswith(where), bad.message
    assert ch not in bad.message  # the one-line report stays one line


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": "Grüße\tand a tab — ça va? ✓"},
        {"from": "Zoë Ünïcode <a@x.test>"},
        {"headers": {"X-A": "a\tb ✓"}},
    ],
)
def test_tab_and_printable_unicode_in_mail_fields_are_fine(fields: dict[str, Any]) -> None:
    job = {"kind": "mail", "from": "a@x.test", "to": ["b@x.test"], **fields}
    assert isinstance(parse(job), MailJob)


def test_mail_without_recipients_or_with_unknown_profile() -> None:
    assert "recipient" in refused({"kind": "mail", "from": "a@x.test", "to": []}).message
    bad = refused({"kind": "mail", "from": "a@x.test", "to": "b@x.test", "smtp": "nope"})
    assert "unknown profile" in bad.message
    assert isinstance(parse({"kind": "mail", "from": "a@x", "to": "b@x", "smtp": "bulk"}), MailJob)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://a.test/file",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "/relative/path",
        "a.test/no-scheme",
        "http://",
        "http://a.test:99999/",
        "http://a.test/\r\nHost: evil",
        "http://a.test/\n",
        "http://a.test/\x00",
        "http://a .test/",
        "",
    ],
)
def test_bad_urls_are_invalid_url_without_attempts(url: str) -> None:
    bad = refused({"id": "u", "url": url}, line=4)
    assert bad.type == "invalid_url"
    assert bad.kind == "http" and bad.id == "u" and bad.line == 4
    result = bad.to_result()
    assert result["attempts"] == 0 and result["elapsed_ms"] == 0 and result["ok"] is False
    assert result["url"] == url


def test_invalid_url_result_masks_the_password() -> None:
    bad = refused({"url": "ftp://user:topsecret@a.test/"})
    assert bad.url == "ftp://user:***@a.test/"
    assert "topsecret" not in str(bad.to_result())


@pytest.mark.parametrize(
    "url",
    [
        "http:/u:secret@h.test/",
        "http:\\u:secret@h.test/",
        "http:\\\\u:secret@h.test/",
        "http:///u:secret@h.test/",
        "u:secret@h.test/x",
        " http://u:secret@h.test/",
        "http://u:secret@h.test:bad/",
        "http://u:se?cret@h.test/",
        "http://u:se#cret@h.test/",
        "http://u:secret@[::1/",
        "http:/u:sec@ret@h.test/",
        "http:/u:se/cret@h.test/",
        "ftp:/u:secret@h.test/",
    ],
)
def test_malformed_url_with_credentials_never_shows_the_password(url: str) -> None:
    bad = refused({"id": "u", "url": url})
    assert bad.type == "invalid_url", bad
    assert bad.url is not None and "***" in bad.url, bad.url
    for part in ("secret", "cret", "se"):
        assert part not in bad.url.replace("h.test", ""), bad.url
    assert "secret" not in str(bad.to_result())


def test_invalid_job_result_line_fields() -> None:
    result = refused([1], line=11).to_result()
    assert set(result) == {"id", "kind", "ok", "attempts", "started_at", "elapsed_ms", "error"} | {
        "line"
    }
    assert result["id"] == "11" and result["line"] == 11 and result["kind"] is None
    assert result["ok"] is False and result["attempts"] == 0 and result["elapsed_ms"] == 0
    assert result["error"]["type"] == "invalid_job" and result["error"]["message"]
    assert ISO_UTC.match(result["started_at"])


def test_env_references_are_expanded_everywhere() -> None:
    job = parse(
        {
            "url": "http://${HOST}/p",
            "headers": {"Authorization": "Bearer ${TOKEN}"},
            "params": {"k": "${TOKEN}"},
            "json": {"nested": ["${TOKEN}"]},
        },
        HOST="api.test",
        TOKEN="t0k",
    )
    assert isinstance(job, HttpJob)
    assert str(job.target) == "http://api.test/p"
    assert job.headers == {"Authorization": "Bearer t0k"}
    assert job.params == {"k": "t0k"}
    assert job.json_body == {"nested": ["t0k"]}


def test_double_dollar_keeps_a_literal_reference() -> None:
    job = parse({"url": "http://a.test/", "data": "$${NOT_EXPANDED}"})
    assert isinstance(job, HttpJob) and job.data == "${NOT_EXPANDED}"


def test_missing_env_variable_is_invalid_job_naming_it() -> None:
    bad = refused({"id": "s", "url": "http://a.test/", "headers": {"X": "${ABSENT_VAR}"}}, line=2)
    assert bad.type == "invalid_job" and bad.id == "s" and bad.line == 2
    assert "ABSENT_VAR" in bad.message


def test_env_values_are_read_at_parse_time_not_from_the_file() -> None:
    parser = JobParser(environ={"T": "one"})
    first = parser.parse({"url": "http://a.test/", "headers": {"X": "${T}"}}, 1)
    assert isinstance(first, HttpJob) and first.headers["X"] == "one"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("http://u:pw@a.test/x", "http://u:***@a.test/x"),
        ("http://u@a.test/x", "http://u@a.test/x"),
        ("http://a.test/x?p=@", "http://a.test/x?p=@"),
        # An @ after the host is not userinfo: a well-formed URL without a password stays as is.
        ("http://a.test:8080/x?p=a:b@c", "http://a.test:8080/x?p=a:b@c"),
        ("http://a.test/u:v@w", "http://a.test/u:v@w"),
        ("http:/u@a.test/", "http:/u@a.test/"),  # a user name, no password
        ("http:/u:pw@a.test/x", "http:/u:***@a.test/x"),
        ("u:pw@a.test/x", "u:***@a.test/x"),
        ("https://a.test/", "https://a.test/"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_check_url_accepts_http_and_https() -> None:
    for url in (
        "http://a.test/",
        "https://a.test:8443/x?y=1",
        "HTTP://A.TEST/",
        "http://[::1]:80/",
    ):
        parsed, reason = check_url(url)
        assert parsed is not None and reason == "", url


def test_timestamps_are_the_wall_clock_to_the_millisecond_across_cached_calls() -> None:
    from datetime import UTC, datetime

    from fetcher.timeutil import utc_now_iso

    seen = []
    for _ in range(2000):  # many calls land in the same millisecond and reuse its text
        now = datetime.now(UTC)
        before = now.replace(microsecond=now.microsecond // 1000 * 1000)  # this millisecond
        stamp = utc_now_iso()
        after = datetime.now(UTC)
        assert ISO_UTC.match(stamp), stamp
        when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before <= when <= after, (before, stamp, after)  # never an earlier ms's text
        seen.append(stamp)
    assert len(set(seen)) > 1  # the run spanned several milliseconds


def test_timestamps_follow_the_clock_across_a_second_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fetcher import timeutil

    clock = iter([1_764_547_199_998, 1_764_547_199_998, 1_764_547_199_999, 1_764_547_200_000])
    monkeypatch.setattr(timeutil.time, "time_ns", lambda: next(clock) * 1_000_000)
    stamps = [timeutil.utc_now_iso() for _ in range(4)]
    assert stamps == [
        "2025-11-30T23:59:59.998Z",
        "2025-11-30T23:59:59.998Z",
        "2025-11-30T23:59:59.999Z",
        "2025-12-01T00:00:00.000Z",
    ]
