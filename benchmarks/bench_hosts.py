#!/usr/bin/env python3
"""Many hosts: fetcher beside the pinned yardstick, at a low and at the machine's fd limit.

Job files that name thousands of hosts, every name pinned to 127.0.0.1 (fetcher's ``resolve:``
config; the yardstick's copy in ``yardstick_pinned.py`` pins them the same way), job ``i`` going
to host ``i % HOSTS`` so that each host comes back only after all the others:

    case      jobs    hosts   scheme
    one       20000       1   http    (the one-host benchmark)
    5k        20000    5000   http
    20k       20000   20000   http    (every job a new host)
    50k       50000   50000   http
    tls-1k    20000    1000   https   (a trustme CA; nginx with TLS on --tls-port)
    tls-new    5000    5000   https   (every job a new TLS handshake: what one costs)

Each case runs under each fd limit asked for: ``1024`` (soft limit 1024, the default of most
Linux systems, hard limit as it is), ``1024/1024`` (soft = hard = 1024: nothing to raise to) and
``machine`` (as this shell has it). For every (case, limit), fetcher and the yardstick run
alternately for R rounds; the table gives median wall seconds, the median per-round ratio
fetcher/yardstick (lower is better), failed jobs (the most of any round) and peak RSS.

The http server is the shared nginx (``../shared/bench/server.sh start``, port 8088 unless
$PORT); the https one is an nginx this script starts with a trustme certificate for
``*.bench.test``, trusted by both programs through ``SSL_CERT_FILE``.

    python benchmarks/bench_hosts.py [--cases one,5k,20k,50k,tls-1k]
        [--limits 1024,machine] [--rounds 3] [--concurrency 100] [--min-idle N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from _bytecode import compile_package
from _runs import Sample, count_lines, timed

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FETCHER_BENCH_SHARED", ROOT.parent / "shared" / "bench"))
SERVER_SH = SHARED / "server.sh"
YARDSTICK = Path(__file__).resolve().parent / "yardstick_pinned.py"

CASES = {  # name: (jobs, hosts, scheme)
    "one": (20_000, 1, "http"),
    "5k": (20_000, 5_000, "http"),
    "20k": (20_000, 20_000, "http"),
    "50k": (50_000, 50_000, "http"),
    "tls-1k": (20_000, 1_000, "https"),
    "tls-new": (5_000, 5_000, "https"),
}


def limit_setter(limit: str) -> Callable[[], None] | None:
    """A preexec_fn that sets RLIMIT_NOFILE for the child: "1024" (soft), "1024/1024" (both)."""
    if limit == "machine":
        return None
    soft_text, _, hard_text = limit.partition("/")
    soft = int(soft_text)
    hard = int(hard_text) if hard_text else resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def start_tls_nginx(work: Path, port: int) -> Path:
    """nginx serving /small.html over TLS for *.bench.test; returns the CA's PEM file."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("*.bench.test", "bench.test")
    ca_pem, key_pem, chain_pem = work / "ca.pem", work / "key.pem", work / "chain.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    cert.cert_chain_pems[0].write_to_path(str(chain_pem))
    for blob in cert.cert_chain_pems[1:]:
        with open(chain_pem, "ab") as f:
            f.write(blob.bytes())
    www = work / "www"
    www.mkdir()
    (www / "small.html").write_text("<html>" + "x" * 1000 + "</html>\n")
    conf = work / "nginx-tls.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon on;
pid {work}/nginx-tls.pid;
error_log {work}/nginx-tls.log;
worker_rlimit_nofile 40000;
events {{ worker_connections 16000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 60;
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {chain_pem};
    ssl_certificate_key {key_pem};
    root {www};
  }}
}}
"""
    )
    subprocess.run(["nginx", "-c", str(conf), "-e", str(work / "nginx-tls.log")], check=True)
    for _ in range(50):
        probe = subprocess.run(
            [
                "curl",
                "-sf",
                "-o",
                "/dev/null",
                "--cacert",
                str(ca_pem),
                "--resolve",
                f"h0.bench.test:{port}:127.0.0.1",
                f"https://h0.bench.test:{port}/small.html",
            ],
            check=False,
        )
        if probe.returncode == 0:
            return ca_pem
        time.sleep(0.1)
    sys.exit(f"bench_hosts: nginx with TLS did not come up on port {port}")


def write_case(
    work: Path, name: str, port: int, tls_port: int, min_idle: int | None
) -> tuple[Path, Path]:
    """The job file and fetcher's config (the pins) of one case."""
    jobs_n, hosts, scheme = CASES[name]
    target_port = tls_port if scheme == "https" else port
    jobs, config = work / f"{name}.jsonl", work / f"{name}.yaml"
    with open(jobs, "wb") as f:
        for i in range(jobs_n):
            host = f"h{i % hosts}.bench.test"
            url = f"{scheme}://{host}:{target_port}/small.html?i={i}"
            f.write(orjson.dumps({"id": f"j{i}", "url": url}) + b"\n")
    pins = {f"h{h}.bench.test": "127.0.0.1" for h in range(hosts)}
    settings: dict[str, object] = {"resolve": pins}
    if min_idle is not None:
        settings["min_idle_connections"] = min_idle
    config.write_bytes(orjson.dumps(settings))  # JSON is YAML
    return jobs, config


