"""Jobs through a real forward proxy (tests/peers/proxy.py): what the proxy refuses is `proxy`.

An https job's CONNECT answered with a non-2xx status, and a plain-http request the proxy
refuses with its own marked answer (407, or squid's X-Squid-Error), are error `proxy` with the
proxy's status line, retried only for 502/503/504. A proxy that cannot be reached is `connect`.
The proxy's credentials show nowhere, also with -v. Origins are the fault server of
tests/app.py, over http and over https with a trustme certificate.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from fetcher.config import Settings

from .peers.origin import Origin
from .peers.proxy import ForwardProxy
from .security_peers import run_one
from .test_e2e import by_id, clean_env, fetcher, json_lines, write_jsonl

USER = "puser"
PASSWORD = "Pr0xy-Sekr1t-pw"
WRONG = "Wr0ng-Sekr1t-pw"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("proxy-tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def http_origin() -> Iterator[Origin]:
    with Origin() as origin:
        yield origin


@pytest.fixture(scope="module")
def https_origin(ca: trustme.CA) -> Iterator[Origin]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    with Origin(ctx) as origin:
        yield origin


def run_through(
    tmp_path: Path, proxy_url: str, ca_file: Path, jobs: list[dict[str, Any]], password: str
) -> tuple[dict[str, dict[str, Any]], bytes]:
    """`fetcher -v run` of ``jobs`` through ``proxy_url`` (``${PROXY_PW}`` as its password);
    the results by id, and everything the run printed."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"proxy: '{proxy_url}'\n"
        "retries: 2\nbackoff_base: 0.01\nbackoff_max: 0.02\ntimeout: 10\n"
        f"tls:\n  ca_bundle: {ca_file}\n"
    )
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    run = fetcher("-v", "run", path, "-c", config, env=clean_env(PROXY_PW=password))
    assert run.returncode in (0, 1), run.stderr.decode()
    assert b"Traceback" not in run.stderr, run.stderr.decode()
    return by_id(json_lines(run.stdout)), run.stdout + run.stderr


def assert_no_credentials(output: bytes, *passwords: str) -> None:
    for password in passwords:
        assert password.encode() not in output
        assert base64.b64encode(f"{USER}:{password}".encode()) not in output


def proxy_url(proxy: ForwardProxy) -> str:
    return f"http://{USER}:${{PROXY_PW}}@127.0.0.1:{proxy.port}"


def test_through_the_proxy_the_origin_answers(
    tmp_path: Path, ca_file: Path, http_origin: Origin, https_origin: Origin
) -> None:
    with ForwardProxy(username=USER, password=PASSWORD) as proxy:
        jobs = [
            {"id": "tls", "url": f"{https_origin.url}/ok"},
            {"id": "plain", "url": f"{http_origin.url}/ok"},
            # The origin's own 503, relayed unmarked: the origin's status, as without a proxy.
            {"id": "plain-503", "url": f"{http_origin.url}/status/503"},
            {"id": "tls-407", "url": f"{https_origin.url}/status/407"},
        ]
        results, output = run_through(tmp_path, proxy_url(proxy), ca_file, jobs, PASSWORD)
        assert proxy.count("CONNECT") >= 1 and proxy.count("GET") >= 2
    assert results["tls"]["ok"] and results["plain"]["ok"], results
    assert results["plain-503"]["error"]["type"] == "http_status"
    assert results["plain-503"]["attempts"] == 3
    # Inside a tunnel every answer is the origin's, a 407 too.
    assert results["tls-407"]["error"]["type"] == "http_status"
    assert results["tls-407"]["status"] == 407
    assert_no_credentials(output, PASSWORD)


def test_wrong_credentials_are_a_proxy_error_tried_once(
    tmp_path: Path, ca_file: Path, http_origin: Origin, https_origin: Origin
) -> None:
    with ForwardProxy(username=USER, password=PASSWORD) as proxy:
        jobs = [
            {"id": "tls", "url": f"{https_origin.url}/ok"},
            {"id": "plain", "url": f"{http_origin.url}/ok"},
        ]
        results, output = run_through(tmp_path, proxy_url(proxy), ca_file, jobs, WRONG)
        assert proxy.count("CONNECT") == 1 and proxy.count("GET") == 1, proxy.seen
    tls, plain = results["tls"], results["plain"]
    assert tls["error"]["type"] == "proxy" and tls["attempts"] == 1, tls
    assert tls["error"]["message"] == (
        f"proxy 127.0.0.1:{proxy.port} refused the tunnel: 407 Proxy Authentication Required"
    )
    assert tls["status"] is None  # no answer from the origin
    assert plain["error"]["type"] == "proxy" and plain["attempts"] == 1, plain
    assert "407 Proxy Authentication Required" in plain["error"]["message"]
    assert plain["status"] == 407  # the proxy's answer, kept as the response it is
    assert_no_credentials(output, PASSWORD, WRONG)


