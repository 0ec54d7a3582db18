"""Wire facts: ``remote_addr`` and ``http_version`` on every http result, and with --trace the
final hop's ``timings``, the ``redirect_chain`` and, over https, the ``tls`` session, compared
with the trustme certificate the server presents."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from .peers.origin import Origin
from .test_e2e import by_id, fetcher, json_lines, write_jsonl

PHASES = {"dns_ms", "connect_ms", "tls_ms", "ttfb_ms", "download_ms"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost", "wire.test")


@pytest.fixture(scope="module")
def https_origin(leaf: trustme.LeafCert) -> Iterator[Origin]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    with Origin(ctx) as origin:
        yield origin


@pytest.fixture(scope="module")
def http_origin() -> Iterator[Origin]:
    with Origin() as origin:
        yield origin


def run(tmp_path: Path, jobs: list[dict[str, Any]], *flags: str, config: str = "") -> Any:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("retries: 0\ntimeout: 5\n" + config)
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    done = fetcher("run", path, "-c", cfg, *flags)
    assert done.returncode in (0, 1), done.stderr.decode()
    return by_id(json_lines(done.stdout))


def test_every_result_says_whom_it_talked_to(tmp_path: Path, http_origin: Origin) -> None:
    results = run(
        tmp_path,
        [
            {"id": "ok", "url": f"{http_origin.url}/ok"},
            {"id": "name", "url": f"http://localhost:{http_origin.port}/status/404"},
            {"id": "none", "url": "http://127.0.0.1:1/"},
        ],
    )
    for key in ("ok", "name"):
        assert results[key]["remote_addr"] == f"127.0.0.1:{http_origin.port}"
        assert results[key]["http_version"] == "1.1"
        assert "timings" not in results[key] and "tls" not in results[key]
    assert results["none"]["error"]["type"] == "connect"
    assert results["none"]["remote_addr"] is None
    assert results["none"]["http_version"] is None


def test_trace_over_https_carries_the_certificate_presented(
    tmp_path: Path, https_origin: Origin, ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    results = run(
        tmp_path,
        [{"id": "tls", "url": f"{https_origin.url}/redirect/2"}],
        "--trace",
        config=f"tls:\n  ca_bundle: {ca_file}\n",
    )
    r = results["tls"]
    assert r["ok"] and r["remote_addr"] == f"127.0.0.1:{https_origin.port}"
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    tls = r["tls"]
    assert tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert tls["cipher"]
    assert tls["cert"]["subject"] == cert.subject.rfc4514_string()
    assert tls["cert"]["issuer"] == cert.issuer.rfc4514_string()
    not_after = cert.not_valid_after_utc.replace(microsecond=0)
    assert tls["cert"]["not_after"] == not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    expected = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    expected += san.get_values_for_type(x509.DNSName)
    assert sorted(tls["cert"]["san"]) == sorted(expected)
    # Two redirects, each on the connection the first hop opened: the final hop reused it.
    base = https_origin.url
    assert r["redirect_chain"] == [
        {"url": f"{base}/redirect/2", "status": 302},
        {"url": f"{base}/redirect/1", "status": 302},
    ]
    t = r["timings"]
    assert set(t) == PHASES
    assert t["dns_ms"] is None and t["connect_ms"] is None and t["tls_ms"] is None
    assert t["ttfb_ms"] >= 0 and t["download_ms"] >= 0


def test_trace_of_a_new_connection_has_every_phase(
    tmp_path: Path, https_origin: Origin, ca: trustme.CA
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    results = run(
        tmp_path,
        [{"id": "new", "url": f"https://wire.test:{https_origin.port}/ok"}],
        "--trace",
        config=f"tls:\n  ca_bundle: {ca_file}\nresolve:\n  wire.test: 127.0.0.1\n",
    )
    t = results["new"]["timings"]
    assert all(isinstance(t[name], float) and t[name] >= 0 for name in PHASES), t
    assert results["new"]["redirect_chain"] == []
    assert results["new"]["tls"]["cert"]["subject"]


def test_trace_over_plain_http_has_no_tls(tmp_path: Path, http_origin: Origin) -> None:
    results = run(tmp_path, [{"id": "plain", "url": f"{http_origin.url}/ok"}], "--trace")
    r = results["plain"]
    assert r["tls"] is None
    assert r["timings"]["tls_ms"] is None
    assert r["timings"]["connect_ms"] is not None  # a literal address: no lookup, a new socket
    assert r["timings"]["dns_ms"] is None


def test_trace_with_verification_off_has_a_session_but_no_decoded_certificate(
    tmp_path: Path, https_origin: Origin
) -> None:
    results = run(tmp_path, [{"id": "k", "url": f"{https_origin.url}/ok"}], "--trace", "--insecure")
    tls = results["k"]["tls"]
    assert tls["version"] and tls["cipher"] and tls["cert"] is None


def test_a_reused_connection_keeps_its_tls_session_and_has_no_connect_phases(
    tmp_path: Path, https_origin: Origin, ca: trustme.CA
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    url = f"https://wire.test:{https_origin.port}"
    # One at a time: the second job takes the connection the first one let go.
    results = run(
        tmp_path,
        [{"id": "first", "url": f"{url}/peer"}, {"id": "second", "url": f"{url}/peer"}],
        "--trace",
        "-n",
        "1",
        config=f"tls:\n  ca_bundle: {ca_file}\nresolve:\n  wire.test: 127.0.0.1\n",
    )
    first, second = results["first"], results["second"]
    first_t, second_t = first["timings"], second["timings"]
    assert all(isinstance(first_t[name], float) for name in PHASES), first_t
    assert second_t["dns_ms"] is None  # in the DNS cache
    assert second_t["connect_ms"] is None and second_t["tls_ms"] is None, second_t
    assert second_t["ttfb_ms"] >= 0 and second_t["download_ms"] >= 0
    assert second["tls"] == first["tls"] and second["tls"]["cert"]["subject"]


def test_results_of_one_connection_do_not_share_their_tls_facts(
    https_origin: Origin, ca: trustme.CA, tmp_path: Path
) -> None:
    from fetcher import Settings, run_sync
    from fetcher.config import TlsSettings

    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    settings = Settings(trace=True, concurrency=1, retries=0, tls=TlsSettings(ca_bundle=ca_file))
    jobs = [{"id": str(i), "url": f"{https_origin.url}/ok"} for i in range(2)]
    first, second = sorted(run_sync(jobs, settings), key=lambda r: r.id)
    assert first["timings"]["connect_ms"] is not None and second["timings"]["connect_ms"] is None
    san = list(second["tls"]["cert"]["san"])
    first["tls"]["cert"]["san"].append("changed.test")
    first["tls"]["cert"]["subject"] = "CN=changed"
    first["tls"]["version"] = "changed"
    assert second["tls"]["cert"]["san"] == san
    assert second["tls"]["cert"]["subject"] != "CN=changed"
    assert second["tls"]["version"] != "changed"


def test_trace_of_a_refused_connection_has_no_phase(tmp_path: Path) -> None:
    results = run(tmp_path, [{"id": "no", "url": "http://127.0.0.1:1/"}], "--trace")
    r = results["no"]
    assert r["error"]["type"] == "connect"
    assert r["timings"] == dict.fromkeys(PHASES)
    assert r["redirect_chain"] == [] and r["tls"] is None


def test_not_after_is_utc() -> None:
    from fetcher.wire import cert_facts

    facts = cert_facts({"notAfter": "Jun  1 12:00:00 2030 GMT", "subject": (), "issuer": ()})
    assert facts is not None
    expected = datetime.datetime(2030, 6, 1, 12, tzinfo=datetime.UTC)
    assert facts["not_after"] == expected.strftime("%Y-%m-%dT%H:%M:%SZ")
