#!/usr/bin/env python3
"""Reading big inputs: ``fetcher validate`` over a URL list, a CSV file and their .gz forms.

Writes LINES URLs (one in a thousand not valid) as ``urls.txt``, ``urls.txt.gz`` and a CSV of
three columns (``id,url,note``), and runs ``fetcher validate`` on each ROUNDS times, printing the
median wall and CPU seconds and the largest peak RSS. Every input streams, so the peak RSS must
not grow with LINES: the target is at most 80 MB for 1,000,000 URLs. Nothing touches the network.

    python benchmarks/bench_inputs.py [--lines 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _runs import Sample, timed

RSS_TARGET_MB = 80


def write_inputs(folder: Path, lines: int) -> dict[str, Path]:
    txt, csv = folder / "urls.txt", folder / "urls.csv"
    with txt.open("w") as t, csv.open("w") as c:
        t.write("# a URL list, one in a thousand lines not a URL\n")
        c.write("id,url,note\n")
        for i in range(1, lines + 1):
            url = "not a url" if i % 1000 == 0 else f"http://127.0.0.1:8088/small.html?n={i}"
            t.write(url + "\n")
            c.write(f'row-{i},{url},"note {i}, quoted"\n')
    gz = folder / "urls.txt.gz"
    with txt.open("rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return {"urls.txt": txt, "urls.txt.gz": gz, "urls.csv": csv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder, args.lines)
        print(f"{args.lines} lines; fetcher validate, {args.rounds} rounds each")
        worst = 0.0
        for name, path in inputs.items():
            samples: list[Sample] = []
            for _ in range(args.rounds):
                cmd = [sys.executable, "-m", "fetcher", "validate", str(path)]
                # Exit 2: the list holds invalid lines on purpose.
                samples.append(timed(cmd, folder / "out", folder / "err", who=name, ok_codes=(2,)))
            invalid = (folder / "out").read_bytes().count(b"\n")
            if invalid != args.lines // 1000:
                sys.exit(f"{name}: {invalid} invalid lines reported, {args.lines // 1000} expected")
            rss = max(s.rss_kb for s in samples) / 1024
            worst = max(worst, rss)
            print(
                f"{name:12} wall {statistics.median(s.wall for s in samples):6.2f} s  "
                f"cpu {statistics.median(s.cpu for s in samples):6.2f} s  "
                f"peak RSS {rss:5.1f} MB"
            )
        verdict = "ok" if worst <= RSS_TARGET_MB else "OVER"
        print(f"largest peak RSS {worst:.1f} MB (target <= {RSS_TARGET_MB} MB): {verdict}")


if __name__ == "__main__":
    main()
