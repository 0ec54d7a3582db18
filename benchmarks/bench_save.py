#!/usr/bin/env python3
"""Downloads: fetcher --save beside curl writing each body to a file, a 1 GiB body, --warc.

Cases (all against the shared nginx, ``../shared/bench/server.sh start``, port 8088 unless $PORT):

    files    2,000 x 1 MiB bodies to disk, -n 100: ``fetcher run --save DIR --save-name {id}``
             (one file per job, as curl writes them) beside ``curl --parallel --parallel-max 100``
             with one ``-o`` per URL; wall time ratio and peak RSS
    huge     one 1 GiB body, ``--save DIR --max-bytes 0``: peak RSS, and its sha256 checked
             against the file's own
    warc     20,000 ``/small.html`` jobs, -n 100, with ``--warc`` beside the same run without:
             wall time ratio (and CPU time ratio, the writer process's included), peak RSS
    io       how the loop fares while 200 MiB are written: os.write on the loop against a
             thread per 256 KiB write (save.py hands its flushes to threads the same way): the
             longest stall of a 1 ms ticker

    python benchmarks/bench_save.py [--cases files,huge,warc,io] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from _bytecode import compile_package
from _runs import Sample, count_lines, timed

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FETCHER_BENCH_SHARED", ROOT.parent / "shared" / "bench"))
DOCROOT = Path(os.environ.get("BENCH_DIR", "/tmp/fetcher-bench")) / "www"
PORT = int(os.environ.get("PORT", "8088"))
BASE = f"http://127.0.0.1:{PORT}"


def sha256_file(path: Path) -> str:
    """In blocks: a whole 1 GiB read here would stay in this process's peak RSS, which
    Linux carries into the children it forks (their ru_maxrss counts it from before exec)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_jobs(path: Path, urls: list[str]) -> None:
    with open(path, "wb") as f:
        for i, url in enumerate(urls):
            f.write(orjson.dumps({"id": f"j{i}", "url": url}) + b"\n")


