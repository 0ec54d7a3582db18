#!/usr/bin/env python3
"""Instructions a run executes, fetcher beside the yardstick: a figure load does not move.

Wall-time ratios on a shared 2-core machine drift by 10-30 % from hour to hour; the number of
instructions a program executes for the same work hardly moves. Each program runs under
valgrind's callgrind (``--callgrind-out-file=/dev/null``: only its total is kept, every thread
counted) twice: on one job (start-up and exit) and on JOBS jobs of ``/small.html`` at
``-n 100``. The difference, divided by JOBS - 1, is the cost of a job; start-up plus 20,000
jobs is what the 20,000-job benchmark spends.

Valgrind runs a program 50-100 times slower: 2,000 jobs take about a minute a run.

    python benchmarks/bench_instructions.py [--jobs 2000] [--fields id,ok,status,bytes,elapsed_ms]
        [--tree DIR ...]

``--tree DIR`` measures another checkout's fetcher package too (``DIR/fetcher``, e.g. a
``git worktree`` of an older commit), run with ``PYTHONPATH=DIR``.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FETCHER_BENCH_SHARED", ROOT.parent / "shared" / "bench"))
YARDSTICK = SHARED / "baseline_aiohttp.py"
PORT = int(os.environ.get("PORT", "8088"))
_COLLECTED = re.compile(rb"Collected : (\d+)")


def instructions(cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
        capture_output=True,
        env=env,
        # Not the project's folder: `python -m fetcher` would import the fetcher found there
        # before the one on PYTHONPATH.
        cwd=cwd,
        check=False,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode not in (0, 1) or found is None:
        sys.exit(f"bench_instructions: {cmd[0]} failed:\n{done.stderr.decode()[-2000:]}")
    return int(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2000, help="jobs of the long run (2000)")
    p.add_argument("--fields", help="fetcher's --fields (default: the full line)")
    p.add_argument("--tree", action="append", default=[], help="another checkout to measure")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench_instructions: needs valgrind (apt-get install valgrind)")
    work = Path(tempfile.mkdtemp(prefix="fetcher-bench-instr-"))
    try:
        files = {}
        for n in (1, args.jobs):
            files[n] = work / f"jobs{n}.jsonl"
            with open(files[n], "wb") as f:
                for i in range(n):
                    url = f"http://127.0.0.1:{PORT}/small.html?i={i}"
                    f.write(orjson.dumps({"id": f"j{i}", "url": url}) + b"\n")
        out = str(work / "out.jsonl")
        programs: dict[str, tuple[list[str], dict[str, str]]] = {}
        fetcher_args = ["-n", "100", "--no-progress", "--overwrite"]
        if args.fields:
            fetcher_args += ["--fields", args.fields]
        for tree in [str(ROOT), *args.tree]:
            # Bytecode compiled first, as an installed fetcher has it (_bytecode.py).
            compileall.compile_dir(Path(tree) / "fetcher", quiet=1)
            env = {**os.environ, "PYTHONPATH": tree}
            cmd = [sys.executable, "-m", "fetcher", "run", "{jobs}", "-o", out, *fetcher_args]
            programs[f"fetcher {tree}"] = (cmd, env)
        yardstick = [sys.executable, str(YARDSTICK), "{jobs}", out, "100"]
        programs["yardstick"] = (yardstick, {**os.environ})
        rows = []
        for name, (cmd, env) in programs.items():
            counts = {}
            for n, path in files.items():
                counts[n] = instructions(
                    [str(path) if a == "{jobs}" else a for a in cmd], env, work
                )
            start = counts[1]
            per_job = (counts[args.jobs] - start) / (args.jobs - 1)
            rows.append((name, start, per_job, start + 20_000 * per_job))
        yard = rows[-1][3]
        print(f"{'program':<48}{'start-up':>12}{'a job':>10}{'20,000 jobs':>14}{'ratio':>7}")
        for name, start, per_job, total in rows:
            print(
                f"{name[-48:]:<48}{start / 1e6:>11.0f}M{per_job / 1e3:>9.0f}k"
                f"{total / 1e9:>13.2f}G{total / yard:>7.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
