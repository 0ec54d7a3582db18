"""URLs and headers, credentials, TLS, secrets in output, and proxies."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import threading
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from fetcher.tls import ssl_context

from . import smtp_peer as smtp_peers
from .redis_peer import redis_peer
from .security_peers import (
    blocking_tls_server,
    forward_proxy,
    raw_server,
    recording_server,
    run_cli,
    run_one,
    settings,
    write_config,
    write_jobs,
)

# The SMTP server fixtures live in smtp_peer.py; binding them here makes pytest find them.
smtp_peer = smtp_peers.smtp_peer
tls_certs = smtp_peers.tls_certs

# --- TLS material ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client = ca.issue_cert("client.fetcher.test")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    return {"ca": d / "ca.pem", "cert": d / "client.pem", "key": d / "client.key"}


def server_ctx(
    ca: trustme.CA, *, require_client: bool = False, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    if require_client:
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
        # Under TLS 1.3 the client finishes its handshake before the server checks the client
        # certificate, and a refusal reaches it as a plain reset (`connect`); under TLS 1.2 it
        # is a handshake failure the client can name.
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = max_version
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


# --- URLs and headers --------------------------------------------------------------------------

BAD_JOBS: list[tuple[dict[str, Any], str]] = [
    ({"url": "http://HOST/a\r\nX-Injected: 1"}, "invalid_url"),
    ({"url": "http://HOST/a\x00b"}, "invalid_url"),
    ({"url": "http://HOST/a\tb"}, "invalid_url"),
    ({"url": "http://HOST/a b"}, "invalid_url"),
    ({"url": "http://HOST/\x7f"}, "invalid_url"),
    ({"url": "http://HOST/${CRLF}"}, "invalid_url"),
    ({"url": "ftp://HOST/"}, "invalid_url"),
    ({"url": "file:///etc/passwd"}, "invalid_url"),
    ({"url": "/relative/path"}, "invalid_url"),
    ({"url": "http://HOST/", "method": "GET\n"}, "invalid_job"),
    ({"url": "http://HOST/", "method": "GET\r\nX: y"}, "invalid_job"),
    ({"url": "http://HOST/", "method": "GE T"}, "invalid_job"),
    ({"url": "http://HOST/", "method": "GET\x00"}, "invalid_job"),
    ({"url": "http://HOST/", "headers": {"X-A\n": "v"}}, "invalid_job"),
    ({"url": "http://HOST/", "headers": {"X-A\r\nX-B": "v"}}, "invalid_job"),
    ({"url": "http://HOST/", "headers": {"X A": "v"}}, "invalid_job"),
    ({"url": "http://HOST/", "headers": {"X-A": "v\r\nX-Injected: 1"}}, "invalid_job"),
    ({"url": "http://HOST/", "headers": {"X-A": "v\n"}}, "invalid_job"),
    ({"url": "http://HOST/", "headers": {"X-A": "v\x00"}}, "invalid_job"),
    ({"url": "http://HOST/", "headers": {"X-A": "v\x01"}}, "invalid_job"),
    ({"url": "http://HOST/", "headers": {"X-A": "${CRLF}"}}, "invalid_job"),
]


async def test_control_characters_are_refused_before_sending(tmp_path: Path) -> None:
    async with recording_server() as peer:
        host = peer.url.split("//", 1)[1]
        jobs = []
        for i, (spec, _) in enumerate(BAD_JOBS):
            spec = {**spec, "id": f"bad{i}", "url": spec["url"].replace("HOST", host)}
            if "headers" in spec or "method" in spec:
                spec["url"] = peer.url + "/echo"
            jobs.append(spec)
        path = write_jobs(tmp_path / "jobs.jsonl", jobs)
        run = await run_cli("run", str(path), env={"CRLF": "x\r\nX-Injected: 1"})
        assert len(peer.seen) == 0, peer.seen.requests
    assert run.code == 1, run
    got = {r["id"]: r for r in run.results}
    for i, (_, expected) in enumerate(BAD_JOBS):
        r = got[f"bad{i}"]
        assert r["error"]["type"] == expected, (BAD_JOBS[i], r)
        assert r["attempts"] == 0


async def test_tab_in_header_value_is_allowed() -> None:
    async with recording_server() as peer:
        r = await run_one(
            settings(), {"id": "t", "url": peer.url + "/echo", "headers": {"X-A": "a\tb"}}
        )
    assert r["ok"], r


async def test_url_credentials_work_and_are_masked(tmp_path: Path) -> None:
    async with recording_server() as peer:
        url = peer.url.replace("http://", "http://alice:s3cr3t-pw@") + "/echo"
        r = await run_one(settings(), {"id": "c", "url": url})
        assert r["ok"], r
        expected = "Basic " + base64.b64encode(b"alice:s3cr3t-pw").decode()
        assert peer.seen.requests[0]["headers"]["Authorization"] == expected
    assert "s3cr3t-pw" not in repr(r)
    assert r["url"].startswith("http://alice:***@")
    assert "s3cr3t" not in (r["final_url"] or "")


async def test_an_authorization_header_wins_over_url_credentials() -> None:
    """As in curl: aiohttp refuses the two together, so the URL's credentials are dropped."""
    async with recording_server() as peer:
        url = peer.url.replace("http://", "http://alice:s3cr3t-pw@") + "/echo"
        job = {"id": "a", "url": url, "headers": {"Authorization": "Bearer t0k"}}
        first = await run_one(settings(), job)
        assert first["ok"], first
        assert peer.seen.requests[0]["headers"]["Authorization"] == "Bearer t0k"
        # Without credentials in the URL the header goes as it is too.
        r = await run_one(settings(), {**job, "id": "b", "url": peer.url + "/echo"})
        assert r["ok"], r
        assert peer.seen.requests[1]["headers"]["Authorization"] == "Bearer t0k"
    assert "s3cr3t-pw" not in repr(first)


