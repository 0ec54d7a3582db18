#!/usr/bin/env python3
"""Throughput and memory benchmark of ``fetcher run`` against a local HTTP server.

Throughput (default): writes N jobs, then runs ``fetcher run`` and the yardstick (a minimal
aiohttp + uvloop + orjson fetcher, ``../shared/bench/baseline_aiohttp.py`` when present)
alternately for R rounds, and prints wall seconds, jobs/s and peak RSS of each run and the median
ratio fetcher/yardstick (lower is better; 1.0 = as fast).

Memory (``--memory``): peak RSS of ``fetcher run`` on 20,000 and 200,000 jobs (and 1,000,000 with
``--million``); memory must not grow with the number of jobs.

The server is the shared nginx (``server.sh start``) when that script exists, else an
``aiohttp.web`` server started here in a subprocess on 127.0.0.1. Peak RSS is each child's
``ru_maxrss`` as reported by ``os.wait4``.

    python benchmarks/bench.py [--jobs N] [--concurrency C] [--path /small.html] [--rounds R]
    python benchmarks/bench.py --memory [--million]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _bytecode import compile_package

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FETCHER_BENCH_SHARED", ROOT.parent / "shared" / "bench"))
SERVER_SH = SHARED / "server.sh"
YARDSTICK = SHARED / "baseline_aiohttp.py"

#  The fallback server: the same routes as the shared nginx.
FALLBACK_SERVER = r"""
import asyncio, os, sys
from aiohttp import web

SMALL = b"<html>" + b"x" * 1000 + b"</html>\n"
BIG = os.urandom(100_000)

async def small(request):
    return web.Response(body=SMALL, content_type="text/html")

async def big(request):
    return web.Response(body=BIG, content_type="application/octet-stream")

def delayed(seconds, text):
    async def handler(request):
        await asyncio.sleep(seconds)
        return web.Response(text=text)
    return handler

app = web.Application()
app.router.add_get("/small.html", small)
app.router.add_get("/100k.bin", big)
app.router.add_get("/delay", delayed(0.1, "delayed\n"))
app.router.add_get("/delay1s", delayed(1.0, "delayed1s\n"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, backlog=4096)
"""


@dataclass
class Sample:
    wall: float
    rss_kb: int
    code: int


def measure(cmd: list[str], stderr_path: Path) -> Sample:
    """Run ``cmd`` with stdout discarded; its wall time and peak RSS (kB)."""
    with open(stderr_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Sample(wall, usage.ru_maxrss, proc.returncode)


class Server:
    """The shared nginx when available, else a fallback aiohttp server in a subprocess."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if SERVER_SH.exists() and shutil.which("nginx"):
            port = self.port or 8088
            env = {**os.environ, "PORT": str(port)}
            subprocess.run([str(SERVER_SH), "start"], check=True, env=env)
            self.port = port
            print(f"server: nginx via {SERVER_SH} on 127.0.0.1:{port}")
            return
        self.port = self.port or _free_port()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", FALLBACK_SERVER, str(self.port)], stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.1)
                continue
            print(f"server: fallback aiohttp.web on 127.0.0.1:{self.port}")
            return
        self.stop()
        sys.exit("bench: the fallback server did not come up")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_jobs(path: Path, n: int, port: int, url_path: str) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(f'{{"id": "j{i}", "url": "http://127.0.0.1:{port}{url_path}?i={i}"}}\n')


def fetcher_cmd(jobs: Path, out: Path, concurrency: int) -> list[str]:
    exe = shutil.which("fetcher")
    base = [exe] if exe else [sys.executable, "-m", "fetcher"]
    return [*base, "run", str(jobs), "-o", str(out), "-n", str(concurrency), "--no-progress"]


def run_fetcher(jobs: Path, n: int, concurrency: int, work: Path) -> Sample:
    out = work / "out_fetcher.jsonl"
    out.unlink(missing_ok=True)
    sample = measure(fetcher_cmd(jobs, out, concurrency), work / "fetcher.stderr")
    if sample.code not in (0, 1):
        sys.stderr.write((work / "fetcher.stderr").read_text())
        sys.exit(f"bench: fetcher exited {sample.code}")
    with open(out, "rb") as f:
        lines = sum(1 for _ in f)
    if lines != n:
        sys.exit(f"bench: fetcher wrote {lines} result lines for {n} jobs")
    return sample


def run_yardstick(jobs: Path, concurrency: int, work: Path) -> Sample:
    out = work / "out_yardstick.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(YARDSTICK), str(jobs), str(out), str(concurrency)]
    sample = measure(cmd, work / "yardstick.stderr")
    if sample.code != 0:
        sys.stderr.write((work / "yardstick.stderr").read_text())
        sys.exit(f"bench: yardstick exited {sample.code}")
    return sample


def describe(name: str, s: Sample, n: int) -> str:
    return f"{name} {s.wall:6.2f}s {n / s.wall:8.0f} jobs/s {s.rss_kb / 1024:6.1f} MB"


def throughput(args: argparse.Namespace, port: int, work: Path) -> None:
    jobs = work / "jobs.jsonl"
    write_jobs(jobs, args.jobs, port, args.path)
    have_yardstick = YARDSTICK.exists() and not args.no_yardstick
    if not have_yardstick:
        print(f"no yardstick at {YARDSTICK}: fetcher alone")
    ratios = []
    for r in range(1, args.rounds + 1):
        f = run_fetcher(jobs, args.jobs, args.concurrency, work)
        line = f"round {r}: {describe('fetcher', f, args.jobs)}"
        if have_yardstick:
            y = run_yardstick(jobs, args.concurrency, work)
            ratios.append(f.wall / y.wall)
            line += f" | {describe('yardstick', y, args.jobs)} | ratio {ratios[-1]:.3f}"
        print(line, flush=True)
    summary = f"jobs={args.jobs} concurrency={args.concurrency} path={args.path}"
    if ratios:
        summary += f" median ratio fetcher/yardstick = {statistics.median(ratios):.3f}"
    print(summary)


def memory(args: argparse.Namespace, port: int, work: Path) -> None:
    sizes = [20_000, 200_000] + ([1_000_000] if args.million else [])
    jobs = work / "jobs.jsonl"
    peaks = {}
    for n in sizes:
        write_jobs(jobs, n, port, args.path)
        s = run_fetcher(jobs, n, args.concurrency, work)
        peaks[n] = s.rss_kb / 1024
        print(f"{n:>9} jobs: {describe('fetcher', s, n)}", flush=True)
    first = peaks[sizes[0]]
    for n in sizes[1:]:
        print(f"peak RSS growth {sizes[0]} -> {n} jobs: {peaks[n] - first:+.1f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per run (20000)")
    p.add_argument("--concurrency", type=int, default=100, help="-n of both fetchers (100)")
    p.add_argument("--path", default="/small.html", help="/small.html, /delay, /100k.bin")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    p.add_argument("--port", type=int, default=None, help="server port (nginx: 8088)")
    p.add_argument("--memory", action="store_true", help="peak RSS at 20k vs 200k jobs")
    p.add_argument("--million", action="store_true", help="with --memory: also 1,000,000 jobs")
    p.add_argument("--no-yardstick", action="store_true", help="time fetcher alone")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = p.parse_args()
    compile_package()

    server = Server(args.port)
    server.start()
    assert server.port is not None
    try:
        with tempfile.TemporaryDirectory(prefix="fetcher-bench-") as tmp:
            work = Path(args.dir) if args.dir else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            if args.memory:
                memory(args, server.port, work)
            else:
                throughput(args, server.port, work)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
