#!/usr/bin/env python3
"""fetcher against the yardstick, and against the yardstick writing SPEC's result line.

The yardstick (``../shared/bench/baseline_aiohttp.py``) writes five fields a job. SPEC.md asks
fetcher for sixteen, among them every response header and a SHA-256 of the body.
``benchmarks/spec_floor.py`` is the yardstick with exactly that change, so the two yardsticks
tell what SPEC's result line costs by itself, and fetcher's ratio can be read against it.

Runs, alternately for R rounds, on N jobs of PATH (``/small.html`` by default):

- fetcher: ``fetcher run JOBS -o OUT -n C --no-progress``
- yardstick: ``baseline_aiohttp.py JOBS OUT C``
- spec floor: ``spec_floor.py JOBS OUT C``

and prints each run's wall and CPU seconds, then per program the median wall and CPU seconds
and the median of its per-round wall-time ratios to the yardstick (lower is better).

The server is the shared nginx (``../shared/bench/server.sh start``, port 8088 unless $PORT).

    python benchmarks/bench_floor.py [--jobs 20000] [--rounds 5] [--concurrency 100]
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
from _runs import Sample, count_lines, timed

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FETCHER_BENCH_SHARED", ROOT.parent / "shared" / "bench"))
SERVER_SH = SHARED / "server.sh"
YARDSTICK = SHARED / "baseline_aiohttp.py"
SPEC_FLOOR = Path(__file__).resolve().parent / "spec_floor.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per run (20000)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    p.add_argument("--concurrency", type=int, default=100, help="-n of each program (100)")
    p.add_argument("--path", default="/small.html", help="URL path on the server (/small.html)")
    args = p.parse_args()
    compile_package()

    for needed in (SERVER_SH, YARDSTICK):
        if not needed.exists():
            sys.exit(f"bench_floor: no {needed}")
    fetcher = shutil.which("fetcher")
    if not fetcher:
        sys.exit("bench_floor: needs fetcher on PATH (activate the virtualenv)")
    port = int(os.environ.get("PORT", "8088"))
    subprocess.run([str(SERVER_SH), "start"], check=True)

    with tempfile.TemporaryDirectory(prefix="fetcher-bench-floor-") as tmp:
        work = Path(tmp)
        jobs, out, err = work / "jobs.jsonl", work / "out.jsonl", work / "stderr"
        with open(jobs, "w") as f:
            for i in range(args.jobs):
                f.write(f'{{"id": "j{i}", "url": "http://127.0.0.1:{port}{args.path}?i={i}"}}\n')
        n = str(args.concurrency)
        commands = {
            "fetcher": [fetcher, "run", str(jobs), "-o", str(out), "-n", n, "--no-progress"],
            "yardstick": [sys.executable, str(YARDSTICK), str(jobs), str(out), n],
            "spec floor": [sys.executable, str(SPEC_FLOOR), str(jobs), str(out), n],
        }
        samples: dict[str, list[Sample]] = {name: [] for name in commands}
        for r in range(1, args.rounds + 1):
            parts = []
            for name, cmd in commands.items():
                out.unlink(missing_ok=True)
                sample = timed(cmd, work / "stdout", err, who="bench_floor")
                lines = count_lines(out)
                if lines != args.jobs:
                    sys.exit(f"bench_floor: {name} wrote {lines} lines for {args.jobs} jobs")
                samples[name].append(sample)
                parts.append(f"{name} {sample.wall:5.2f}s ({sample.cpu:5.2f}s CPU)")
            print(f"round {r}: " + " | ".join(parts), flush=True)

    base = samples["yardstick"]
    print()
    print(f"jobs={args.jobs} path={args.path} concurrency={args.concurrency}")
    print(f"{'program':<12}{'median s':>10}{'CPU s':>8}{'peak RSS MB':>13}{'ratio/yardstick':>17}")
    for name, runs in samples.items():
        ratios = [s.wall / b.wall for s, b in zip(runs, base, strict=True)]
        print(
            f"{name:<12}{statistics.median(s.wall for s in runs):>10.2f}"
            f"{statistics.median(s.cpu for s in runs):>8.2f}"
            f"{max(s.rss_kb for s in runs) / 1024:>13.1f}"
            f"{statistics.median(ratios):>17.3f}"
        )


if __name__ == "__main__":
    main()