# --- TLS ---------------------------------------------------------------------------------------


async def test_tls_self_signed_is_refused_then_accepted_with_ca_bundle(
    ca: trustme.CA, tls_files: dict[str, Path]
) -> None:
    async with recording_server(ssl_context=server_ctx(ca)) as peer:
        r = await run_one(settings(retries=2), {"id": "t", "url": peer.url + "/echo"})
        assert r["error"]["type"] == "tls", r
        assert r["attempts"] == 1
        assert len(peer.seen) == 0
        s = settings(tls={"ca_bundle": str(tls_files["ca"])})
        r = await run_one(s, {"id": "t2", "url": peer.url + "/echo"})
        assert r["ok"], r
        # Host name checking stays on: the certificate names 127.0.0.1, not 127.0.0.2.
        other = peer.url.replace("127.0.0.1", "127.0.0.2")
        r = await run_one(s, {"id": "t3", "url": other + "/echo"})
        assert r["error"] is not None and r["error"]["type"] in ("tls", "connect"), r


def _tls_1_1_server(ca: trustme.CA) -> ssl.SSLContext:
    """A server context that offers TLS 1.1 at most; skips when this OpenSSL cannot do 1.1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is, rightly
        ctx = server_ctx(ca, max_version=ssl.TLSVersion.TLSv1_1)
        client = ssl.create_default_context()
        ca.configure_trust(client)
        client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        client.maximum_version = ssl.TLSVersion.TLSv1_1
        client.set_ciphers("ALL:@SECLEVEL=0")
    # Both ends willing: a handshake here shows the library can speak TLS 1.1 at all.
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    with a, b:
        server = threading.Thread(target=_accept_once, args=(ctx, a), daemon=True)
        server.start()
        try:
            with client.wrap_socket(b, server_hostname="127.0.0.1") as tls:
                version = tls.version()
        except (ssl.SSLError, OSError) as exc:
            pytest.skip(f"the local OpenSSL cannot offer TLS 1.1 ({exc}); nothing to refuse")
        finally:
            server.join(5)
    assert version == "TLSv1.1"
    return ctx


def _accept_once(ctx: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        with ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=True):
            pass
    except (ssl.SSLError, OSError):
        pass


async def test_default_run_refuses_a_tls_1_1_server(ca: trustme.CA, tmp_path: Path) -> None:
    """With no tls settings the run hands aiohttp ``ssl=True`` (its own default context): that
    path must refuse a server stuck at TLS 1.1 as ``tls`` too, not only our own context."""
    old_ctx = _tls_1_1_server(ca)
    # The CA is trusted the way a system CA is (SSL_CERT_FILE), so no tls key is set and the
    # only thing wrong with the server is its TLS version.
    env = {"SSL_CERT_FILE": str(tmp_path / "ca.pem")}
    ca.cert_pem.write_to_path(env["SSL_CERT_FILE"])
    with blocking_tls_server(server_ctx(ca)) as good, blocking_tls_server(old_ctx) as old:
        jobs = [{"id": "good", "url": good.url + "/"}, {"id": "old", "url": old.url + "/"}]
        path = write_jobs(tmp_path / "jobs.jsonl", jobs)
        run = await run_cli("run", str(path), env=env)
        assert len(old.seen) == 0
    results = {r["id"]: r for r in run.results}
    assert results["good"]["ok"], results["good"]  # the trust works: the version is the fault
    r = results["old"]
    assert r["error"]["type"] == "tls" and r["attempts"] == 1, r
    assert run.code == 1, run


def test_tls_minimum_version_is_1_2(tls_files: dict[str, Path]) -> None:
    assert ssl_context(settings()).minimum_version >= ssl.TLSVersion.TLSv1_2
    insecure = ssl_context(settings(tls={"verify": False}))
    assert insecure.minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_client_certificate(ca: trustme.CA, tls_files: dict[str, Path]) -> None:
    with blocking_tls_server(server_ctx(ca, require_client=True)) as peer:
        s = settings(tls={"ca_bundle": str(tls_files["ca"])}, retries=0)
        r = await run_one(s, {"id": "nocert", "url": peer.url + "/echo"})
        assert r["error"] is not None and r["error"]["type"] == "tls", r
        assert len(peer.seen) == 0
        with_cert = settings(
            tls={
                "ca_bundle": str(tls_files["ca"]),
                "client_cert": str(tls_files["cert"]),
                "client_key": str(tls_files["key"]),
            }
        )
        r = await run_one(with_cert, {"id": "cert", "url": peer.url + "/echo"})
        assert r["ok"], r


def warning_lines(stderr: bytes) -> list[bytes]:
    return [ln for ln in stderr.splitlines() if b"verif" in ln.lower() or b"insecure" in ln.lower()]


async def test_insecure_accepts_and_warns_once(ca: trustme.CA, tmp_path: Path) -> None:
    async with recording_server(ssl_context=server_ctx(ca)) as peer:
        jobs = [{"id": str(i), "url": f"{peer.url}/echo"} for i in range(5)]
        path = write_jobs(tmp_path / "jobs.jsonl", jobs)
        run = await run_cli("run", str(path), "--insecure")
        assert run.code == 0, run
        assert all(r["ok"] for r in run.results)
        assert len(warning_lines(run.stderr)) == 1, run.stderr
        # From the config file too.
        cfg = write_config(tmp_path / "c.yaml", "tls:\n  verify: false\n")
        run = await run_cli("run", str(path), "-c", str(cfg), "-o", str(tmp_path / "o.jsonl"))
        assert run.code == 0, run
        assert len(warning_lines(run.stderr)) == 1, run.stderr
        # And never silently: without it the same run fails as tls, with no such warning.
        run = await run_cli("run", str(path), "-o", str(tmp_path / "o2.jsonl"))
        assert run.code == 1
        assert warning_lines(run.stderr) == []


async def test_worker_insecure_accepts_and_warns_once(ca: trustme.CA, tmp_path: Path) -> None:
    """``fetcher worker`` warns the way ``fetcher run`` does: one line per run, never silent."""
    with redis_peer(tmp_path) as rds:
        async with recording_server(ssl_context=server_ctx(ca)) as peer:
            jobs = [{"id": str(i), "url": f"{peer.url}/echo"} for i in range(3)]
            path = write_jobs(tmp_path / "jobs.jsonl", jobs)
            enq = await run_cli("enqueue", str(path), "--redis", rds.url)
            assert enq.code == 0, enq
            out = tmp_path / "out.jsonl"
            worker = ("worker", "--redis", rds.url, "--drain", "--retries", "0")
            run = await run_cli(*worker, "--insecure", "-o", str(out))
            assert run.code == 0, run
            results = [orjson.loads(line) for line in out.read_bytes().splitlines()]
            assert len(results) == 3 and all(r["ok"] for r in results), results
            assert len(warning_lines(run.stderr)) == 1, run.stderr
            # From the config file too.
            cfg = write_config(tmp_path / "c.yaml", "tls:\n  verify: false\n")
            run = await run_cli(*worker, "-c", str(cfg))
            assert run.code == 0, run
            assert len(warning_lines(run.stderr)) == 1, run.stderr
            # Without either, no such line; and the same job now fails as tls.
            enq = await run_cli("enqueue", str(path), "--redis", rds.url)
            assert enq.code == 0, enq
            out2 = tmp_path / "out2.jsonl"
            run = await run_cli(*worker, "-o", str(out2))
            assert run.code == 0, run
            assert warning_lines(run.stderr) == []
            results = [orjson.loads(line) for line in out2.read_bytes().splitlines()]
            assert [r["error"]["type"] for r in results] == ["tls"] * 3, results


async def test_insecure_keeps_client_certificate_from_config(
    ca: trustme.CA, tls_files: dict[str, Path], tmp_path: Path
) -> None:
    """--insecure turns verification off; it must not drop the rest of the config's tls keys."""
    async with recording_server(ssl_context=server_ctx(ca, require_client=True)) as peer:
        path = write_jobs(tmp_path / "jobs.jsonl", [{"id": "1", "url": f"{peer.url}/echo"}])
        cfg = write_config(
            tmp_path / "c.yaml",
            f"tls:\n  client_cert: {tls_files['cert']}\n  client_key: {tls_files['key']}\n",
        )
        run = await run_cli("run", str(path), "-c", str(cfg), "--insecure", "--retries", "0")
    assert run.code == 0, run


