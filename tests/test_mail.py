"""Mail jobs against a real aiosmtpd server (see smtp_peer.py), through the pool and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fetcher.config import Settings
from fetcher.jobs import InvalidJob, JobParser, MailJob
from fetcher.mail import MailHandler
from fetcher.message import build_message
from fetcher.pool import Pool, RetryPolicy

from . import smtp_peer as peers
from .helpers import assert_valid_results
from .smtp_peer import PASSWORD, USER, Peer

# The SMTP server fixtures live in smtp_peer.py; binding them here makes pytest find them.
smtp_peer = peers.smtp_peer
tls_certs = peers.tls_certs

ROOT = Path(__file__).resolve().parent.parent


def mail_job(id: str, **fields: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": id,
        "kind": "mail",
        "from": "Sender <noreply@example.com>",
        "to": [f"{id}@example.org"],
        "subject": f"Hello {id}",
        "text": f"Hi {id}!",
    }
    job.update(fields)
    return job


async def _items(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def run_jobs(
    profiles: dict[str, dict[str, Any]],
    jobs: list[dict[str, Any]],
    *,
    retries: int = 2,
    concurrency: int = 10,
    environ: dict[str, str] | None = None,
    handler_out: list[MailHandler] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run mail jobs through the real pool (retries without backoff); results by id."""
    settings = Settings(smtp=profiles, retries=retries)
    parser = JobParser(smtp_profiles=settings.smtp.keys())
    parsed = [parser.parse(j, i + 1) for i, j in enumerate(jobs)]
    results: list[dict[str, Any]] = []
    async with MailHandler(settings, environ=environ or {}) as handler:
        if handler_out is not None:
            handler_out.append(handler)
        pool = Pool(
            handlers={"mail": handler},
            emit=results.append,
            concurrency=concurrency,
            policy=RetryPolicy(retries=retries, backoff_base=0),
        )
        await pool.run(_items(parsed))
    assert len(results) == len(jobs)
    assert_valid_results(results)
    return {r["id"]: r for r in results}


# -- messages ------------------------------------------------------------------------------


