"""HttpHandler against the fault server: every outcome maps to SPEC's error type and fields."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import random
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import orjson
import pytest

from fetcher.config import load_settings
from fetcher.http import HttpHandler, retry_after_seconds
from fetcher.pool import Pool, RetryPolicy
from fetcher.results import Outcome

from .app import BOMB_INFLATED, GZIP_TEXT, JSON_BODY, ServerThread
from .conftest import http_job

DEADLINE = 0.4


def handler(**overrides: Any) -> HttpHandler:
    return HttpHandler(load_settings(overrides={"timeout": 5, **overrides}))


async def fetch(url: str, settings: dict[str, Any] | None = None, **job: Any) -> Outcome:
    async with handler(**(settings or {})) as h:
        return await h.attempt(http_job(url, **job))


def error_type(outcome: Outcome) -> str | None:
    return None if outcome.error is None else outcome.error.type


def assert_one_line(outcome: Outcome) -> None:
    assert outcome.error is not None
    message = outcome.error.message
    assert message and "\n" not in message and "<" not in message, message


# --- success -----------------------------------------------------------------------------------


async def test_ok_carries_every_http_field(base_url: str) -> None:
    out = await fetch(f"{base_url}/ok")
    assert out.ok and out.error is None and out.retry is False
    f = out.fields
    assert f["url"] == f"{base_url}/ok"
    assert f["final_url"] == f"{base_url}/ok"
    assert f["method"] == "GET"
    assert f["status"] == 200
    assert f["content_type"] == "text/plain; charset=utf-8"
    assert f["bytes"] == 6
    assert f["sha256"] == hashlib.sha256(b"hello\n").hexdigest()
    assert f["redirects"] == 0
    assert f["headers"]["content-length"] == "6"
    assert "body" not in f  # body mode "none" is the default


async def test_response_header_names_are_lower_cased_and_repeats_joined(base_url: str) -> None:
    out = await fetch(f"{base_url}/headers")
    headers = out.fields["headers"]
    assert all(name == name.lower() for name in headers)
    assert headers["x-mixed-case"] == "Value"
    assert headers["x-repeated"] == "one, two"


async def test_gzip_body_is_measured_after_decompression(base_url: str) -> None:
    out = await fetch(f"{base_url}/gzip", body="text")
    assert out.ok
    assert out.fields["headers"]["content-encoding"] == "gzip"
    assert out.fields["bytes"] == len(GZIP_TEXT) != len(gzip.compress(GZIP_TEXT))
    assert out.fields["sha256"] == hashlib.sha256(GZIP_TEXT).hexdigest()
    assert out.fields["body"] == GZIP_TEXT.decode()


async def test_pinned_name_resolves_to_its_address(server: ServerThread) -> None:
    out = await fetch(
        f"http://api.fetcher.test:{server.port}/ok", {"resolve": {"api.fetcher.test": "127.0.0.1"}}
    )
    assert out.ok, out.error
    assert out.fields["final_url"] == f"http://api.fetcher.test:{server.port}/ok"


# --- body modes --------------------------------------------------------------------------------


async def test_body_text(base_url: str) -> None:
    out = await fetch(f"{base_url}/ok", body="text")
    assert out.fields["body"] == "hello\n"


async def test_body_base64(base_url: str) -> None:
    out = await fetch(f"{base_url}/gzip", body="base64")
    assert base64.b64decode(out.fields["body"]) == GZIP_TEXT


async def test_body_json_is_parsed(base_url: str) -> None:
    out = await fetch(f"{base_url}/json", body="json")
    assert out.ok
    assert out.fields["body"] == JSON_BODY
    assert "body_error" not in out.fields


async def test_body_json_that_is_not_json_gives_null_and_keeps_the_job_ok(base_url: str) -> None:
    out = await fetch(f"{base_url}/not-json", body="json")
    assert out.ok and out.error is None
    assert out.fields["body"] is None
    assert out.fields["body_error"].startswith("not valid JSON")
    assert out.fields["bytes"] == len(b"this is {not json")


async def test_body_none_keeps_digest_but_no_body(base_url: str) -> None:
    none = await fetch(f"{base_url}/json", body="none")
    text = await fetch(f"{base_url}/json", body="text")
    assert "body" not in none.fields
    assert none.fields["sha256"] == hashlib.sha256(text.fields["body"].encode()).hexdigest()
    assert none.fields["bytes"] == len(text.fields["body"])


# --- the request as sent -----------------------------------------------------------------------


async def test_echo_sees_method_headers_params_and_json_body(base_url: str) -> None:
    out = await fetch(
        f"{base_url}/echo?a=1",
        {"headers": {"X-Default": "cfg", "X-Both": "cfg"}},
        method="put",
        headers={"X-Job": "job", "X-Both": "job"},
        params={"q": "x y", "n": 3},
        json={"name": "a"},
        body="json",
    )
    echo = out.fields["body"]
    assert out.fields["method"] == "PUT"
    assert echo["method"] == "PUT"
    assert echo["params"] == {"a": ["1"], "q": ["x y"], "n": ["3"]}
    assert orjson.loads(echo["body"]) == {"name": "a"}
    assert echo["headers"]["content-type"] == "application/json"
    assert echo["headers"]["x-job"] == "job"
    assert echo["headers"]["x-default"] == "cfg"
    assert echo["headers"]["x-both"] == "job"  # the job's own header wins over the config's
    assert echo["headers"]["user-agent"].startswith("fetcher/")


async def test_data_is_sent_as_the_body(base_url: str) -> None:
    out = await fetch(f"{base_url}/echo", method="POST", data="raw text", body="json")
    assert out.fields["body"]["method"] == "POST"
    assert out.fields["body"]["body"] == "raw text"


async def test_no_cookies_carry_between_jobs(base_url: str) -> None:
    async with handler() as h:
        await h.attempt(http_job(f"{base_url}/ok"))
        assert len(h.session.cookie_jar) == 0


# --- statuses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "retry"),
    [
        *[(400, False), (403, False), (404, False), (410, False), (408, True), (425, True)],
        *[(429, True), (500, True), (502, True), (503, True), (504, True), (501, False)],
    ],
)
async def test_status_at_or_above_400_is_http_status(base_url: str, code: int, retry: bool) -> None:
    out = await fetch(f"{base_url}/status/{code}")
    assert error_type(out) == "http_status"
    assert out.retry is retry
    assert out.error is not None and out.error.message.startswith(f"HTTP {code}")
    # The result still carries the response.
    assert out.fields["status"] == code
    assert out.fields["headers"]["x-status"] == str(code)
    assert out.fields["bytes"] == len(f"status {code}\n")
    assert out.fields["sha256"] is not None


async def test_status_below_400_is_ok(base_url: str) -> None:
    out = await fetch(f"{base_url}/status/204")
    assert out.ok and out.fields["status"] == 204 and out.fields["bytes"] == 0


# --- redirects ---------------------------------------------------------------------------------


async def test_redirect_chain_is_followed_and_counted(base_url: str) -> None:
    out = await fetch(f"{base_url}/redirect/3", body="text")
    assert out.ok
    assert out.fields["redirects"] == 3
    assert out.fields["url"] == f"{base_url}/redirect/3"
    assert out.fields["final_url"] == f"{base_url}/redirect/0"
    assert out.fields["body"] == "end of the chain\n"


async def test_redirects_not_followed_when_the_job_says_so(base_url: str) -> None:
    out = await fetch(f"{base_url}/redirect/3", allow_redirects=False)
    assert out.ok
    assert out.fields["status"] == 302
    assert out.fields["redirects"] == 0
    assert out.fields["headers"]["location"] == "/redirect/2"


async def test_redirect_loop_is_too_many_redirects(base_url: str) -> None:
    out = await fetch(f"{base_url}/loop")
    assert error_type(out) == "too_many_redirects"
    assert out.retry is False
    assert_one_line(out)


async def test_redirect_loop_reports_the_redirects_followed(base_url: str) -> None:
    out = await fetch(f"{base_url}/loop", {"max_redirects": 4})
    assert error_type(out) == "too_many_redirects"
    assert out.fields["redirects"] == 4


@pytest.mark.parametrize(("limit", "chain", "ok"), [(2, 2, True), (2, 3, False), (0, 1, False)])
async def test_max_redirects_is_the_number_followed(
    base_url: str, limit: int, chain: int, ok: bool
) -> None:
    out = await fetch(f"{base_url}/redirect/{chain}", {"max_redirects": limit})
    if ok:
        assert out.ok and out.fields["redirects"] == chain
    else:
        assert error_type(out) == "too_many_redirects"


async def test_max_redirects_zero_still_returns_a_non_redirect(base_url: str) -> None:
    out = await fetch(f"{base_url}/redirect/0", {"max_redirects": 0})
    assert out.ok and out.fields["redirects"] == 0


async def test_redirect_to_file_scheme_is_refused(base_url: str) -> None:
    out = await fetch(f"{base_url}/to-file")
    assert error_type(out) == "too_many_redirects"
    assert out.retry is False
    assert "passwd" not in (out.error.message if out.error else "")


# --- deadlines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/hang", "/trickle?interval=0.05", "/trickle?interval=1"])
async def test_hang_and_trickle_end_as_timeout_at_the_deadline(base_url: str, path: str) -> None:
    t0 = time.monotonic()
    out = await fetch(f"{base_url}{path}", {"timeout": DEADLINE})
    elapsed = time.monotonic() - t0
    assert error_type(out) == "timeout"
    assert out.retry is True
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + 1.0
    assert out.fields["bytes"] is None and out.fields["sha256"] is None
    assert_one_line(out)


async def test_job_timeout_overrides_settings(base_url: str) -> None:
    t0 = time.monotonic()
    out = await fetch(f"{base_url}/hang", {"timeout": 30}, timeout=0.3)
    assert error_type(out) == "timeout"
    assert time.monotonic() - t0 < 2


async def test_deadline_excludes_the_wait_for_a_per_host_slot(base_url: str) -> None:
    # Three jobs, one slot to the host, each takes ~0.3 s at the server: the third waits ~0.6 s
    # for its slot. A deadline counted from the call (like aiohttp's `total`) would kill it.
    async with handler(timeout=0.5, per_host=1) as h:
        t0 = time.monotonic()
        outs = await asyncio.gather(
            *(h.attempt(http_job(f"{base_url}/slow?delay=0.3", id=str(i))) for i in range(3))
        )
        elapsed = time.monotonic() - t0
    assert [error_type(o) for o in outs] == [None, None, None]
    assert elapsed >= 0.85  # they really ran one at a time


async def test_per_host_slot_is_released_after_a_failure(base_url: str, closed_port: int) -> None:
    async with handler(timeout=0.3, per_host=1) as h:
        first = await h.attempt(http_job(f"{base_url}/hang"))
        second = await h.attempt(http_job(f"{base_url}/ok"))
    assert error_type(first) == "timeout"
    assert second.ok


# --- broken responses --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/drop", "/cl-lie"])
async def test_connection_closed_mid_body_is_protocol(base_url: str, path: str) -> None:
    out = await fetch(f"{base_url}{path}")
    assert error_type(out) == "protocol"
    assert out.retry is True
    assert out.fields["status"] == 200  # the headers had arrived
    assert out.fields["bytes"] is None
    assert_one_line(out)


async def test_too_many_response_headers_is_protocol(base_url: str) -> None:
    out = await fetch(f"{base_url}/many-headers?n=200")
    assert error_type(out) == "protocol"
    assert_one_line(out)
    fine = await fetch(f"{base_url}/many-headers?n=50")
    assert fine.ok


# --- size limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["size=5000000", "size=5000000&chunked=1"])
async def test_huge_body_is_too_large(base_url: str, query: str) -> None:
    t0 = time.monotonic()
    out = await fetch(f"{base_url}/huge?{query}", {"max_bytes": 100_000})
    assert error_type(out) == "too_large"
    assert out.retry is False
    assert out.fields["status"] == 200
    assert "100000" in (out.error.message if out.error else "")
    assert time.monotonic() - t0 < 2


async def test_body_of_exactly_max_bytes_is_kept(base_url: str) -> None:
    out = await fetch(f"{base_url}/huge?size=100000&chunked=1", {"max_bytes": 100_000})
    assert out.ok
    assert out.fields["bytes"] == 100_000
    assert out.fields["sha256"] == hashlib.sha256(b"z" * 100_000).hexdigest()


async def test_job_max_bytes_overrides_settings(base_url: str) -> None:
    out = await fetch(f"{base_url}/huge?size=5000", {"max_bytes": 1_000_000}, max_bytes=4999)
    assert error_type(out) == "too_large"


async def test_head_is_not_too_large_for_the_length_it_announces(base_url: str) -> None:
    out = await fetch(f"{base_url}/huge?size=5000000", {"max_bytes": 100_000}, method="HEAD")
    assert out.ok, out.error
    assert out.fields["headers"]["content-length"] == "5000000"
    assert out.fields["bytes"] == 0


async def test_gzip_bomb_is_too_large_after_decompression(base_url: str) -> None:
    max_bytes = 1_000_000
    out = await fetch(f"{base_url}/gzip-bomb", {"max_bytes": max_bytes})
    assert error_type(out) == "too_large"
    # The compressed body is far below the limit: only counting inflated bytes catches it.
    assert int(out.fields["headers"]["content-length"]) < max_bytes < BOMB_INFLATED


# --- network failures --------------------------------------------------------------------------


async def test_closed_port_is_connect_and_retryable(closed_port: int) -> None:
    out = await fetch(f"http://127.0.0.1:{closed_port}/x")
    assert error_type(out) == "connect"
    assert out.retry is True
    assert out.fields["status"] is None and out.fields["final_url"] is None
    assert_one_line(out)


async def test_unresolvable_name_is_dns_and_not_retried() -> None:
    out = await fetch("http://no-such-host.invalid/")
    assert error_type(out) == "dns"
    assert out.retry is False
    assert "no-such-host.invalid" in (out.error.message if out.error else "")
    assert_one_line(out)


# --- retries and Retry-After -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[("5", 5.0), (" 7 ", 7.0), ("0", 0.0), ("soon", None), ("", None), (None, None)],
        *[("-3", None), (formatdate(0, usegmt=True), 0.0)],
    ],
)
def test_retry_after_parsing(value: str | None, expected: float | None) -> None:
    assert retry_after_seconds(value) == expected


def test_retry_after_http_date_in_the_future() -> None:
    got = retry_after_seconds(formatdate(time.time() + 30, usegmt=True))
    assert got is not None and 28 <= got <= 30


async def test_429_retry_after_seconds_is_reported(base_url: str, key: str) -> None:
    out = await fetch(f"{base_url}/flaky/{key}/5?ra=2")
    assert error_type(out) == "http_status" and out.fields["status"] == 429
    assert out.retry is True
    assert out.retry_after == 2.0
    assert out.fields["headers"]["retry-after"] == "2"


async def test_429_retry_after_http_date_is_reported(base_url: str, key: str) -> None:
    out = await fetch(f"{base_url}/flaky/{key}/5?date=3")
    assert out.retry is True
    assert out.retry_after is not None and 1.5 <= out.retry_after <= 3.0


async def run_pool(
    job: Any,
    retries: int,
    *,
    policy: RetryPolicy | None = None,
    rand: Callable[[], float] = random.random,
    **settings: Any,
) -> tuple[dict[str, Any], list[float]]:
    """``job`` through a one-worker pool; its result and the waits between attempts (not slept:
    recorded). ``policy`` defaults to short backoffs with ``retries``."""
    results: list[dict[str, Any]] = []
    sleeps: list[float] = []

    async def no_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def one() -> Any:
        yield job

    async with handler(**settings) as h:
        pool = Pool(
            handlers={"http": h},
            emit=results.append,
            concurrency=1,
            policy=policy or RetryPolicy(retries=retries, backoff_base=0.01, retry_after_max=60),
            sleep=no_sleep,
            rand=rand,
        )
        await pool.run(one())
    assert len(results) == 1
    return results[0], sleeps


async def test_429_succeeds_on_the_nth_attempt_honouring_retry_after(
    server: ServerThread, key: str
) -> None:
    result, sleeps = await run_pool(http_job(f"{server.url}/flaky/{key}/3?ra=4"), retries=5)
    assert result["ok"] is True and result["status"] == 200
    assert result["attempts"] == 3
    assert sleeps == [4.0, 4.0]
    assert server.count(key) == 3


async def test_429_with_an_http_date_retry_after_twice_then_200(
    server: ServerThread, key: str
) -> None:
    # /flaky sends Retry-After as an IMF-fixdate (formatdate(usegmt=True), the form
    # email.utils.format_datetime(usegmt=True) gives) this many seconds ahead.
    job = http_job(f"{server.url}/flaky/{key}/3?date=1")
    # Backoff would wait 50 s (rand pinned to 1): any shorter wait came from the header.
    policy = RetryPolicy(retries=3, backoff_base=50, backoff_max=50, retry_after_max=60)
    result, sleeps = await run_pool(job, retries=3, policy=policy, rand=lambda: 1.0)
    assert result["ok"] is True and result["status"] == 200 and result["error"] is None
    assert result["attempts"] == 3
    assert len(sleeps) == 2 and all(0 <= s <= 1.0 for s in sleeps), sleeps
    assert server.count(key) == 3


async def test_retries_run_out_with_attempts_counted(server: ServerThread, key: str) -> None:
    result, sleeps = await run_pool(http_job(f"{server.url}/fail/{key}/503"), retries=2)
    assert result["ok"] is False
    assert result["attempts"] == 3
    assert result["error"]["type"] == "http_status"
    assert len(sleeps) == 2
    assert server.count(key) == 3


async def test_job_retries_field_overrides_the_run(server: ServerThread, key: str) -> None:
    result, _ = await run_pool(http_job(f"{server.url}/fail/{key}/500", retries=0), retries=5)
    assert result["attempts"] == 1
    assert server.count(key) == 1


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_unsafe_method_not_retried_after_reaching_the_server(
    server: ServerThread, key: str, method: str
) -> None:
    result, _ = await run_pool(http_job(f"{server.url}/fail/{key}/503", method=method), retries=3)
    assert result["attempts"] == 1
    assert server.count(key) == 1


async def test_unsafe_method_retried_when_the_job_allows_it(server: ServerThread, key: str) -> None:
    job = http_job(f"{server.url}/fail/{key}/503", method="POST", retry_unsafe=True)
    result, _ = await run_pool(job, retries=2)
    assert result["attempts"] == 3
    assert server.count(key) == 3


async def test_idempotent_put_is_retried(server: ServerThread, key: str) -> None:
    result, _ = await run_pool(http_job(f"{server.url}/fail/{key}/503", method="PUT"), retries=1)
    assert result["attempts"] == 2


async def test_post_timeout_is_not_retried(base_url: str) -> None:
    out = await fetch(f"{base_url}/hang", {"timeout": 0.3}, method="POST", data="x")
    assert error_type(out) == "timeout"
    assert out.retry is False


async def test_post_to_a_closed_port_is_retried(closed_port: int) -> None:
    # Nothing reached a server, so a retry cannot repeat the request's effect.
    out = await fetch(f"http://127.0.0.1:{closed_port}/", method="POST", data="x")
    assert error_type(out) == "connect"
    assert out.retry is True


# --- secrets -----------------------------------------------------------------------------------


async def test_password_in_url_is_masked(server: ServerThread) -> None:
    url = f"http://alice:s3cr3t-pw@127.0.0.1:{server.port}/echo"
    out = await fetch(url, body="json")
    assert out.ok
    assert out.fields["url"] == f"http://alice:***@127.0.0.1:{server.port}/echo"
    assert "s3cr3t-pw" not in out.fields["final_url"]
    assert out.fields["body"]["headers"]["authorization"].startswith("Basic ")
    out.fields.pop("body")
    assert b"s3cr3t-pw" not in orjson.dumps(out.fields)


async def test_password_masked_when_the_fetch_fails(closed_port: int) -> None:
    out = await fetch(f"http://bob:hunter2-pw@127.0.0.1:{closed_port}/")
    assert error_type(out) == "connect"
    assert out.fields["url"] == f"http://bob:***@127.0.0.1:{closed_port}/"
    assert b"hunter2-pw" not in orjson.dumps(out.fields)
    assert out.error is not None and "hunter2-pw" not in out.error.message


async def test_password_masked_in_final_url_after_redirects(server: ServerThread) -> None:
    out = await fetch(f"http://carol:pa55-pw@127.0.0.1:{server.port}/redirect/2")
    assert out.ok
    assert "pa55-pw" not in out.fields["url"] and "pa55-pw" not in out.fields["final_url"]


async def test_connect_error_message_is_the_system_wording(closed_port: int) -> None:
    settings = load_settings(overrides={"retries": 0})
    async with HttpHandler(settings) as handler:
        outcome = await handler.attempt(http_job(f"http://127.0.0.1:{closed_port}/"))
    assert outcome.error is not None
    assert outcome.error.message == f"cannot connect to 127.0.0.1:{closed_port}: Connection refused"
