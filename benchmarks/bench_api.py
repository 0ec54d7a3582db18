#!/usr/bin/env python3
"""Memory of the library API: a generator of a million jobs through ``Runner.run``.

The jobs are made one at a time by a generator and the results are consumed as they stream
out, so memory must stay flat: the peak RSS after 100,000 results and at the end should be
about the same. Prints RSS (current and peak) at each checkpoint, then throughput.

The target is the shared nginx (``../shared/bench/server.sh start``, ``/small.html`` on
127.0.0.1:8088). When it cannot be reached, the jobs are invalid URLs (refused before any
network use), which still exercises validation, the pool and the result stream.

    python benchmarks/bench_api.py [--jobs N] [--concurrency C] [--url URL] [--invalid]
                                   [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FETCHER_BENCH_SHARED", ROOT.parent / "shared" / "bench"))
SERVER_SH = SHARED / "server.sh"
DEFAULT_URL = "http://127.0.0.1:8088/small.html"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=1):
            return True
    except OSError:
        return False


def start_server(url: str) -> bool:
    """The shared nginx, started if need be; False when it cannot be had."""
    if reachable(url):
        return True
    if SERVER_SH.exists():
        subprocess.run(["bash", str(SERVER_SH), "start"], check=False, capture_output=True)
    return reachable(url)


def jobs(n: int, url: str | None) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": f"j{i}", "url": url if url is not None else f"ftp://files.test/{i}"}


async def run(n: int, concurrency: int, url: str | None, checkpoints: set[int]) -> None:
    import fetcher

    settings = fetcher.Settings(concurrency=concurrency, retries=0, timeout=30)
    done = ok = 0
    t0 = time.perf_counter()
    async with fetcher.Runner(settings) as runner:
        async for result in runner.run(jobs(n, url)):
            done += 1
            ok += result.ok
            if done in checkpoints:
                rate = done / (time.perf_counter() - t0)
                print(
                    f"{done:>9,} results  rss {rss_mb():7.1f} MB  peak {peak_rss_mb():7.1f} MB"
                    f"  {rate:9,.0f} jobs/s",
                    flush=True,
                )
    elapsed = time.perf_counter() - t0
    print(
        f"done: {done:,} results ({ok:,} ok) in {elapsed:.1f} s, {done / elapsed:,.0f} jobs/s;"
        f" peak RSS {peak_rss_mb():.1f} MB",
        flush=True,
    )
    if done != n:
        sys.exit(f"expected {n} results, got {done}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--invalid", action="store_true", help="refused URLs only, no network")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args()

    url: str | None = None
    if not args.invalid:
        if start_server(args.url):
            url = args.url
        else:
            print(f"{args.url} unreachable: running refused (invalid URL) jobs", flush=True)
    print(
        f"{args.jobs:,} jobs, concurrency {args.concurrency}, loop {args.loop}, "
        f"target {url or 'ftp:// (refused before any request)'}",
        flush=True,
    )
    print(f"start: rss {rss_mb():.1f} MB", flush=True)
    checkpoints = {10_000, 100_000, *range(250_000, args.jobs + 1, 250_000), args.jobs}
    coro = run(args.jobs, args.concurrency, url, checkpoints)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
