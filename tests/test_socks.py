"""Jobs through a real SOCKS5 server (tests/peers/socks.py), from the config's ``proxy`` or a
job's own: plain http and https with a trustme certificate, names resolved here (socks5) or by
the proxy (socks5h), username/password from ``${ENV}`` and never shown, a failed handshake is
``proxy``, and the network policy judges the proxy's address."""

from __future__ import annotations

import base64
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from .peers.origin import Origin
from .peers.socks import Connect, Socks5Proxy
from .test_e2e import by_id, clean_env, fetcher, json_lines, write_jsonl

USER = "suser"
PASSWORD = "S0cks-Sekr1t-pw"
WRONG = "Wr0ng-S0cks-pw"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def http_origin() -> Iterator[Origin]:
    with Origin() as origin:
        yield origin


@pytest.fixture(scope="module")
def https_origin(ca: trustme.CA) -> Iterator[Origin]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    with Origin(ctx) as origin:
        yield origin


@pytest.fixture
def socks() -> Iterator[Socks5Proxy]:
    with Socks5Proxy() as proxy:
        yield proxy


@pytest.fixture
def socks_auth() -> Iterator[Socks5Proxy]:
    with Socks5Proxy(username=USER, password=PASSWORD) as proxy:
        yield proxy


def run(
    tmp_path: Path,
    jobs: list[dict[str, Any]],
    *,
    ca: trustme.CA,
    config: str = "",
    password: str = PASSWORD,
) -> tuple[dict[str, Any], bytes]:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "retries: 2\nbackoff_base: 0.01\nbackoff_max: 0.02\ntimeout: 5\n"
        f"tls:\n  ca_bundle: {ca_file}\n{config}"
    )
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    done = fetcher("-v", "run", path, "-c", cfg, env=clean_env(SOCKS_PW=password))
    assert done.returncode in (0, 1), done.stderr.decode()
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    return by_id(json_lines(done.stdout)), done.stdout + done.stderr


def test_config_proxy_carries_http_and_https(
    tmp_path: Path, socks: Socks5Proxy, http_origin: Origin, https_origin: Origin, ca: trustme.CA
) -> None:
    results, _ = run(
        tmp_path,
        [
            {"id": "http", "url": f"{http_origin.url}/ok", "body": "text"},
            {"id": "https", "url": f"{https_origin.url}/ok", "body": "text"},
        ],
        ca=ca,
        config=f"proxy: {socks.url()}\n",
    )
    for key in ("http", "https"):
        assert results[key]["ok"], results[key]
        assert results[key]["remote_addr"] == f"127.0.0.1:{socks.port}"  # the proxy's, as curl
    assert Connect(1, "127.0.0.1", http_origin.port) in socks.seen
    assert Connect(1, "127.0.0.1", https_origin.port) in socks.seen


@pytest.mark.parametrize(
    ("scheme", "asked"),
    [("socks5", Connect(1, "127.0.0.1", 0)), ("socks5h", Connect(3, "localhost", 0))],
)
def test_names_are_resolved_here_or_by_the_proxy(
    tmp_path: Path,
    socks: Socks5Proxy,
    https_origin: Origin,
    ca: trustme.CA,
    scheme: str,
    asked: Connect,
) -> None:
    url = f"https://localhost:{https_origin.port}/ok"
    results, _ = run(
        tmp_path, [{"id": "a", "url": url}], ca=ca, config=f"proxy: {socks.url(scheme)}\n"
    )
    assert results["a"]["ok"], results["a"]  # the certificate checked against the name
    assert socks.seen == [Connect(asked.atyp, asked.host, https_origin.port)]


def test_credentials_from_the_environment_and_never_shown(
    tmp_path: Path, socks_auth: Socks5Proxy, http_origin: Origin, ca: trustme.CA
) -> None:
    proxy = socks_auth.url("socks5", USER, "${SOCKS_PW}")
    results, output = run(
        tmp_path, [{"id": "a", "url": f"{http_origin.url}/ok"}], ca=ca, config=f"proxy: '{proxy}'\n"
    )
    assert results["a"]["ok"], results["a"]
    assert socks_auth.logins == [True]
    assert PASSWORD.encode() not in output


