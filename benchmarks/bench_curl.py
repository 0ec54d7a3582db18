#!/usr/bin/env python3
"""``fetcher run --processes 2`` against ``curl --parallel`` on the same URLs.

Writes N ``/small.html`` jobs and a curl config file with the same URLs (per URL a ``url`` and an
``output = /dev/null`` line), then runs, alternately for R rounds:

- A: ``fetcher run JOBS -o OUT -n C --processes 2 --no-progress``
- B: ``curl --parallel --parallel-max C -K CONFIG -w '%{json}\\n'`` (one JSON object per transfer
  on stdout, written to a file, as fetcher writes one result line per job)
- ref: ``fetcher run JOBS -o OUT -n C --no-progress`` (one process), for reference

and prints each run's wall seconds and peak RSS and the median ratio of each fetcher run to curl
(lower is better; 1.0 = as fast). ``-n`` applies to each fetcher process, so ``--processes 2``
keeps up to 2 x C requests in flight where curl keeps C.

The server is the shared nginx (``../shared/bench/server.sh start``, port 8088 unless $PORT).

    python benchmarks/bench_curl.py [--jobs 20000] [--rounds 3] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _bytecode import compile_package
from _runs import count_lines, timed

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FETCHER_BENCH_SHARED", ROOT.parent / "shared" / "bench"))
SERVER_SH = SHARED / "server.sh"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000, help="URLs per run (20000)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    p.add_argument(
        "--concurrency", type=int, default=100, help="curl --parallel-max and fetcher -n (100)"
    )
    p.add_argument("--path", default="/small.html", help="URL path on the server (/small.html)")
    args = p.parse_args()
    compile_package()

    if not SERVER_SH.exists():
        sys.exit(f"bench_curl: no {SERVER_SH}")
    curl = shutil.which("curl")
    fetcher = shutil.which("fetcher")
    if not curl or not fetcher:
        sys.exit("bench_curl: needs curl and fetcher on PATH (activate the virtualenv)")
    port = int(os.environ.get("PORT", "8088"))
    subprocess.run([str(SERVER_SH), "start"], check=True)
    version = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
    print(f"server: nginx on 127.0.0.1:{port}; {version.splitlines()[0]}")

    with tempfile.TemporaryDirectory(prefix="fetcher-bench-curl-") as tmp:
        work = Path(tmp)
        jobs, config = work / "jobs.jsonl", work / "curl.cfg"
        with open(jobs, "w") as fj, open(config, "w") as fc:
            for i in range(args.jobs):
                url = f"http://127.0.0.1:{port}{args.path}?i={i}"
                fj.write(f'{{"id": "j{i}", "url": "{url}"}}\n')
                fc.write(f'url = "{url}"\noutput = "/dev/null"\n')
        out, err = work / "out.jsonl", work / "stderr"
        n = str(args.concurrency)
        base = [fetcher, "run", str(jobs), "-o", str(out), "-n", n, "--no-progress", "--overwrite"]
        commands = {
            "fetcher --processes 2": [*base, "--processes", "2"],
            "curl --parallel": [
                curl,
                "--silent",
                "--parallel",
                "--parallel-max",
                n,
                "-K",
                str(config),
                "-w",
                "%{json}\\n",
            ],
            "fetcher (1 process)": base,
        }
        walls: dict[str, list[float]] = {name: [] for name in commands}
        rss: dict[str, list[int]] = {name: [] for name in commands}
        for r in range(1, args.rounds + 1):
            parts = []
            for name, cmd in commands.items():
                out.unlink(missing_ok=True)
                stdout = work / "curl.out" if name.startswith("curl") else work / "stdout"
                sample = timed(cmd, stdout, err, who="bench_curl")
                lines = count_lines(stdout if name.startswith("curl") else out)
                if lines != args.jobs:
                    sys.exit(f"bench_curl: {name} wrote {lines} lines for {args.jobs} URLs")
                walls[name].append(sample.wall)
                rss[name].append(sample.rss_kb)
                parts.append(f"{name} {sample.wall:6.2f}s")
            print(f"round {r}: " + " | ".join(parts), flush=True)

    curl_med = statistics.median(walls["curl --parallel"])
    print()
    print(f"jobs={args.jobs} path={args.path} concurrency={args.concurrency}")
    print(f"{'run':<24}{'median s':>10}{'jobs/s':>10}{'peak RSS MB':>13}{'ratio/curl':>12}")
    for name in commands:
        med = statistics.median(walls[name])
        peak = max(rss[name]) / 1024
        ratio = med / curl_med
        print(f"{name:<24}{med:>10.2f}{args.jobs / med:>10.0f}{peak:>13.1f}{ratio:>12.3f}")
    ratios = [
        f / c for f, c in zip(walls["fetcher --processes 2"], walls["curl --parallel"], strict=True)
    ]
    print(f"median per-round ratio fetcher --processes 2 / curl = {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
