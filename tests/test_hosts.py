"""Many hosts: the bounded idle pool, the open-file limit, and runs over hundreds of host names."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from fetcher.config import Settings
from fetcher.connector import BoundedConnector
from fetcher.fdlimit import DEFAULT_MAX_IDLE, RESERVE, fit_open_files, idle_bounds
from fetcher.forecast import HostForecast, host_of
from fetcher.http import Resolver

from .helpers import FETCHER
from .test_e2e import clean_env, json_lines

HOSTS = [f"h{i}.hosts.test" for i in range(60)]


def connector(
    min_idle: int, max_idle: int, forecast: HostForecast | None = None
) -> BoundedConnector:
    return BoundedConnector(
        min_idle=min_idle,
        max_idle=max_idle,
        forecast=forecast,
        limit=10,
        resolver=Resolver(dict.fromkeys(HOSTS, "127.0.0.1")),
    )


def forecast_of(hosts: list[str], port: int, rounds: int) -> HostForecast:
    forecast = HostForecast()
    forecast.add(f"{host}:{port}".encode() for _ in range(rounds) for host in hosts)
    forecast.complete = True
    return forecast


async def peer_port(session: aiohttp.ClientSession, host: str, port: int) -> str:
    async with session.get(f"http://{host}:{port}/peer") as resp:
        return await resp.text()


async def test_the_least_recently_used_idle_connection_is_closed_first(
    server: object, base_url: str
) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    conn = connector(3, 3)
    async with aiohttp.ClientSession(connector=conn) as session:
        seen = {host: await peer_port(session, host, port) for host in HOSTS[:6]}
        assert conn.idle_count == 3
        # h3, h4, h5 were released last: still open; h0 was the first closed.
        assert await peer_port(session, HOSTS[5], port) == seen[HOSTS[5]]
        assert await peer_port(session, HOSTS[3], port) == seen[HOSTS[3]]
        assert await peer_port(session, HOSTS[0], port) != seen[HOSTS[0]]
        assert conn.idle_count == 3


async def test_the_idle_pool_grows_for_hosts_that_come_back(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    conn = connector(2, 50)
    hosts = HOSTS[:8]
    async with aiohttp.ClientSession(connector=conn) as session:
        rounds = []
        for _ in range(3):
            rounds.append([await peer_port(session, host, port) for host in hosts])
    assert len(set(rounds[1]) & set(rounds[0])) <= 2  # evicted at the limit of 2...
    assert conn.idle_limit >= len(hosts)  # ... but the evictions cost reuses: it grew
    assert rounds[2] == rounds[1]  # so the third round reuses every connection


async def test_the_idle_pool_stays_small_over_hosts_that_never_come_back(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    conn = connector(2, 50)
    async with aiohttp.ClientSession(connector=conn) as session:
        for host in HOSTS:
            await peer_port(session, host, port)
        assert conn.idle_limit == 2
        assert conn.idle_count == 2


async def job(conn: BoundedConnector, session: aiohttp.ClientSession, host: str, port: int) -> str:
    """One job to ``host``, told to the forecast as the HTTP handler tells it."""
    assert conn.forecast is not None
    conn.forecast.arrive(host)
    return await peer_port(session, host, port)


async def test_with_a_forecast_hosts_that_come_back_keep_their_connections(
    base_url: str,
) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    hosts = HOSTS[:12]
    conn = connector(2, 50, forecast_of(hosts, port, 3))
    async with aiohttp.ClientSession(connector=conn) as session:
        rounds = [[await job(conn, session, host, port) for host in hosts] for _ in range(3)]
    # Without the forecast the second round finds 2 of the 12 (test above); with it, all.
    assert rounds[1] == rounds[0]
    assert rounds[2] == rounds[0]
    assert conn.idle_limit >= len(hosts)


async def test_with_a_forecast_the_pool_stays_small_over_hosts_that_never_come_back(
    base_url: str,
) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    conn = connector(5, 50, forecast_of(HOSTS, port, 1))
    async with aiohttp.ClientSession(connector=conn) as session:
        for host in HOSTS:
            await job(conn, session, host, port)
        assert conn.idle_limit == 5
        assert conn.idle_count == 5


async def test_with_a_forecast_a_finished_host_is_first_to_go(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    again, once = HOSTS[1:4], HOSTS[0]
    forecast = forecast_of(again, port, 2)
    forecast.add([f"{once}:{port}".encode()])
    conn = connector(3, 3, forecast)
    async with aiohttp.ClientSession(connector=conn) as session:
        first = [await job(conn, session, host, port) for host in again]
        await job(conn, session, once, port)  # released last, but done: evicted, not h1
        second = [await job(conn, session, host, port) for host in again]
    assert second == first


async def test_hosts_a_forecast_does_not_know_are_pooled_as_without_one(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    forecast = forecast_of(HOSTS[:1], port, 1)
    forecast.complete = False  # counted so far: h0 only
    conn = connector(3, 3, forecast)
    async with aiohttp.ClientSession(connector=conn) as session:
        for host in HOSTS[:6]:
            await peer_port(session, host, port)
        assert conn.idle_count == 3  # unknown hosts, and h0 not known to be finished: kept


def test_two_hosts_in_one_slot_are_not_forecast() -> None:
    # Counted together, the first would look unfinished until the second is: both unknown.
    slots: dict[int, str] = {}
    i = 0
    forecast = HostForecast()
    while (hash(host := f"h{i}.slot.test") & forecast.mask) not in slots:
        slots[hash(host) & forecast.mask] = host
        i += 1
    first, second = slots[hash(host) & forecast.mask], host
    alone = "alone.slot.test"
    forecast.add([first.encode(), second.encode(), alone.encode()])
    forecast.complete = True
    assert forecast.ahead(first) is None
    assert forecast.ahead(second) is None
    assert forecast.ahead(alone) is True
    forecast.arrive(alone)
    assert forecast.ahead(alone) is False
    assert forecast.ahead("never.named.test") is None


def test_host_of_an_authority_is_the_connection_key_host() -> None:
    assert host_of(b"User:pw@H1.Example.TEST:8443") == "h1.example.test"
    assert host_of(b"[::1]:8080") == "::1"
    assert host_of(b"example.com") == "example.com"
    assert host_of("bücher.test".encode()) is None


def test_min_idle_connections_sets_where_the_pool_starts() -> None:
    assert idle_bounds(Settings(concurrency=10)) == (10, DEFAULT_MAX_IDLE)
    assert idle_bounds(Settings(concurrency=10, min_idle_connections=500)) == (
        500,
        DEFAULT_MAX_IDLE,
    )
    both = Settings(concurrency=10, min_idle_connections=500, max_idle_connections=100)
    assert idle_bounds(both) == (100, 100)


def test_a_large_min_idle_is_cut_to_the_room_left_never_lowering_the_concurrency(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(concurrency=100, min_idle_connections=5000)
    with caplog.at_level(logging.WARNING, logger="fetcher"):
        fitted = fit_open_files(settings, limit=1024)
    room = 1024 - RESERVE - settings.smtp["default"].pool_size
    assert fitted.concurrency == 100
    assert idle_bounds(fitted) == (room - 100, room - 100)
    assert not caplog.records


async def test_a_pool_started_large_reuses_from_the_first_round(base_url: str) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    conn = connector(len(HOSTS), len(HOSTS))
    async with aiohttp.ClientSession(connector=conn) as session:
        first = [await peer_port(session, host, port) for host in HOSTS]
        second = [await peer_port(session, host, port) for host in HOSTS]
    assert second == first


def test_a_limit_that_holds_the_run_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(concurrency=100)
    fitted = fit_open_files(settings, limit=100_000)
    assert fitted.concurrency == 100
    assert fitted.max_idle_connections is not None
    assert fitted.max_idle_connections >= 100
    assert not caplog.records


def test_a_small_limit_lowers_the_concurrency_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(concurrency=1000)
    with caplog.at_level(logging.WARNING, logger="fetcher"):
        fitted = fit_open_files(settings, limit=1024)
    room = 1024 - RESERVE - settings.smtp["default"].pool_size
    assert fitted.concurrency == room // 2
    assert fitted.max_idle_connections is not None
    assert fitted.concurrency + fitted.max_idle_connections <= room
    [record] = caplog.records
    assert "open-file limit 1024" in record.getMessage()
    assert f"concurrency lowered to {room // 2}" in record.getMessage()


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource; from fetcher.fdlimit import raise_soft_limit; "
        "print(raise_soft_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512)),
    )
    assert done.stdout.split() == ["512", "512", "512"]


def run_many_hosts(
    tmp_path: Path,
    base_url: str,
    limits: tuple[int, int] | None,
    hosts: int = 400,
    jobs: int = 1200,
    *,
    path: str = "/ok",
    concurrency: int = 100,
    body: str = "none",
) -> tuple[list[dict[str, object]], str, int]:
    """``jobs`` jobs over ``hosts`` pinned names, one pass after another, at the open-file
    ``limits`` (soft, hard) given."""
    port = int(base_url.rsplit(":", 1)[1])
    names = [f"h{i}.many.test" for i in range(hosts)]
    config = tmp_path / "pins.yaml"
    config.write_bytes(orjson.dumps({"resolve": dict.fromkeys(names, "127.0.0.1")}))
    job_file = tmp_path / "jobs.jsonl"
    job_file.write_bytes(
        b"".join(
            orjson.dumps(
                {"id": f"{i}", "url": f"http://{names[i % hosts]}:{port}{path}", "body": body}
            )
            + b"\n"
            for i in range(jobs)
        )
    )
    command = [*FETCHER, "run", str(job_file), "-c", str(config), "-n", str(concurrency)]
    done = subprocess.run(
        command,
        capture_output=True,
        env=clean_env(),
        timeout=120,
        check=False,
        preexec_fn=None
        if limits is None
        else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits),
    )
    return json_lines(done.stdout), done.stderr.decode(), done.returncode


def test_a_run_connects_once_to_each_host_that_comes_back(tmp_path: Path, base_url: str) -> None:
    # 150 hosts, each visited 3 times, one pass after another, at -n 5: an idle pool that only
    # learns from evictions would reconnect most hosts on the second pass; the job file says
    # they come back, so each host is connected once (give or take a host whose name shares
    # the forecast's slot with another's, or whose first jobs ran before the counting thread
    # had got to them on a loaded machine: both left to the pool alone).
    results, stderr, code = run_many_hosts(
        tmp_path, base_url, None, 150, 450, path="/peer", concurrency=5, body="text"
    )
    assert code == 0, stderr
    assert len(results) == 450
    assert all(r["ok"] for r in results)
    assert 150 <= len({r["body"] for r in results}) <= 170  # without the forecast: 291


def test_hundreds_of_hosts_at_a_low_limit_all_succeed(tmp_path: Path, base_url: str) -> None:
    # soft = hard = 256: nothing to raise to, and -n 100 with its idle connections does not fit.
    results, stderr, code = run_many_hosts(tmp_path, base_url, (256, 256))
    assert "Too many open files" not in stderr
    assert [r for r in results if not r["ok"]] == []
    assert len(results) == 1200
    assert code == 0
    warnings = [line for line in stderr.splitlines() if "concurrency lowered" in line]
    assert len(warnings) == 1, stderr
    assert "open-file limit 256" in warnings[0]


def test_a_low_soft_limit_is_raised_without_a_warning(tmp_path: Path, base_url: str) -> None:
    results, stderr, code = run_many_hosts(tmp_path, base_url, (256, 4096))
    assert [r for r in results if not r["ok"]] == []
    assert len(results) == 1200
    assert code == 0
    assert "concurrency lowered" not in stderr


async def test_pinned_names_match_in_any_case_and_with_a_trailing_dot() -> None:
    as_written = {"h1.pins.test": "127.0.0.1"}
    assert Resolver(as_written)._pinned is as_written  # already normal: no copy
    for pins in (as_written, {"H1.Pins.TEST.": "127.0.0.1"}):
        resolver = Resolver(pins)
        for name in ("h1.pins.test", "H1.PINS.test", "h1.pins.test."):
            assert [r["host"] for r in await resolver.resolve(name, 80)] == ["127.0.0.1"]