# --- secrets never leave -----------------------------------------------------------------------

SECRETS = {
    "AUTH": "Sekr1tAuthValue",
    "COOKIE": "Sekr1tCookieValue",
    "PROXYAUTH": "Sekr1tProxyAuthValue",
    "URLPW": "Sekr1tUrlPassword",
    "ENVPW": "Sekr1tEnvPassword",
    "ENVHDR": "Sekr1tEnvHeader",
    "CFGAUTH": "Sekr1tConfigAuth",
    "PROXYPW": "Sekr1tProxyPassword",
}


def secret_forms(value: str, user: str = "u") -> Iterator[bytes]:
    yield value.encode()
    yield urllib.parse.quote(value).encode()
    yield value[3:-3].encode()  # a cut-down copy still gives it away
    yield base64.b64encode(f"{user}:{value}".encode())
    yield base64.b64encode(value.encode())


def assert_no_secret(blob: bytes) -> None:
    for name, value in SECRETS.items():
        for form in secret_forms(value):
            assert form not in blob, (name, form, blob[max(0, blob.find(form) - 200) :][:400])


async def test_secrets_never_reach_stdout_or_stderr(ca: trustme.CA, tmp_path: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Bad: " + b"z" * 9000 + b"\r\n\r\n")
        await writer.drain()

    async with (
        recording_server() as a,
        recording_server(host="127.0.0.2") as b,
        recording_server(host="127.0.0.3") as denied,
        recording_server(ssl_context=server_ctx(ca)) as tls_peer,
        raw_server(garbage) as bad,
    ):
        closed = f"http://127.0.0.1:{_free_port()}"
        secret_headers = {
            "Authorization": "Bearer ${AUTH}",
            "Cookie": "sid=${COOKIE}",
            "Proxy-Authorization": "Basic ${PROXYAUTH}",
            "X-Api-Key": "${ENVHDR}",
        }
        targets = {
            "ok": a.url + "/echo",
            "blocked": denied.url + "/echo",
            "dns": "http://nowhere.invalid/",
            "connect": closed + "/",
            "tls": tls_peer.url + "/echo",
            "timeout": a.url + "/slow",
            "protocol": bad.url + "/",
            "too_large": a.url + "/echo",
            "too_many_redirects": a.url + "/loop/0",
            "http_status": a.url + "/status/503",
            "cross_origin": f"{a.url}/redirect?to={b.url}/echo",
            "scheme": f"{a.url}/redirect?to=ftp://127.0.0.1/x",
        }
        jobs: list[dict[str, Any]] = []
        for kind, url in targets.items():
            for how in ("literal", "env"):
                pw = SECRETS["URLPW"] if how == "literal" else "${ENVPW}"
                jobs.append(
                    {
                        "id": f"{kind}-{how}",
                        "url": url.replace("://", f"://u:{pw}@", 1),
                        "headers": secret_headers,
                        "timeout": 0.5 if kind == "timeout" else 5,
                        "max_bytes": 10 if kind == "too_large" else None,
                        "retries": 1,
                    }
                )
        # Refused jobs carry the URL (masked) in their result lines too.
        jobs += [
            {"id": "bad-url", "url": f"ftp://u:{SECRETS['URLPW']}@127.0.0.1/"},
            {"id": "bad-url-ctl", "url": f"http://u:{SECRETS['URLPW']}@127.0.0.1/\r\n"},
            {"id": "bad-url-env", "url": "http://u:${ENVPW}@127.0.0.1/${CRLF}"},
            {"id": "bad-method", "url": f"http://u:{SECRETS['URLPW']}@h.test/", "method": "A B"},
            {"id": "bad-hdr", "url": a.url + "/echo", "headers": {"Authorization": "${CRLFAUTH}"}},
            {"id": "bad-hdr2", "url": a.url, "headers": {"X": "Bearer " + SECRETS["AUTH"] + "\n"}},
            {"id": "bad-field", "url": a.url, "nope": SECRETS["AUTH"]},
            {"id": "bad-type", "url": a.url, "headers": {"Authorization": 5}, "x": SECRETS["AUTH"]},
        ]
        path = write_jobs(
            tmp_path / "jobs.jsonl", [{k: v for k, v in j.items() if v is not None} for j in jobs]
        )
        cfg = write_config(
            tmp_path / "config.yaml",
            "network:\n  deny_networks: ['127.0.0.3/32']\n"
            "headers:\n  X-Config-Auth: '${CFGAUTH}'\n",
        )
        env = {
            "AUTH": SECRETS["AUTH"],
            "COOKIE": SECRETS["COOKIE"],
            "PROXYAUTH": SECRETS["PROXYAUTH"],
            "ENVPW": SECRETS["ENVPW"],
            "ENVHDR": SECRETS["ENVHDR"],
            "CFGAUTH": SECRETS["CFGAUTH"],
            "CRLF": "x\r\ny",
            "CRLFAUTH": f"Bearer {SECRETS['AUTH']}\r\nX: y",
        }
        run = await run_cli("-v", "run", str(path), "-c", str(cfg), "--progress", env=env)
        assert run.code == 1, run
        validate = await run_cli("-v", "validate", str(path), "-c", str(cfg), env=env)

        # The jobs did use the secrets: the first server saw them.
        assert a.seen.requests, (run.stderr, [(r["id"], r["error"]) for r in run.results][:14])
        first = a.seen.requests[0]["headers"]
        assert first["Authorization"] == f"Bearer {SECRETS['AUTH']}"
        assert first["Cookie"] == f"sid={SECRETS['COOKIE']}"
        # Across origins the credentials were dropped: the second server got none of them.
        assert len(b.seen) == 2
        for req in b.seen.requests:
            for name in ("Authorization", "Cookie", "Proxy-Authorization"):
                assert name not in req["headers"], req
        assert len(denied.seen) == 0

    results = {r["id"]: r for r in run.results}
    assert len(results) == len(jobs), run
    for kind in targets:
        for how in ("literal", "env"):
            r = results[f"{kind}-{how}"]
            expected = {"ok": None, "cross_origin": None, "scheme": "too_many_redirects"}.get(
                kind, kind
            )
            got = None if r["error"] is None else r["error"]["type"]
            assert got == expected, r
            assert r["url"].startswith("http://u:***@") or r["url"].startswith("https://u:***@")
    assert results["http_status-literal"]["attempts"] == 2  # retried, and still nothing leaked
    for blob in (run.stdout, run.stderr, validate.stdout, validate.stderr):
        assert_no_secret(blob)


async def test_smtp_passwords_never_reach_stdout_or_stderr(
    smtp_peer: Any, tls_certs: Any, tmp_path: Path
) -> None:
    """Right and wrong SMTP passwords, over PLAIN and LOGIN, from a server that quotes a refused
    password back in its reply: none of them shows in the results, logs or progress."""
    wrong = "Sekr1tWrongSmtpPw"
    user, right = smtp_peers.USER, smtp_peers.PASSWORD
    servers = {
        mech: smtp_peer("starttls", auth=True, exclude=(other,), echo_credentials=True)
        for mech, other in (("plain", "LOGIN"), ("login", "PLAIN"))
    }
    profiles = ""
    jobs: list[dict[str, Any]] = []
    for mech, peer in servers.items():
        for which in ("right", "wrong"):
            name = f"{mech}-{which}"
            profiles += (
                f"  {name}:\n    host: 127.0.0.1\n    port: {peer.port}\n"
                f"    security: starttls\n    username: {user}\n"
                f"    password_env: SMTP_{which.upper()}\n"
                f"    ca_bundle: {tls_certs.ca_path}\n    timeout: 5\n"
            )
            for i in range(2):
                jobs.append(
                    {
                        "id": f"{name}-{i}",
                        "kind": "mail",
                        "smtp": name,
                        "from": "noreply@example.com",
                        "to": ["a@example.org"],
                        "subject": "hi",
                        "text": "hi",
                    }
                )
    cfg = write_config(tmp_path / "c.yaml", f"retries: 1\nbackoff_base: 0\nsmtp:\n{profiles}")
    path = write_jobs(tmp_path / "jobs.jsonl", jobs)
    env = {"SMTP_RIGHT": right, "SMTP_WRONG": wrong}
    run = await run_cli("-v", "run", str(path), "-c", str(cfg), "--progress", env=env)
    assert run.code == 1, run

    results = {r["id"]: r for r in run.results}
    assert len(results) == len(jobs), run
    for job_id, r in results.items():
        if "-right-" in job_id:
            assert r["ok"], r
        else:
            assert r["error"]["type"] == "smtp_auth" and r["attempts"] == 1, r
            assert "***" in r["error"]["message"], r  # the server did quote it: scrubbed
    for mech, peer in servers.items():
        assert set(peer.recorder.mechanisms) == {mech.upper()}
        assert len(peer.recorder.deliveries) == 2
    blob = run.stdout + run.stderr
    for password in (right, wrong):
        forms = [
            *secret_forms(password, user),
            base64.b64encode(f"\0{user}\0{password}".encode()),
        ]
        for form in forms:
            assert form not in blob, (password, form, blob[max(0, blob.find(form) - 200) :][:400])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- proxies -----------------------------------------------------------------------------------


async def test_config_proxy_with_credentials(tmp_path: Path) -> None:
    async with (
        forward_proxy("puser", SECRETS["PROXYPW"]) as proxy,
        recording_server(host="127.0.0.2") as peer,
    ):
        path = write_jobs(tmp_path / "jobs.jsonl", [{"id": "p", "url": peer.url + "/echo"}])
        cfg = write_config(
            tmp_path / "c.yaml",
            f"proxy: 'http://puser:${{PROXY_PW}}@127.0.0.1:{proxy.port}'\n",
        )
        run = await run_cli(
            "-v", "run", str(path), "-c", str(cfg), env={"PROXY_PW": SECRETS["PROXYPW"]}
        )
        assert run.code == 0, run
        assert len(proxy.seen) == 1
        assert proxy.seen.requests[0]["target"].startswith(peer.url)
        assert run.results[0]["headers"].get("x-via-test-proxy") == "1"
        assert "Proxy-Authorization" not in peer.seen.requests[0]["headers"]
        # Wrong credentials: a 407, and the password still shows nowhere.
        run = await run_cli(
            "-v", "run", str(path), "-c", str(cfg), env={"PROXY_PW": "wrong-Sekr1t"}
        )
        assert run.results[0]["status"] == 407
        assert b"wrong-Sekr1t" not in run.stdout + run.stderr
        assert_no_secret(run.stdout + run.stderr)
        # Without the config the job goes direct.
        before = len(proxy.seen)
        run = await run_cli("run", str(path), env={"HTTP_PROXY": proxy.url})
        assert run.code == 0, run
        assert len(proxy.seen) == before


async def test_trust_env_is_opt_in(tmp_path: Path) -> None:
    async with forward_proxy() as proxy, recording_server(host="127.0.0.2") as peer:
        path = write_jobs(tmp_path / "jobs.jsonl", [{"id": "p", "url": peer.url + "/echo"}])
        env = {"HTTP_PROXY": proxy.url}
        run = await run_cli("run", str(path), env=env)
        assert run.code == 0 and len(proxy.seen) == 0, run
        cfg = write_config(tmp_path / "c.yaml", "trust_env: true\n")
        run = await run_cli("run", str(path), "-c", str(cfg), env=env)
        assert run.code == 0, run
        assert len(proxy.seen) == 1
        run = await run_cli("run", str(path), env={**env, "FETCHER_TRUST_ENV": "true"})
        assert len(proxy.seen) == 2, run
        run = await run_cli(
            "run", str(path), env={**env, "FETCHER_TRUST_ENV": "true", "NO_PROXY": "127.0.0.2"}
        )
        assert run.code == 0 and len(proxy.seen) == 2, run


async def test_policy_applies_to_the_proxy_address() -> None:
    """With a proxy, the connect goes to the proxy: that is the address the policy checks."""
    async with forward_proxy() as proxy, recording_server(host="127.0.0.2") as peer:
        # The proxy is on loopback: block_private refuses every job through it.
        s = settings(proxy=proxy.url, network={"block_private": True})
        r = await run_one(s, {"id": "p", "url": peer.url + "/echo"})
        assert r["error"]["type"] == "blocked", r
        assert len(proxy.seen) == 0
        # Allow the proxy, and destinations that are IP literals are still checked here.
        s = settings(
            proxy=proxy.url, network={"block_private": True, "allow_networks": ["127.0.0.1/32"]}
        )
        r = await run_one(s, {"id": "p2", "url": peer.url + "/echo"})
        assert r["error"] is not None and r["error"]["type"] == "blocked", r
        assert len(proxy.seen) == 0 and len(peer.seen) == 0


async def test_proxied_redirect_hop_to_denied_literal_is_blocked() -> None:
    async with (
        forward_proxy() as proxy,
        recording_server() as allowed,
        recording_server(host="127.0.0.2") as denied,
    ):
        s = settings(
            proxy=proxy.url, network={"block_private": True, "allow_networks": ["127.0.0.1/32"]}
        )
        url = f"{allowed.url}/redirect?to={denied.url}/echo"
        r = await run_one(s, {"id": "hop", "url": url})
        assert r["error"] is not None and r["error"]["type"] == "blocked", r
        assert r["attempts"] == 1
        assert len(proxy.seen) == 1 and len(denied.seen) == 0
        # A pinned name is judged by its pinned address too.
        pinned = settings(
            proxy=proxy.url,
            resolve={"inside.test": "127.0.0.2"},
            network={"block_private": True, "allow_networks": ["127.0.0.1/32"]},
        )
        r = await run_one(pinned, {"id": "pin", "url": f"http://inside.test:{denied.port}/"})
        assert r["error"]["type"] == "blocked", r
        assert len(proxy.seen) == 1


async def test_config_credentials_are_dropped_across_origins() -> None:
    async with recording_server() as a, recording_server(host="127.0.0.2") as b:
        s = settings(
            headers={"Authorization": "Bearer cfg", "Cookie": "c=1", "Proxy-Authorization": "p"}
        )
        r = await run_one(s, {"id": "x", "url": f"{a.url}/redirect?to={b.url}/echo"})
        assert r["ok"], r
        assert a.seen.requests[0]["headers"]["Authorization"] == "Bearer cfg"
        for name in ("Authorization", "Cookie", "Proxy-Authorization"):
            assert name not in b.seen.requests[0]["headers"]
        # Same origin keeps them.
        r = await run_one(s, {"id": "y", "url": f"{a.url}/redirect?to={a.url}/echo"})
        assert a.seen.requests[-1]["headers"]["Authorization"] == "Bearer cfg"
