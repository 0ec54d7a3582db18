#!/usr/bin/env python3
"""Scale-out benchmark: `fetcher worker` x1, x2, x3 on Redis Streams against `fetcher run`.

Needs the local nginx (`/work/shared/bench/server.sh start`, or any server given with --url) and
the redis-server binary; it starts its own redis-server on a free loopback port.

For each worker count: start the workers (they wait on the empty stream), enqueue N jobs, and
time from the start of enqueue until the results stream holds N results. `run` on the same job
file is timed by its own summary line (start-up excluded, as for the pre-started workers).
CPU per job leaves start-up out: for workers, their CPU between enqueue and the last result; for
`run`, its CPU minus that of a one-job run. The difference between one worker and `run` is the
cost of the Redis round trips (read, store + ack) per job.

Usage: bench_workers.py [-n JOBS] [-c CONCURRENCY] [--url URL] [--workers 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from _bytecode import compile_package

FETCHER = [sys.executable, "-m", "fetcher"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], redis.Redis, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_workers: redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    return proc, client, f"redis://127.0.0.1:{port}/0"


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_rusage(proc: subprocess.Popen[bytes]) -> float:
    """Wait for ``proc``; its user + system CPU seconds."""
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime


def bench_run(jobs: Path, n: int, concurrency: int, tmp: Path) -> tuple[float, float]:
    one = tmp / "one.jsonl"
    one.write_text(jobs.read_text().split("\n", 1)[0] + "\n")
    proc = subprocess.Popen(
        [*FETCHER, "run", str(one), "-o", os.devnull, "--no-progress"], stderr=subprocess.DEVNULL
    )
    startup_cpu = wait_rusage(proc)
    proc = subprocess.Popen(
        [*FETCHER, "run", str(jobs), "-o", str(tmp / "run.jsonl"), "--overwrite", "-n",
         str(concurrency), "--no-progress"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    cpu = wait_rusage(proc)
    m = re.search(r"(\d+) jobs in ([\d.]+) s", err)
    if not m or int(m.group(1)) != n:
        sys.exit(f"bench_workers: unexpected run summary:\n{err}")
    return n / float(m.group(2)), cpu - startup_cpu


def bench_workers(
    count: int, jobs: Path, n: int, concurrency: int, client: redis.Redis, url: str, tmp: Path
) -> tuple[float, float]:
    client.flushall()
    logs = [tmp / f"w{i}.err" for i in range(count)]
    workers = []
    for i, log in enumerate(logs):
        with log.open("wb") as err:
            workers.append(
                subprocess.Popen(
                    [
                        *FETCHER,
                        "worker",
                        "--redis",
                        url,
                        "--consumer",
                        f"w{i}",
                        "-n",
                        str(concurrency),
                    ],
                    stderr=err,
                )
            )
    try:
        # Ready once every worker has logged its start (the group exists, it is about to read).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all("group fetcher on" in log.read_text() for log in logs):
                break
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.perf_counter()
        cpu0 = sum(proc_cpu(w.pid) for w in workers)
        subprocess.run(
            [*FETCHER, "enqueue", str(jobs), "--redis", url], check=True, stderr=subprocess.DEVNULL
        )
        while client.xlen("fetcher:results") < n:
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        cpu = sum(proc_cpu(w.pid) for w in workers) - cpu0
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        w.wait()
    return n / elapsed, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", "--jobs", type=int, default=20000)
    p.add_argument("-c", "--concurrency", type=int, default=100)
    p.add_argument("--url", default="http://127.0.0.1:8088/small.html")
    p.add_argument("--workers", default="1,2,3")
    a = p.parse_args()
    compile_package()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as d:
        tmp = Path(d)
        jobs = tmp / "jobs.jsonl"
        with jobs.open("w") as f:
            for i in range(a.jobs):
                f.write(f'{{"id": "j{i}", "url": "{a.url}?i={i}"}}\n')
        rproc, client, url = start_redis(tmp)
        try:
            rate, cpu = bench_run(jobs, a.jobs, a.concurrency, tmp)
            run_cpu_us = cpu / a.jobs * 1e6
            print(f"nproc {os.cpu_count()}, {a.jobs} jobs, concurrency {a.concurrency} per process")
            print(f"{'mode':<12}{'jobs/s':>10}{'CPU us/job':>12}{'overhead us/job':>17}")
            print(f"{'run':<12}{rate:>10.0f}{run_cpu_us:>12.0f}{'-':>17}")
            for count in (int(x) for x in a.workers.split(",")):
                rate, cpu = bench_workers(count, jobs, a.jobs, a.concurrency, client, url, tmp)
                cpu_us = cpu / a.jobs * 1e6
                print(
                    f"{f'worker x{count}':<12}{rate:>10.0f}{cpu_us:>12.0f}"
                    f"{cpu_us - run_cpu_us:>+17.0f}"
                )
        finally:
            rproc.terminate()
            rproc.wait()


if __name__ == "__main__":
    main()