def failures(out: Path) -> tuple[int, int]:
    """(results not ok, results that say "Too many open files")."""
    data = out.read_bytes()
    return data.count(b'"ok":false'), data.count(b"Too many open files")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help="of: " + ", ".join(CASES))
    p.add_argument("--limits", default="1024,machine", help="of: 1024, 1024/1024, machine")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    p.add_argument("--concurrency", type=int, default=100, help="-n of each program (100)")
    p.add_argument("--tls-port", type=int, default=8443, help="port of the TLS nginx (8443)")
    p.add_argument("--skip-yardstick", action="store_true", help="run fetcher only")
    p.add_argument("--min-idle", type=int, help="fetcher's min_idle_connections (default: its own)")
    args = p.parse_args()
    cases = args.cases.split(",")
    limits = args.limits.split(",")
    for name in cases:
        if name not in CASES:
            sys.exit(f"bench_hosts: unknown case {name!r}")
    compile_package()
    fetcher = shutil.which("fetcher")
    if not fetcher or not shutil.which("nginx"):
        sys.exit("bench_hosts: needs fetcher (activate the virtualenv) and nginx on PATH")
    port = int(os.environ.get("PORT", "8088"))
    subprocess.run([str(SERVER_SH), "start"], check=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"machine fd limit: soft {soft}, hard {hard}; -n {args.concurrency}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="fetcher-bench-hosts-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers run as another user
        env = dict(os.environ)
        try:
            if any(CASES[c][2] == "https" for c in cases):
                env["SSL_CERT_FILE"] = str(start_tls_nginx(work, args.tls_port))
            for name in cases:
                jobs, config = write_case(work, name, port, args.tls_port, args.min_idle)
                for limit in limits:
                    rows.append(run_case(args, name, limit, jobs, config, work, env, fetcher))
        finally:
            pid = work / "nginx-tls.pid"
            if pid.exists():
                os.kill(int(pid.read_text()), 15)

    print()
    print(
        f"{'case':<8}{'fd limit':>10}{'fetcher s':>11}{'yardstick s':>13}{'ratio':>7}"
        f"{'failed f/y':>13}{'RSS MB f/y':>14}"
    )
    for row in rows:
        print(row)


def run_case(
    args: argparse.Namespace,
    name: str,
    limit: str,
    jobs: Path,
    config: Path,
    work: Path,
    env: dict[str, str],
    fetcher: str,
) -> str:
    n = str(args.concurrency)
    out, err = work / "out.jsonl", work / "stderr"
    pin = limit_setter(limit)
    commands = {
        "fetcher": [
            fetcher,
            "run",
            str(jobs),
            "-o",
            str(out),
            "-n",
            n,
            "-c",
            str(config),
            "--no-progress",
            "--overwrite",
        ],
        "yardstick": [sys.executable, str(YARDSTICK), str(jobs), str(out), n, "127.0.0.1"],
    }
    if args.skip_yardstick:
        del commands["yardstick"]
    samples: dict[str, list[Sample]] = {who: [] for who in commands}
    failed: dict[str, int] = dict.fromkeys(commands, 0)
    emfile: dict[str, int] = dict.fromkeys(commands, 0)
    warnings = ""
    for r in range(1, args.rounds + 1):
        parts = []
        for who, cmd in commands.items():
            out.unlink(missing_ok=True)
            sample = timed(
                cmd,
                work / "stdout",
                err,
                who=f"bench_hosts {name} {who}",
                ok_codes=(0, 1),
                env=env,
                preexec_fn=pin,
            )
            lines = count_lines(out)
            if lines != CASES[name][0]:
                sys.exit(f"bench_hosts: {who} wrote {lines} lines for {CASES[name][0]} jobs")
            bad, fds = failures(out)
            failed[who] = max(failed[who], bad)
            emfile[who] = max(emfile[who], fds)
            samples[who].append(sample)
            if who == "fetcher":
                warnings = " ".join(
                    line for line in err.read_text().splitlines() if "open-file limit" in line
                )
            parts.append(f"{who} {sample.wall:6.2f}s {sample.rss_kb / 1024:6.1f}MB failed {bad}")
        print(f"{name} @ {limit} round {r}: " + " | ".join(parts), flush=True)
    if warnings:
        print(f"  fetcher said: {warnings}")
    if emfile["fetcher"] or emfile.get("yardstick"):
        print(f"  'Too many open files' lines: {emfile}")
    f = samples["fetcher"]
    y = samples.get("yardstick")
    f_wall = statistics.median(s.wall for s in f)
    f_rss = max(s.rss_kb for s in f) / 1024
    if not y:
        fails = str(failed["fetcher"])
        return f"{name:<8}{limit:>10}{f_wall:>11.2f}{'-':>13}{'-':>7}{fails:>13}{f_rss:>14.1f}"
    ratio = statistics.median(a.wall / b.wall for a, b in zip(f, y, strict=True))
    y_wall = statistics.median(s.wall for s in y)
    y_rss = max(s.rss_kb for s in y) / 1024
    fails = f"{failed['fetcher']}/{failed['yardstick']}"
    rss = f"{f_rss:.0f}/{y_rss:.0f}"
    return f"{name:<8}{limit:>10}{f_wall:>11.2f}{y_wall:>13.2f}{ratio:>7.2f}{fails:>13}{rss:>14}"


if __name__ == "__main__":
    main()
