"""--robots against real origins serving robots.txt variants (200 with rules, 404, 500,
Crawl-delay, unreachable), each counting its requests: one robots.txt fetch per origin, even
when many jobs to a new origin start together; a disallowed URL is never sent."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from .peers.base import LoopThread
from .test_e2e import by_id, fetcher, json_lines, write_jsonl

RULES = """\
User-agent: otherbot
Disallow: /

User-agent: fetcher
Disallow: /private
Allow: /private/open
"""


class RobotsOrigin(LoopThread):
    """Answers /robots.txt with ``status`` and ``body`` (after ``delay`` seconds, so jobs that
    start together all find the fetch under way), /go/{path} with a redirect to /{path}, and
    everything else with 200; every request path is recorded with its time."""

    def __init__(self, status: int = 200, body: str = RULES, delay: float = 0.0) -> None:
        super().__init__("robots-origin")
        self.status, self.body, self.delay = status, body, delay
        self.seen: list[tuple[str, float]] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.seen if p == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, time.monotonic()))
        if request.path == "/robots.txt":
            await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text=self.body)
        if request.path.startswith("/go/"):
            raise web.HTTPFound("/" + request.path[len("/go/") :])
        return web.Response(text="page\n")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
def origin(request: pytest.FixtureRequest) -> Iterator[RobotsOrigin]:
    with RobotsOrigin(**getattr(request, "param", {})) as peer:
        yield peer


def run(tmp_path: Path, jobs: list[dict[str, Any]], *flags: str) -> dict[str, Any]:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("retries: 0\ntimeout: 5\n")
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    done = fetcher("run", path, "-c", cfg, "-n", "20", *flags)
    assert done.returncode in (0, 1), done.stderr.decode()
    assert b"Traceback" not in done.stderr
    return by_id(json_lines(done.stdout))


@pytest.mark.parametrize("origin", [{"delay": 0.3}], indirect=True)
def test_disallowed_urls_are_never_sent_and_robots_txt_is_fetched_once(
    tmp_path: Path, origin: RobotsOrigin
) -> None:
    jobs = [{"id": f"p{i}", "url": f"{origin.url}/private/{i}"} for i in range(10)]
    jobs += [{"id": f"ok{i}", "url": f"{origin.url}/public/{i}"} for i in range(10)]
    jobs.append({"id": "open", "url": f"{origin.url}/private/open"})
    results = run(tmp_path, jobs, "--robots")
    assert origin.hits("/robots.txt") == 1
    for i in range(10):
        refused = results[f"p{i}"]
        assert refused["error"]["type"] == "robots"
        assert refused["attempts"] == 0 and refused["status"] is None
        assert "robots.txt" in refused["error"]["message"]
        assert origin.hits(f"/private/{i}") == 0
        assert results[f"ok{i}"]["ok"] and results[f"ok{i}"]["attempts"] == 1
    assert results["open"]["ok"]  # Allow: within a Disallow


def test_without_the_flag_robots_txt_is_not_asked_for(tmp_path: Path, origin: RobotsOrigin) -> None:
    results = run(tmp_path, [{"id": "p", "url": f"{origin.url}/private/x"}])
    assert results["p"]["ok"]
    assert origin.hits("/robots.txt") == 0


@pytest.mark.parametrize("origin", [{"status": 404, "body": "no such file"}], indirect=True)
def test_a_missing_robots_txt_allows_everything(tmp_path: Path, origin: RobotsOrigin) -> None:
    results = run(tmp_path, [{"id": "p", "url": f"{origin.url}/private/x"}], "--robots")
    assert results["p"]["ok"]
    assert origin.hits("/robots.txt") == 1 and origin.hits("/private/x") == 1


@pytest.mark.parametrize("origin", [{"status": 500, "body": "down", "delay": 0.2}], indirect=True)
def test_a_failing_robots_txt_disallows_the_origin(tmp_path: Path, origin: RobotsOrigin) -> None:
    jobs = [{"id": str(i), "url": f"{origin.url}/public/{i}"} for i in range(5)]
    results = run(tmp_path, jobs, "--robots")
    assert origin.hits("/robots.txt") == 1
    for r in results.values():
        assert r["error"]["type"] == "robots" and r["attempts"] == 0
        assert "500" in r["error"]["message"]
    assert [p for p, _ in origin.seen] == ["/robots.txt"]


def test_an_unreachable_origin_is_disallowed(tmp_path: Path) -> None:
    results = run(tmp_path, [{"id": "x", "url": "http://127.0.0.1:1/page"}], "--robots")
    assert results["x"]["error"]["type"] == "robots"
    assert results["x"]["attempts"] == 0
    assert "could not be fetched (connect)" in results["x"]["error"]["message"]


@pytest.mark.parametrize(
    "origin", [{"body": "User-agent: *\nCrawl-delay: 0.2\nDisallow: /private\n"}], indirect=True
)
def test_crawl_delay_spaces_the_requests_to_the_origin(
    tmp_path: Path, origin: RobotsOrigin
) -> None:
    jobs = [{"id": str(i), "url": f"{origin.url}/page/{i}"} for i in range(4)]
    results = run(tmp_path, jobs, "--robots")
    assert all(r["ok"] for r in results.values())
    starts = sorted(t for p, t in origin.seen if p.startswith("/page/"))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 3 and min(gaps) >= 0.18, gaps


@pytest.mark.parametrize("origin", [{"body": "User-agent: *\nCrawl-delay: 0.2\n"}], indirect=True)
def test_a_lower_rate_wins_over_crawl_delay(tmp_path: Path, origin: RobotsOrigin) -> None:
    jobs = [{"id": str(i), "url": f"{origin.url}/page/{i}"} for i in range(3)]
    results = run(tmp_path, jobs, "--robots", "--rate", "2")
    assert all(r["ok"] for r in results.values())
    starts = sorted(t for p, t in origin.seen if p.startswith("/page/"))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.45, gaps  # --rate 2 is one start every 0.5 s


def test_a_redirect_to_a_disallowed_url_stops_there(tmp_path: Path, origin: RobotsOrigin) -> None:
    results = run(tmp_path, [{"id": "r", "url": f"{origin.url}/go/private/x"}], "--robots")
    r = results["r"]
    assert r["error"]["type"] == "robots"
    assert r["attempts"] == 1  # the job's own URL was allowed and sent
    assert origin.hits("/go/private/x") == 1 and origin.hits("/private/x") == 0


async def test_the_cache_of_origins_is_bounded() -> None:
    import aiohttp

    from fetcher.robots import RobotsGate, origin_of

    peers = [RobotsOrigin() for _ in range(3)]
    for peer in peers:
        peer.start()
    try:
        async with aiohttp.ClientSession() as session:
            gate = RobotsGate(
                lambda: session, user_agent="fetcher/1", timeout=5, rate=None, max_origins=2
            )
            for peer in [*peers, peers[0]]:
                assert await gate.check(URL(f"{peer.url}/public")) is None
            await gate.close()
        # The first origin was forgotten when the third came, so it was fetched again.
        assert [p.hits("/robots.txt") for p in peers] == [2, 1, 1]
        assert origin_of(URL(peers[0].url)) == f"http://127.0.0.1:{peers[0].port}"
    finally:
        for peer in peers:
            peer.stop()
