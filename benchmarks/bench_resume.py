#!/usr/bin/env python3
"""Reading a big results file: ``--resume`` (and ``--retry-failed``) with every job already done.

Writes a job file of N http jobs and a results file of N result lines shaped like the ones
``fetcher run`` writes against nginx (~625 bytes a line, the response headers included), then
times ``fetcher run JOBS -o OUT --resume``, which finds every job done and runs none, and
``fetcher run JOBS --retry-failed OUT``, which likewise finds nothing to retry. Peak RSS is the
process's ``ru_maxrss`` from ``os.wait4``. Nothing touches the network.

    python benchmarks/bench_resume.py [--lines 1000000] [--rounds 3] [--dir /tmp/fetcher-resume]
    python benchmarks/bench_resume.py --lines 10000000 --rounds 1   # ~6.5 GB on disk
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import orjson
from _bytecode import compile_package
from _runs import timed

ROOT = Path(__file__).resolve().parent.parent
FETCHER = str(Path(sys.executable).with_name("fetcher"))

#  A result line as fetcher writes it for nginx's /small.html.
TEMPLATE = {
    "id": "",
    "kind": "http",
    "ok": True,
    "attempts": 1,
    "started_at": "2026-12-01T10:48:12.345Z",
    "elapsed_ms": 2.417,
    "error": None,
    "url": "",
    "final_url": "",
    "method": "GET",
    "status": 200,
    "headers": {
        "server": "nginx/1.22.1",
        "date": "Tue, 01 Dec 2026 10:48:12 GMT",
        "content-type": "text/html",
        "content-length": "1013",
        "last-modified": "Tue, 01 Dec 2026 09:00:00 GMT",
        "connection": "keep-alive",
        "etag": '"692d5a90-3f5"',
        "accept-ranges": "bytes",
    },
    "content_type": "text/html",
    "bytes": 1013,
    "sha256": "7c08e69b5e4c03f5bb9fe1bc547af5a02ad5633e1171fbc79ff87d93fb5a32ef",
    "redirects": 0,
}


def write_files(directory: Path, lines: int) -> tuple[Path, Path]:
    jobs, results = directory / f"jobs-{lines}.jsonl", directory / f"results-{lines}.jsonl"
    if jobs.exists() and results.exists():
        return jobs, results
    directory.mkdir(parents=True, exist_ok=True)
    line = dict(TEMPLATE)
    with open(jobs, "wb") as jf, open(results, "wb") as rf:
        jbuf, rbuf = [], []
        for i in range(lines):
            url = f"http://127.0.0.1:8088/small.html?i={i}"
            jbuf.append(b'{"id": "j%d", "url": "%s"}\n' % (i, url.encode()))
            line["id"], line["url"], line["final_url"] = f"j{i}", url, url
            rbuf.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
            if len(rbuf) == 10_000:
                jf.write(b"".join(jbuf))
                rf.write(b"".join(rbuf))
                jbuf, rbuf = [], []
        jf.write(b"".join(jbuf))
        rf.write(b"".join(rbuf))
    return jobs, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path("/tmp/fetcher-resume"))
    a = p.parse_args()
    compile_package()
    jobs, results = write_files(a.dir, a.lines)
    size = results.stat().st_size
    print(f"{a.lines} result lines, {size / 1e6:.0f} MB: {results}")
    cases = {
        "--resume": [FETCHER, "run", str(jobs), "-o", str(results), "--resume"],
        "--retry-failed": [FETCHER, "run", str(jobs), "--retry-failed", str(results)],
    }
    for name, cmd in cases.items():
        samples = []
        for _ in range(a.rounds):
            out, err = a.dir / "stdout", a.dir / "stderr"
            sample = timed([*cmd, "--no-progress"], out, err, who=name)
            if out.stat().st_size or results.stat().st_size != size:
                sys.exit(f"{name}: ran jobs that were done")
            samples.append(sample)
        wall = statistics.median(s.wall for s in samples)
        rss = max(s.rss_kb for s in samples) / 1024
        rounds = " ".join(f"{s.wall:.2f}" for s in samples)
        print(f"{name:16} median {wall:6.2f} s  peak RSS {rss:6.1f} MB  (rounds: {rounds})")


if __name__ == "__main__":
    main()