def test_connect_503_is_a_proxy_error_retried(
    tmp_path: Path, ca_file: Path, http_origin: Origin, https_origin: Origin
) -> None:
    with ForwardProxy("connect_503", username=USER, password=PASSWORD) as proxy:
        jobs = [
            {"id": "tls", "url": f"{https_origin.url}/ok"},
            {"id": "plain", "url": f"{http_origin.url}/ok"},  # no tunnel: goes through
            # Refused before anything reached the origin: a POST is retried too.
            {"id": "post", "url": f"{https_origin.url}/echo", "method": "POST", "data": "x"},
        ]
        results, output = run_through(tmp_path, proxy_url(proxy), ca_file, jobs, PASSWORD)
        assert proxy.count("CONNECT") == 6, proxy.seen
    for job_id in ("tls", "post"):
        r = results[job_id]
        assert r["error"]["type"] == "proxy" and r["attempts"] == 3, r
        assert r["error"]["message"].endswith("refused the tunnel: 503 Service Unavailable")
    assert results["plain"]["ok"], results["plain"]
    assert_no_credentials(output, PASSWORD)


def test_squid_marked_503_on_plain_http_is_a_proxy_error_retried(
    tmp_path: Path, ca_file: Path, http_origin: Origin
) -> None:
    with ForwardProxy("plain_503", username=USER, password=PASSWORD) as proxy:
        jobs = [{"id": "plain", "url": f"{http_origin.url}/ok"}]
        results, output = run_through(tmp_path, proxy_url(proxy), ca_file, jobs, PASSWORD)
        assert proxy.count("GET") == 3
    r = results["plain"]
    assert r["error"]["type"] == "proxy" and r["attempts"] == 3, r
    assert r["error"]["message"] == (
        f"proxy 127.0.0.1:{proxy.port} answered 503 Service Unavailable "
        "(X-Squid-Error: ERR_CONNECT_FAIL 111)"
    )
    assert_no_credentials(output, PASSWORD)


def test_proxy_down_is_connect(
    tmp_path: Path, ca_file: Path, closed_port: int, http_origin: Origin, https_origin: Origin
) -> None:
    jobs = [
        {"id": "tls", "url": f"{https_origin.url}/ok"},
        {"id": "plain", "url": f"{http_origin.url}/ok"},
    ]
    url = f"http://{USER}:${{PROXY_PW}}@127.0.0.1:{closed_port}"
    results, output = run_through(tmp_path, url, ca_file, jobs, PASSWORD)
    for r in results.values():
        assert r["error"]["type"] == "connect" and r["attempts"] == 3, r
        assert r["error"]["message"].startswith(f"cannot connect to proxy 127.0.0.1:{closed_port}")
    assert_no_credentials(output, PASSWORD)


# -- each refusal mode, in process ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "scheme", "attempts", "message"),
    [
        ("connect_407", "https", 1, "refused the tunnel: 407 Proxy Authentication Required"),
        ("connect_503", "https", 3, "refused the tunnel: 503 Service Unavailable"),
        ("plain_407", "http", 1, "answered 407 Proxy Authentication Required"),
    ],
)
async def test_refusal_modes(
    mode: str,
    scheme: str,
    attempts: int,
    message: str,
    ca_file: Path,
    http_origin: Origin,
    https_origin: Origin,
) -> None:
    origin = https_origin if scheme == "https" else http_origin
    with ForwardProxy(mode) as proxy:
        s = Settings(
            proxy=proxy.url(), retries=2, backoff_base=0, timeout=5, tls={"ca_bundle": ca_file}
        )
        r = await run_one(s, {"id": mode, "url": f"{origin.url}/ok"})
        assert len(proxy.seen) == attempts, proxy.seen
    assert r["error"]["type"] == "proxy" and r["attempts"] == attempts, r
    assert r["error"]["message"] == f"proxy 127.0.0.1:{proxy.port} {message}"


async def test_trust_env_proxy_is_named_in_the_message(
    monkeypatch: pytest.MonkeyPatch, ca_file: Path, https_origin: Origin
) -> None:
    with ForwardProxy("connect_407") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url(USER, PASSWORD))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        s = Settings(trust_env=True, retries=0, timeout=5, tls={"ca_bundle": ca_file})
        r = await run_one(s, {"id": "env", "url": f"{https_origin.url}/ok"})
    assert r["error"] == {
        "type": "proxy",
        "message": f"proxy 127.0.0.1:{proxy.port} refused the tunnel: "
        "407 Proxy Authentication Required",
    }