async def test_delivery_headers_parts_and_envelope(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer()
    job = mail_job(
        "w1",
        **{
            "from": "Zoë Ünïcode <noreply@example.com>",
            "to": ["Ann <ann@example.org>", "bob@example.org"],
            "cc": "carol@example.org",
            "bcc": ["hidden@example.net"],
            "subject": "Grüße — ça va?",
            "text": "plain part ✓",
            "html": "<p>html part ✓</p>",
            "headers": {"X-Campaign": "spring", "Reply-To": "help@example.com"},
        },
    )
    results = await run_jobs({"default": peer.profile()}, [job])
    r = results["w1"]
    assert r["ok"] is True, r
    assert r["kind"] == "mail" and r["attempts"] == 1 and r["error"] is None
    assert r["status"] == 250
    assert r["recipients"] == [
        "ann@example.org",
        "bob@example.org",
        "carol@example.org",
        "hidden@example.net",
    ]
    assert r["refused"] == {}

    [d] = peer.recorder.deliveries
    assert d.mail_from == "noreply@example.com"
    assert d.rcpt_tos == r["recipients"]
    msg = d.message
    assert str(msg["From"]) == "Zoë Ünïcode <noreply@example.com>"
    assert str(msg["To"]) == "Ann <ann@example.org>, bob@example.org"
    assert str(msg["Cc"]) == "carol@example.org"
    assert "Bcc" not in msg and b"hidden@" not in d.raw
    assert str(msg["Subject"]) == "Grüße — ça va?"
    assert msg["Date"] is not None
    assert msg["X-Campaign"] == "spring" and msg["Reply-To"] == "help@example.com"
    assert msg["Message-ID"] == r["message_id"]
    assert r["message_id"].endswith("@example.com>")
    assert d.raw.isascii()  # non-ASCII is encoded, not sent as 8-bit
    assert msg.get_content_type() == "multipart/alternative"
    parts = {p.get_content_type(): p.get_content() for p in msg.iter_parts()}
    assert parts["text/plain"].strip() == "plain part ✓"
    assert parts["text/html"].strip() == "<p>html part ✓</p>"


@pytest.mark.parametrize(
    ("fields", "ctype"),
    [({"text": "only text"}, "text/plain"), ({"text": None, "html": "<b>x</b>"}, "text/html")],
)
def test_single_part_messages(fields: dict[str, Any], ctype: str) -> None:
    job = JobParser().parse(mail_job("s", **fields), 1)
    assert isinstance(job, MailJob)
    _, data, sender, rcpts = build_message(job)
    assert sender == "noreply@example.com" and rcpts == ["s@example.org"]
    assert f"Content-Type: {ctype}".encode() in data
    assert b"multipart" not in data


def test_own_message_id_is_kept() -> None:
    job = JobParser().parse(mail_job("m", headers={"Message-ID": "<order-42@shop.example>"}), 1)
    assert isinstance(job, MailJob)
    mid, data, _, _ = build_message(job)
    assert mid == "<order-42@shop.example>"
    assert data.count(b"Message-ID:") == 1


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"subject": "hi\r\nBcc: victim@example.net"}, "subject"),
        ({"to": ["a@example.org\nBcc: victim@example.net"]}, "to"),
        ({"from": "x@example.com\r\nX-Evil: 1"}, "from"),
        ({"cc": ["c@example.org\r"]}, "cc"),
        ({"bcc": ["b@example.org\x00"]}, "bcc"),
        ({"headers": {"X-A": "v\r\nBcc: victim@example.net"}}, "headers"),
        ({"headers": {"X-A\nB": "v"}}, "headers"),
        ({"headers": {"bcc": "victim@example.net"}}, "headers"),
        ({"to": ["a@example.org, b@example.org"]}, "to"),
        ({"to": ["not-an-address"]}, "to"),
        ({"from": "zoë@example.com"}, "from"),
        ({"to": [], "cc": [], "bcc": []}, "recipient"),
        ({"smtp": "nope"}, "smtp"),
    ],
)
def test_injection_and_bad_addresses_are_invalid_jobs(fields: dict[str, Any], where: str) -> None:
    out = JobParser().parse(mail_job("bad", **fields), 7)
    assert isinstance(out, InvalidJob)
    assert out.type == "invalid_job" and out.kind == "mail" and out.line == 7
    assert where in out.message


# -- the connection pool ---------------------------------------------------------------------