def test_wrong_credentials_are_a_proxy_error(
    tmp_path: Path, socks_auth: Socks5Proxy, http_origin: Origin, ca: trustme.CA
) -> None:
    proxy = socks_auth.url("socks5", USER, "${SOCKS_PW}")
    results, output = run(
        tmp_path,
        [{"id": "a", "url": f"{http_origin.url}/ok"}],
        ca=ca,
        config=f"proxy: '{proxy}'\n",
        password=WRONG,
    )
    r = results["a"]
    assert r["error"]["type"] == "proxy"
    assert f"SOCKS proxy 127.0.0.1:{socks_auth.port}" in r["error"]["message"]
    assert "authentication" in r["error"]["message"].lower()
    assert r["attempts"] == 1  # a failed login is not retried
    assert socks_auth.logins == [False]
    for secret in (WRONG, PASSWORD):
        assert secret.encode() not in output
        assert base64.b64encode(f"{USER}:{secret}".encode()) not in output


def test_a_proxy_without_credentials_given_is_refused_as_proxy(
    tmp_path: Path, socks_auth: Socks5Proxy, http_origin: Origin, ca: trustme.CA
) -> None:
    results, _ = run(
        tmp_path,
        [{"id": "a", "url": f"{http_origin.url}/ok"}],
        ca=ca,
        config=f"proxy: {socks_auth.url()}\n",
    )
    assert results["a"]["error"]["type"] == "proxy"


def test_a_job_proxy_overrides_the_config(
    tmp_path: Path, socks: Socks5Proxy, http_origin: Origin, ca: trustme.CA
) -> None:
    results, _ = run(
        tmp_path,
        [
            {"id": "via", "url": f"{http_origin.url}/ok", "proxy": socks.url("socks5h")},
            {"id": "direct", "url": f"{http_origin.url}/status/200"},
        ],
        ca=ca,
    )
    assert results["via"]["ok"] and results["direct"]["ok"]
    assert results["via"]["remote_addr"] == f"127.0.0.1:{socks.port}"
    assert results["direct"]["remote_addr"] == f"127.0.0.1:{http_origin.port}"
    assert socks.seen == [Connect(1, "127.0.0.1", http_origin.port)]


def test_an_origin_the_proxy_cannot_reach_is_proxy_and_retried(
    tmp_path: Path, socks: Socks5Proxy, ca: trustme.CA
) -> None:
    results, _ = run(
        tmp_path,
        [{"id": "a", "url": "http://127.0.0.1:1/"}],
        ca=ca,
        config=f"proxy: {socks.url()}\n",
    )
    r = results["a"]
    assert r["error"]["type"] == "proxy" and r["attempts"] == 3
    assert len(socks.seen) == 3


def test_an_unreachable_proxy_is_connect(
    tmp_path: Path, http_origin: Origin, ca: trustme.CA
) -> None:
    results, _ = run(
        tmp_path,
        [{"id": "a", "url": f"{http_origin.url}/ok"}],
        ca=ca,
        config="proxy: socks5://127.0.0.1:1\n",
    )
    assert results["a"]["error"]["type"] == "connect"
    assert "SOCKS proxy 127.0.0.1:1" in results["a"]["error"]["message"]


def test_the_network_policy_judges_the_proxy_address(
    tmp_path: Path, socks: Socks5Proxy, http_origin: Origin, ca: trustme.CA
) -> None:
    results, _ = run(
        tmp_path,
        [{"id": "a", "url": f"{http_origin.url}/ok", "proxy": socks.url("socks5h")}],
        ca=ca,
        config="network:\n  block_private: true\n",
    )
    assert results["a"]["error"]["type"] == "blocked"
    assert socks.seen == []  # never connected to


def test_a_bad_proxy_scheme_in_a_job_is_invalid_job(tmp_path: Path, ca: trustme.CA) -> None:
    results, output = run(
        tmp_path,
        [{"id": "a", "url": "http://127.0.0.1:1/", "proxy": "ftp://u:Sekr1t@127.0.0.1:21"}],
        ca=ca,
    )
    assert results["a"]["error"]["type"] == "invalid_job"
    assert b"Sekr1t" not in output


def test_a_run_without_socks_never_loads_the_socks_libraries(
    tmp_path: Path, http_origin: Origin
) -> None:
    # aiohttp-socks costs every run's start-up about 65M instructions and 0.5 MB: it is
    # imported with the first SOCKS proxy, and a run without one must not pay for it.
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "a", "url": f"{http_origin.url}/ok"}])
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['fetcher', 'run', sys.argv[1], '-o', sys.argv[2], '--no-progress']\n"
        "try:\n"
        "    runpy.run_module('fetcher', run_name='__main__')\n"
        "finally:\n"
        "    print(sorted(m for m in ('aiohttp_socks', 'python_socks') if m in sys.modules))\n"
    )
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", probe, str(jobs), str(out)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr
    assert by_id(json_lines(out.read_bytes()))["a"]["ok"] is True