def ratio_rounds(
    rounds: int, commands: dict[str, list[str]], work: Path, before: dict[str, object]
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {who: [] for who in commands}
    for r in range(1, rounds + 1):
        parts = []
        for who, cmd in commands.items():
            reset = before.get(who)
            if callable(reset):
                reset()
            sample = timed(cmd, work / "stdout", work / "stderr", who=f"bench_save {who}")
            samples[who].append(sample)
            parts.append(f"{who} {sample.wall:6.2f}s {sample.rss_kb / 1024:6.1f}MB")
        print(f"  round {r}: " + " | ".join(parts), flush=True)
    return samples


def report(name: str, samples: dict[str, list[Sample]]) -> None:
    (a, sa), (b, sb) = samples.items()
    ratio = statistics.median(x.wall / y.wall for x, y in zip(sa, sb, strict=True))
    rss_a = max(s.rss_kb for s in sa) / 1024
    rss_b = max(s.rss_kb for s in sb) / 1024
    print(
        f"{name}: {a} {statistics.median(s.wall for s in sa):.2f} s, {rss_a:.0f} MB | "
        f"{b} {statistics.median(s.wall for s in sb):.2f} s, {rss_b:.0f} MB | "
        f"ratio {a}/{b} {ratio:.2f}"
    )


def case_files(args: argparse.Namespace, work: Path, fetcher: str) -> None:
    (DOCROOT / "1m.bin").write_bytes(os.urandom(1 << 20))
    urls = [f"{BASE}/1m.bin?i={i}" for i in range(2000)]
    jobs = work / "files.jsonl"
    write_jobs(jobs, urls)
    curl_cfg = work / "curl.cfg"
    with open(curl_cfg, "w") as f:
        for i, url in enumerate(urls):
            f.write(f'url = "{url}"\noutput = "{work}/curl/j{i}"\n')
    save, out = work / "fetcher", work / "out.jsonl"

    def fresh(folder: Path) -> object:
        def reset() -> None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()

        return reset

    commands = {
        "fetcher": [
            fetcher, "run", str(jobs), "-o", str(out), "--overwrite", "--no-progress",
            "-n", "100", "--save", str(save), "--save-name", "{id}",
        ],
        "curl": [
            "curl", "--parallel", "--parallel-max", "100", "-s", "-K", str(curl_cfg),
        ],
    }  # fmt: skip
    print("files: 2,000 x 1 MiB to disk, -n 100", flush=True)
    samples = ratio_rounds(
        args.rounds, commands, work, {"fetcher": fresh(save), "curl": fresh(work / "curl")}
    )
    assert count_lines(out) == 2000 and len(os.listdir(save)) == 2001  # + the partial folder
    assert len(os.listdir(work / "curl")) == 2000
    report("files", samples)
    shutil.rmtree(save)
    shutil.rmtree(work / "curl")
    (DOCROOT / "1m.bin").unlink()


def case_huge(args: argparse.Namespace, work: Path, fetcher: str) -> None:
    big = DOCROOT / "1g.bin"
    with open(big, "wb") as f:  # not sparse, not all zeros: a real read off the disk
        block = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(block)
    expected = sha256_file(big)
    jobs, out, save = work / "huge.jsonl", work / "huge-out.jsonl", work / "huge"
    write_jobs(jobs, [f"{BASE}/1g.bin"])
    cmd = [fetcher, "run", str(jobs), "-o", str(out), "--overwrite", "--no-progress"]
    cmd += ["--save", str(save), "--max-bytes", "0"]
    sample = timed(cmd, work / "stdout", work / "stderr", who="bench_save huge")
    [result] = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    on_disk = sha256_file(Path(result["path"]))
    print(
        f"huge: 1 GiB in {sample.wall:.2f} s, peak RSS {sample.rss_kb / 1024:.0f} MB, "
        f"sha256 {'right' if result['sha256'] == expected == on_disk else 'WRONG'}"
    )
    shutil.rmtree(save)
    big.unlink()


def case_warc(args: argparse.Namespace, work: Path, fetcher: str) -> None:
    jobs, out, warc = work / "small.jsonl", work / "warc-out.jsonl", work / "run.warc.gz"
    write_jobs(jobs, [f"{BASE}/small.html?i={i}" for i in range(20_000)])
    base = [fetcher, "run", str(jobs), "-o", str(out), "--overwrite", "--no-progress", "-n", "100"]
    commands = {"warc": [*base, "--warc", str(warc)], "plain": base}
    print("warc: 20,000 /small.html, -n 100, with and without --warc", flush=True)
    samples = ratio_rounds(args.rounds, commands, work, {"warc": lambda: warc.unlink(True)})
    print(f"  WARC file: {warc.stat().st_size / 1e6:.1f} MB")
    report("warc", samples)
    # The records are built in a writer process: its CPU is in the run's (wait4 counts the
    # children a process waited for), so this ratio is the whole cost of the records.
    cpu = statistics.median(
        x.cpu / y.cpu for x, y in zip(samples["warc"], samples["plain"], strict=True)
    )
    print(f"warc: CPU ratio warc/plain {cpu:.2f}")


def case_io(args: argparse.Namespace, work: Path) -> None:
    """The longest the loop is held while 200 MiB go to disk, each way."""
    data = os.urandom(256 * 1024)

    async def measure(write_in_thread: bool) -> tuple[float, float]:
        worst = 0.0
        done = False

        async def ticker() -> None:
            nonlocal worst
            while not done:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - t - 0.001)

        tick = asyncio.create_task(ticker())
        path = work / "io.bin"
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for _ in range(800):
            if write_in_thread:
                await asyncio.to_thread(os.write, fd, data)
            else:
                os.write(fd, data)
                await asyncio.sleep(0)
        os.fsync(fd)
        os.close(fd)
        elapsed = time.perf_counter() - t0
        done = True
        await tick
        path.unlink()
        return elapsed, worst

    for name, in_thread in (("os.write on the loop", False), ("a thread per flush", True)):
        elapsed, worst = asyncio.run(measure(in_thread))
        print(f"io: {name}: 200 MiB in {elapsed:.2f} s, longest loop stall {worst * 1000:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="files,huge,warc,io")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    compile_package()
    fetcher = shutil.which("fetcher")
    if not fetcher:
        sys.exit("bench_save: needs fetcher on PATH (activate the virtualenv)")
    subprocess.run([str(SHARED / "server.sh"), "start"], check=True)
    with tempfile.TemporaryDirectory(
        prefix="fetcher-bench-save-", dir=os.environ.get("TMPDIR")
    ) as tmp:
        work = Path(tmp)
        for case in args.cases.split(","):
            if case == "files":
                case_files(args, work, fetcher)
            elif case == "huge":
                case_huge(args, work, fetcher)
            elif case == "warc":
                case_warc(args, work, fetcher)
            elif case == "io":
                case_io(args, work)
            else:
                sys.exit(f"bench_save: unknown case {case!r}")


if __name__ == "__main__":
    main()