async def test_many_jobs_travel_over_few_connections(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer()
    jobs = [mail_job(f"j{i}") for i in range(60)]
    results = await run_jobs({"default": peer.profile(pool_size=3)}, jobs, concurrency=30)
    assert all(r["ok"] and r["attempts"] == 1 for r in results.values())
    rec = peer.recorder
    assert 1 <= rec.connections <= 3
    counts = rec.by_message_id()
    assert len(counts) == 60 and set(counts.values()) == {1}
    assert {r["message_id"] for r in results.values()} == set(counts)
    assert rec.quits == rec.connections  # every connection closed with QUIT at the end


async def test_connection_replaced_after_max_messages(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer()
    profile = peer.profile(pool_size=1, max_messages_per_connection=5)
    results = await run_jobs({"default": profile}, [mail_job(f"j{i}") for i in range(12)])
    assert all(r["ok"] for r in results.values())
    assert peer.recorder.connections == 3
    assert peer.recorder.quits == 3
    assert len(peer.recorder.deliveries) == 12


async def test_idle_connection_closed_with_quit(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer()
    settings = Settings(smtp={"default": peer.profile(idle_timeout=0.1)})
    parser = JobParser()
    async with MailHandler(settings) as handler:
        first = await handler.attempt(parser.parse(mail_job("a"), 1))  # type: ignore[arg-type]
        assert first.ok
        # The reaper QUITs the unused connection while the handler is still open.
        assert await asyncio.to_thread(peer.recorder.quit_event.wait, 5)
        assert peer.recorder.quits == 1
        second = await handler.attempt(parser.parse(mail_job("b"), 2))  # type: ignore[arg-type]
        assert second.ok
    assert peer.recorder.connections == 2
    assert peer.recorder.quits == 2


async def test_421_on_a_pooled_connection_is_replaced_within_the_attempt(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer()
    profile = peer.profile(pool_size=1)
    settings = Settings(smtp={"default": profile})
    parser = JobParser()
    async with MailHandler(settings) as handler:
        assert (await handler.attempt(parser.parse(mail_job("a"), 1))).ok  # type: ignore[arg-type]
        peer.recorder.close_at_mail_once = True  # the server shuts the warm connection down
        out = await handler.attempt(parser.parse(mail_job("b"), 2))  # type: ignore[arg-type]
    assert out.ok and out.fields["status"] == 250
    assert peer.recorder.connections == 2
    assert len(peer.recorder.deliveries) == 2


async def test_421_and_disconnect_is_retried(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(close_at_mail_once=True)
    results = await run_jobs({"default": peer.profile()}, [mail_job("a")])
    assert results["a"]["ok"] and results["a"]["attempts"] == 2
    assert len(peer.recorder.deliveries) == 1


async def test_421_without_retries_is_smtp_temporary(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(close_at_mail_once=True)
    results = await run_jobs({"default": peer.profile()}, [mail_job("a")], retries=0)
    r = results["a"]
    assert not r["ok"] and r["error"]["type"] == "smtp_temporary"
    assert r["status"] == 421 and r["recipients"] == []


async def test_421_to_data_replaces_the_connection(smtp_peer: Any) -> None:
    # aiosmtplib closes the connection itself after a 421 to an ordinary command, not after
    # one to DATA: the handler must not RSET and reuse a connection the server is closing.
    peer: Peer = smtp_peer(closing_at_data_once=True)
    jobs = [mail_job("a"), mail_job("b")]
    results = await run_jobs({"default": peer.profile(pool_size=1)}, jobs, concurrency=1)
    assert results["a"]["ok"] and results["a"]["attempts"] == 2, results["a"]
    assert results["b"]["ok"] and results["b"]["attempts"] == 1, results["b"]
    assert peer.recorder.connections == 2
    assert len(peer.recorder.deliveries) == 2


async def test_421_to_data_without_retries_is_smtp_temporary(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(closing_at_data_once=True)
    jobs = [mail_job("a"), mail_job("b")]
    results = await run_jobs({"default": peer.profile(pool_size=1)}, jobs, retries=0, concurrency=1)
    r = results["a"]
    assert r["error"]["type"] == "smtp_temporary" and r["attempts"] == 1, r
    assert r["status"] == 421 and r["recipients"] == []
    assert results["b"]["ok"]
    assert peer.recorder.connections == 2


# -- replies -------------------------------------------------------------------------------


async def test_some_recipients_refused(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(refuse={"bad@example.org": "550 5.1.1 No such user"})
    job = mail_job("p", to=["good@example.org", "bad@example.org"])
    r = (await run_jobs({"default": peer.profile()}, [job]))["p"]
    assert r["ok"] is True and r["status"] == 250
    assert r["recipients"] == ["good@example.org"]
    assert r["refused"] == {"bad@example.org": [550, "5.1.1 No such user"]}
    [d] = peer.recorder.deliveries
    assert d.rcpt_tos == ["good@example.org"]


async def test_all_recipients_refused_is_rejected_and_connection_kept(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(refuse={"bad@example.org": "550 5.1.1 No such user"})
    jobs = [mail_job("r", to="bad@example.org"), mail_job("ok")]
    results = await run_jobs({"default": peer.profile(pool_size=1)}, jobs, concurrency=1)
    r = results["r"]
    assert not r["ok"] and r["error"]["type"] == "smtp_rejected" and r["attempts"] == 1
    assert r["status"] == 550 and r["recipients"] == []
    assert r["refused"] == {"bad@example.org": [550, "5.1.1 No such user"]}
    assert results["ok"]["ok"]
    assert peer.recorder.connections == 1  # RSET kept the connection usable
    assert len(peer.recorder.deliveries) == 1


async def test_all_recipients_deferred_is_temporary(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(refuse={"grey@example.org": "450 4.2.0 Greylisted"})
    r = (
        await run_jobs(
            {"default": peer.profile()}, [mail_job("g", to="grey@example.org")], retries=1
        )
    )["g"]
    assert r["error"]["type"] == "smtp_temporary" and r["attempts"] == 2 and r["status"] == 450


async def test_451_then_250_is_retried_once(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(defer_data_once=True)
    r = (await run_jobs({"default": peer.profile()}, [mail_job("t")]))["t"]
    assert r["ok"] and r["attempts"] == 2 and r["status"] == 250
    assert list(peer.recorder.by_message_id().values()) == [1]


async def test_451_without_retries(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(defer_data_once=True)
    r = (await run_jobs({"default": peer.profile()}, [mail_job("t")], retries=0))["t"]
    assert r["error"]["type"] == "smtp_temporary" and r["status"] == 451
    assert "451" in r["error"]["message"] and r["recipients"] == []


@pytest.mark.parametrize(
    ("options", "status", "what"),
    [
        ({"mail_reply": "550 5.7.1 Sender not allowed"}, 550, "MAIL FROM"),
        ({"data_reply": "554 5.6.0 Message content rejected"}, 554, "message"),
    ],
)
async def test_5xx_to_mail_or_data_is_rejected_not_retried(
    smtp_peer: Any, options: dict[str, str], status: int, what: str
) -> None:
    peer: Peer = smtp_peer(**options)
    jobs = [mail_job("a"), mail_job("b")]
    results = await run_jobs({"default": peer.profile(pool_size=1)}, jobs, concurrency=1)
    for r in results.values():
        assert r["error"]["type"] == "smtp_rejected" and r["attempts"] == 1, r
        assert r["status"] == status and r["recipients"] == []
        assert what in r["error"]["message"] and str(status) in r["error"]["message"]
    assert peer.recorder.mail_commands == 2  # one per job: never retried
    assert peer.recorder.connections == 1  # a refusal, then RSET: the connection is kept
    assert peer.recorder.deliveries == []


async def test_disconnect_in_data_is_retried(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(drop_in_data_once=True)
    r = (await run_jobs({"default": peer.profile()}, [mail_job("d")]))["d"]
    assert r["ok"] and r["attempts"] == 2
    assert len(peer.recorder.deliveries) == 1
    assert peer.recorder.connections == 2


async def test_disconnect_in_data_without_retries(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(drop_in_data_once=True)
    r = (await run_jobs({"default": peer.profile()}, [mail_job("d")], retries=0))["d"]
    assert r["error"]["type"] == "connect" and "data" in r["error"]["message"]
    assert r["status"] is None and r["recipients"] == []


async def test_timeout_after_the_final_dot(smtp_peer: Any) -> None:
    peer: Peer = smtp_peer(data_delay=3)
    r = (await run_jobs({"default": peer.profile(timeout=0.3)}, [mail_job("s")], retries=0))["s"]
    assert r["error"]["type"] == "timeout"
    assert "may have accepted" in r["error"]["message"]
    assert r["attempts"] == 1 and r["recipients"] == []


async def test_connection_refused_is_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        profile = {"host": "127.0.0.1", "port": port, "security": "none", "timeout": 2}
        r = (await run_jobs({"default": profile}, [mail_job("c")], retries=1))["c"]
    assert r["error"]["type"] == "connect" and r["attempts"] == 2


# -- TLS and login ------------------------------------------------------------------------


async def test_starttls(smtp_peer: Any, tls_certs: Any) -> None:
    peer: Peer = smtp_peer("starttls")
    profile = peer.profile(security="starttls", ca_bundle=str(tls_certs.ca_path))
    r = await run_jobs({"default": profile}, [mail_job("a"), mail_job("b")])
    assert r["a"]["ok"] and r["b"]["ok"]
    assert all(d.tls for d in peer.recorder.deliveries)


async def test_starttls_not_offered_never_sends_in_clear(smtp_peer: Any, tls_certs: Any) -> None:
    peer: Peer = smtp_peer("plain")
    profile = peer.profile(security="starttls", ca_bundle=str(tls_certs.ca_path))
    r = (await run_jobs({"default": profile}, [mail_job("a")]))["a"]
    assert r["error"]["type"] == "tls" and "STARTTLS" in r["error"]["message"]
    assert r["attempts"] == 1
    assert peer.recorder.mail_commands == 0 and peer.recorder.deliveries == []


async def test_implicit_tls(smtp_peer: Any, tls_certs: Any) -> None:
    peer: Peer = smtp_peer("tls")
    profile = peer.profile(security="tls", ca_bundle=str(tls_certs.ca_path))
    r = (await run_jobs({"default": profile}, [mail_job("a")]))["a"]
    assert r["ok"], r


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_untrusted_certificate(smtp_peer: Any, tls_certs: Any, security: str) -> None:
    peer: Peer = smtp_peer(security)
    profile = peer.profile(security=security, ca_bundle=str(tls_certs.other_ca_path))
    r = (await run_jobs({"default": profile}, [mail_job("a")]))["a"]
    assert r["error"]["type"] == "tls" and r["attempts"] == 1
    assert peer.recorder.deliveries == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_login(smtp_peer: Any, tls_certs: Any, mechanism: str) -> None:
    other = {"PLAIN": "LOGIN", "LOGIN": "PLAIN"}[mechanism]
    peer: Peer = smtp_peer("starttls", auth=True, exclude=(other,))
    profile = peer.profile(
        security="starttls",
        ca_bundle=str(tls_certs.ca_path),
        username=USER,
        password_env="TEST_SMTP_PASSWORD",
    )
    jobs = [mail_job(f"j{i}") for i in range(5)]
    results = await run_jobs({"default": profile}, jobs, environ={"TEST_SMTP_PASSWORD": PASSWORD})
    assert all(r["ok"] for r in results.values())
    assert peer.recorder.mechanisms == [mechanism] * peer.recorder.connections


async def test_wrong_password(smtp_peer: Any, tls_certs: Any) -> None:
    peer: Peer = smtp_peer("starttls", auth=True)
    profile = peer.profile(
        security="starttls",
        ca_bundle=str(tls_certs.ca_path),
        username=USER,
        password_env="TEST_SMTP_PASSWORD",
        pool_size=1,
    )
    wrong = "wrong-Pa55word"
    handlers: list[MailHandler] = []
    results = await run_jobs(
        {"default": profile},
        [mail_job("a"), mail_job("b")],
        environ={"TEST_SMTP_PASSWORD": wrong},
        concurrency=1,
        handler_out=handlers,
    )
    for r in results.values():
        assert r["error"]["type"] == "smtp_auth" and r["attempts"] == 1
        assert wrong not in json.dumps(r) and PASSWORD not in json.dumps(r)
    # The second job did not try the refused password again.
    assert peer.recorder.connections == 1
    assert wrong not in repr(handlers[0])
    assert peer.recorder.deliveries == []


async def test_missing_password_variable(smtp_peer: Any, tls_certs: Any) -> None:
    peer: Peer = smtp_peer("starttls", auth=True)
    profile = peer.profile(
        security="starttls",
        ca_bundle=str(tls_certs.ca_path),
        username=USER,
        password_env="TEST_SMTP_PASSWORD_UNSET",
    )
    r = (await run_jobs({"default": profile}, [mail_job("a")]))["a"]
    assert r["error"]["type"] == "smtp_auth" and "TEST_SMTP_PASSWORD_UNSET" in r["error"]["message"]
    assert r["attempts"] == 1


# -- the command, end to end -------------------------------------------------------------------


async def _start_http() -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def _fetcher(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fetcher",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def test_mixed_http_and_mail_through_the_command(
    smtp_peer: Any, tls_certs: Any, tmp_path: Path
) -> None:
    peer: Peer = smtp_peer("starttls", auth=True)
    runner, http_port = await _start_http()
    try:
        config = tmp_path / "config.yaml"
        config.write_text(
            "retries: 1\n"
            "backoff_base: 0\n"
            "smtp:\n"
            "  default:\n"
            "    host: 127.0.0.1\n"
            f"    port: {peer.port}\n"
            "    security: starttls\n"
            f"    username: {USER}\n"
            "    password_env: TEST_SMTP_PASSWORD\n"
            f"    ca_bundle: {tls_certs.ca_path}\n"
            "    timeout: 5\n"
        )
        jobs = [
            {"id": "h1", "url": f"http://127.0.0.1:{http_port}/hello", "body": "json"},
            mail_job("m1", html="<p>hi</p>"),
            mail_job("m2", bcc="audit@example.net"),
            {"id": "h2", "url": f"http://127.0.0.1:{http_port}/hello"},
            mail_job("m3"),
        ]
        jobs_file = tmp_path / "jobs.jsonl"
        jobs_file.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        out = tmp_path / "out.jsonl"
        code, output = await _fetcher(
            "run",
            str(jobs_file),
            "-c",
            str(config),
            "-o",
            str(out),
            "--no-progress",
            env={"TEST_SMTP_PASSWORD": PASSWORD},
        )
    finally:
        await runner.cleanup()
    assert code == 0, output
    assert PASSWORD not in output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in lines}
    assert len(lines) == 5 and set(by_id) == {"h1", "h2", "m1", "m2", "m3"}
    assert by_id["h1"]["kind"] == "http" and by_id["h1"]["body"] == {"hello": "world"}
    for mid in ("m1", "m2", "m3"):
        r = by_id[mid]
        assert r["kind"] == "mail" and r["ok"] and r["status"] == 250
    assert by_id["m2"]["recipients"] == ["m2@example.org", "audit@example.net"]
    delivered = peer.recorder.by_message_id()
    assert set(delivered) == {by_id[m]["message_id"] for m in ("m1", "m2", "m3")}
    assert set(delivered.values()) == {1}
    assert peer.recorder.quits == peer.recorder.connections


async def test_validate_catches_header_injection(tmp_path: Path) -> None:
    jobs_file = tmp_path / "jobs.jsonl"
    jobs = [mail_job("good"), mail_job("evil", subject="hi\r\nBcc: victim@example.net")]
    jobs_file.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    code, output = await _fetcher("validate", str(jobs_file))
    assert code == 2
    assert "subject" in output and "2" in output


async def test_validate_catches_unicode_line_breaks_with_their_lines(tmp_path: Path) -> None:
    jobs_file = tmp_path / "jobs.jsonl"
    jobs = [
        mail_job("good"),
        mail_job("sep", subject="hi\u2028Bcc: victim@example.net"),
        mail_job("good2"),
        mail_job("vt", headers={"X-A": "v\x0bBcc: victim@example.net"}),
        mail_job("nel", to=["a@example.org\x85"]),
    ]
    jobs_file.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    code, output = await _fetcher("validate", str(jobs_file))
    assert code == 2, output
    reports = [ln for ln in output.splitlines() if "invalid_job" in ln]
    assert len(reports) == 3, output
    for line, field in ((2, "subject"), (4, "headers"), (5, "to")):
        assert any(f"jobs.jsonl:{line}: invalid_job: {field}" in r for r in reports), output
    assert "3 invalid" in output


def test_shared_header_objects_never_mix_messages() -> None:
    """Parsed headers are kept and reused across messages: each message still gets its own."""
    import email
    import email.policy

    from fetcher.message import POLICY

    parser = JobParser()

    def mail(i: int, subject: str) -> Any:
        job = parser.parse(
            {
                "id": str(i),
                "kind": "mail",
                "from": "Jörg Ü <joerg@example.com>",
                "to": [f"u{i}@example.org"],
                "subject": subject,
                "text": f"body {i}",
                "headers": {"X-Batch": "nightly", "X-Topic": subject},
            },
            i,
        )
        assert isinstance(job, MailJob)
        return job

    built = [build_message(mail(i, f"Grüße {i % 2}")) for i in range(4)]
    for i, (message_id, data, sender, rcpts) in enumerate(built):
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert msg["From"] == "Jörg Ü <joerg@example.com>"
        assert msg["To"] == f"u{i}@example.org"
        assert msg["Subject"] == f"Grüße {i % 2}"
        assert msg["X-Batch"] == "nightly"
        assert msg["X-Topic"] == msg["Subject"]  # same value, its own header
        assert msg["Message-ID"] == message_id
        assert msg.get_content().rstrip() == f"body {i}"
        assert (sender, rcpts) == ("joerg@example.com", [f"u{i}@example.org"])
    assert len({message_id for message_id, *_ in built}) == 4
    # Unique values (a Message-ID, a Subject) do not make the kept headers grow without end.
    registry: Any = POLICY.header_factory
    for i in range(registry.MAX_KEPT):
        build_message(mail(i, f"subject {i}"))
    assert len(registry._made) <= registry.MAX_KEPT
