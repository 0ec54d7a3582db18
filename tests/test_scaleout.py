"""enqueue / worker / collect against a real redis-server, with workers as `fetcher` processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from .helpers import FETCHER
from .redis_peer import HttpPeer, RedisPeer, http_peer, redis_peer

CONFIG = """\
backoff_base: 0.01
backoff_max: 0.05
shutdown_grace: 5
progress_interval: 3600
"""


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisPeer]:
    with redis_peer(tmp_path) as peer:
        yield peer


@pytest.fixture(scope="module")
def web() -> Iterator[HttpPeer]:
    with http_peer() as peer:
        yield peer


class Procs:
    """Worker processes of one test, each logging to its own file; all killed at the end."""

    def __init__(self, tmp: Path, rds: RedisPeer) -> None:
        self.tmp = tmp
        self.rds = rds
        self.config = tmp / "config.yaml"
        self.config.write_text(CONFIG)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def worker(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        cmd = [
            *FETCHER, "worker", "--redis", self.rds.url, "--consumer", name,
            "-c", str(self.config), *args,
        ]  # fmt: skip
        with open(self.tmp / f"{name}.err", "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.err").read_text()

    def wait(self, name: str, timeout: float = 45) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {name} still running; its log:\n{self.log(name)}")

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(tmp_path: Path, rds: RedisPeer) -> Iterator[Procs]:
    p = Procs(tmp_path, rds)
    try:
        yield p
    finally:
        p.kill_all()


def fetcher(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FETCHER, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def enqueue(rds: RedisPeer, jobs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return fetcher("enqueue", str(jobs), "--redis", rds.url, *args)


def collect(rds: RedisPeer, out: Path, *args: str) -> list[dict[str, Any]]:
    res = fetcher("collect", "--redis", rds.url, "-o", str(out), *args)
    assert res.returncode == 0, res.stderr
    return read_jsonl(out)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def results_in_redis(rds: RedisPeer) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"result"]) for _, f in rds.client().xrange("fetcher:results")]


def wait_for(cond: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def pending_of(rds: RedisPeer, consumer: str) -> int:
    try:
        consumers = rds.client().xinfo_consumers("fetcher:jobs", "fetcher")
    except redis.exceptions.ResponseError:  # no group yet
        return 0
    for c in consumers:
        if c["name"].decode() == consumer:
            return int(c["pending"])
    return 0


def content(result: dict[str, Any]) -> dict[str, Any]:
    """A result without what differs from one run to the next (timings, the Date header)."""
    r = {k: v for k, v in result.items() if k not in ("started_at", "elapsed_ms")}
    if isinstance(r.get("headers"), dict):
        r["headers"] = {k: v for k, v in r["headers"].items() if k != "date"}
    return r


def by_id(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {r["id"]: r for r in results}


def assert_clean(log: str) -> None:
    assert "Traceback" not in log, log


# -- enqueue ---------------------------------------------------------------------------------


def test_enqueue_validates_and_stores_jobs_unexpanded(tmp_path: Path, rds: RedisPeer) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"id": "a", "url": "http://127.0.0.1:9/a"}\n'
        '{"url": "http://127.0.0.1:9/no-id"}\n'
        '{"id": "bad-url", "url": "ftp://x/"}\n'
        "not json\n"
        '{"id": "a", "url": "http://127.0.0.1:9/again"}\n'
        '{"id": "secret", "url": "http://127.0.0.1:9/s", '
        '"headers": {"Authorization": "Bearer ${SCALEOUT_TOKEN}"}}\n'
    )
    env_before = os.environ.get("SCALEOUT_TOKEN")
    os.environ["SCALEOUT_TOKEN"] = "s3cret"
    try:
        res = enqueue(rds, jobs)
    finally:
        if env_before is None:
            del os.environ["SCALEOUT_TOKEN"]
    assert res.returncode == 1, res.stderr
    assert f"{jobs}:3: invalid_url" in res.stderr
    assert f"{jobs}:4: invalid_job: not valid JSON" in res.stderr
    assert f"{jobs}:5: invalid_job: id 'a' repeats" in res.stderr
    assert "3 jobs added to fetcher:jobs, 3 invalid" in res.stderr
    entries = rds.client().xrange("fetcher:jobs")
    stored = [(orjson.loads(f[b"job"]), int(f[b"line"])) for _, f in entries]
    assert [(j["id"], line) for j, line in stored] == [("a", 1), ("2", 2), ("secret", 6)]
    # The secret is read by each worker from its own environment, never stored in Redis.
    assert stored[2][0]["headers"]["Authorization"] == "Bearer ${SCALEOUT_TOKEN}"
    assert b"s3cret" not in b"".join(f[b"job"] for _, f in entries)


def test_enqueue_yaml_merges_defaults(tmp_path: Path, rds: RedisPeer) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "defaults: {headers: {X-A: a}, timeout: 5}\n"
        "jobs:\n"
        "  - {id: y1, url: 'http://127.0.0.1:9/1', headers: {X-B: b}}\n"
        "  - {url: 'http://127.0.0.1:9/2'}\n"
    )
    res = enqueue(rds, jobs, "--stream", "other")
    assert res.returncode == 0, res.stderr
    stored = [orjson.loads(f[b"job"]) for _, f in rds.client().xrange("other")]
    assert stored[0] == {
        "id": "y1",
        "url": "http://127.0.0.1:9/1",
        "headers": {"X-A": "a", "X-B": "b"},
        "timeout": 5,
    }
    assert stored[1]["id"] == "2"


def test_enqueue_without_redis_fails_cleanly(tmp_path: Path) -> None:
    from .redis_peer import free_port

    jobs = write_jobs(tmp_path / "j.jsonl", [{"id": "a", "url": "http://127.0.0.1:9/"}])
    res = fetcher("enqueue", str(jobs), "--redis", f"redis://:pw@127.0.0.1:{free_port()}/0")
    assert res.returncode == 3
    assert "redis" in res.stderr and "Traceback" not in res.stderr
    assert ":pw@" not in res.stderr


# -- workers ---------------------------------------------------------------------------------


def mixed_jobs(web: HttpPeer, n: int) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = [{"id": f"ok-{i}", "url": f"{web.url}/ok/{i}"} for i in range(n)]
    jobs += [
        {"id": "nf", "url": f"{web.url}/status/404"},
        {"id": "err", "url": f"{web.url}/status/503", "retries": 1},
        {"id": "body", "url": f"{web.url}/ok/b", "body": "text", "meta": {"row": 7}},
        {"url": f"{web.url}/ok/no-id"},
        {"id": "refused", "url": "http://127.0.0.1:9/", "retries": 0},
    ]
    return jobs


def test_three_workers_match_run(tmp_path: Path, rds: RedisPeer, web: HttpPeer, procs: Procs):
    jobs = write_jobs(tmp_path / "jobs.jsonl", mixed_jobs(web, 40))
    assert enqueue(rds, jobs).returncode == 0
    for i in range(3):
        procs.worker(f"w{i}", "--drain", "-n", "4", "--claim-idle", "5")
    for i in range(3):
        assert procs.wait(f"w{i}") == 0, procs.log(f"w{i}")
        assert_clean(procs.log(f"w{i}"))
    collected = by_id(collect(rds, tmp_path / "out.jsonl"))

    run = fetcher("run", str(jobs), "-o", str(tmp_path / "run.jsonl"), "-c", str(procs.config))
    assert run.returncode == 1, run.stderr  # some jobs fail, by design
    expected = by_id(read_jsonl(tmp_path / "run.jsonl"))
    assert set(collected) == set(expected)
    assert {k: content(v) for k, v in collected.items()} == {
        k: content(v) for k, v in expected.items()
    }
    assert collected["err"]["attempts"] == 2
    assert rds.client().xpending("fetcher:jobs", "fetcher")["pending"] == 0


def test_kill9_worker_others_claim_its_jobs(
    tmp_path: Path, rds: RedisPeer, web: HttpPeer, procs: Procs
) -> None:
    n = 40
    # Staggered delays, so the victim never finishes all it holds at the same moment.
    jobs = [{"id": f"s{i}", "url": f"{web.url}/slow/{200 + 37 * i % 150}"} for i in range(n)]
    assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
    procs.worker("victim", "-n", "4", "--claim-idle", "1")
    wait_for(lambda: pending_of(rds, "victim") == 4, what="the victim to hold jobs")
    for i in range(2):
        procs.worker(f"w{i}", "--drain", "-n", "4", "--claim-idle", "1")
    wait_for(
        lambda: rds.client().xlen("fetcher:results") >= 4 and pending_of(rds, "victim") > 0,
        what="first results",
    )
    procs.procs["victim"].send_signal(signal.SIGKILL)
    procs.wait("victim")
    assert pending_of(rds, "victim") > 0  # what it held is left pending
    for i in range(2):
        assert procs.wait(f"w{i}") == 0, procs.log(f"w{i}")
    assert "claimed" in procs.log("w0") + procs.log("w1")
    collected = collect(rds, tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in collected) == sorted(j["id"] for j in jobs)
    assert all(r["ok"] for r in collected)
    assert rds.client().xpending("fetcher:jobs", "fetcher")["pending"] == 0


def test_job_that_kills_its_worker_is_abandoned(
    tmp_path: Path, rds: RedisPeer, web: HttpPeer, procs: Procs
) -> None:
    jobs = [
        {"id": "fine", "url": f"{web.url}/ok/fine"},
        {"id": "deadly", "url": f"{web.url}/hang/deadly", "meta": 1},
    ]
    assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
    args = ("--claim-idle", "0.5", "--max-deliveries", "2")
    for attempt in (1, 2):
        procs.worker(f"w{attempt}", *args)
        wait_for(lambda a=attempt: web.hits["/hang/deadly"] == a, what=f"delivery {attempt}")
        # "fine" must be stored before the kill: killed twice with it, it would be abandoned too.
        wait_for(lambda: len(results_in_redis(rds)) == 1, what="the result of fine")
        procs.procs[f"w{attempt}"].send_signal(signal.SIGKILL)  # the job "crashes" its worker
        procs.wait(f"w{attempt}")
    procs.worker("last", *args, "--drain")
    assert procs.wait("last") == 0, procs.log("last")
    assert "job deadly abandoned after 2 deliveries" in procs.log("last")
    assert web.hits["/hang/deadly"] == 2  # run at most max-deliveries times
    collected = by_id(collect(rds, tmp_path / "out.jsonl"))
    assert collected["fine"]["ok"] is True, collected["fine"]
    dead = collected["deadly"]
    assert dead["error"]["type"] == "abandoned"
    assert (dead["ok"], dead["kind"], dead["attempts"], dead["line"]) == (False, "http", 2, 2)
    assert dead["url"] == f"{web.url}/hang/deadly"
    dead_letters = rds.client().xrange("fetcher:jobs:dead")
    assert [orjson.loads(f[b"job"])["id"] for _, f in dead_letters] == ["deadly"]
    assert rds.client().xpending("fetcher:jobs", "fetcher")["pending"] == 0


def test_sigterm_leaves_nothing_half_done(
    tmp_path: Path, rds: RedisPeer, web: HttpPeer, procs: Procs
) -> None:
    n = 30
    jobs = [{"id": f"t{i}", "url": f"{web.url}/slow/300?i={i}"} for i in range(n)]
    assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
    local = tmp_path / "local.jsonl"
    worker = procs.worker("w", "-n", "5", "-o", str(local), "--claim-idle", "0.5")
    wait_for(lambda: rds.client().xlen("fetcher:results") >= 5, what="first results")
    worker.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert procs.wait("w") == 0, procs.log("w")
    assert time.monotonic() - t0 < 5
    assert_clean(procs.log("w"))
    written = read_jsonl(local)  # whole lines only, or this raises
    stored = results_in_redis(rds)
    # Everything the worker finished is stored, acknowledged, and nothing else is.
    assert sorted(r["id"] for r in written) == sorted(r["id"] for r in stored)
    pending = rds.client().xpending("fetcher:jobs", "fetcher")["pending"]
    info = rds.client().xinfo_groups("fetcher:jobs")[0]
    assert len(stored) + pending + int(info["lag"]) == n
    # Another worker finishes the rest, claiming what the first one left pending.
    procs.worker("w2", "--drain", "-n", "5", "--claim-idle", "0.5")
    assert procs.wait("w2") == 0, procs.log("w2")
    collected = collect(rds, tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in collected) == sorted(j["id"] for j in jobs)


def test_workers_ride_out_a_redis_restart(
    tmp_path: Path, rds: RedisPeer, web: HttpPeer, procs: Procs
) -> None:
    n = 60
    jobs = [{"id": f"r{i}", "url": f"{web.url}/slow/200?i={i}"} for i in range(n)]
    assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
    for i in range(2):
        procs.worker(f"w{i}", "--drain", "-n", "3", "--claim-idle", "10")
    wait_for(lambda: rds.client().xlen("fetcher:results") >= 6, what="first results")
    rds.restart(down_for=1.0)
    for i in range(2):
        assert procs.wait(f"w{i}") == 0, procs.log(f"w{i}")
    logs = procs.log("w0") + procs.log("w1")
    assert "redis unavailable" in logs and "redis reachable again" in logs
    assert_clean(logs)
    collected = collect(rds, tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in collected) == sorted(j["id"] for j in jobs)


def test_worker_holds_no_more_than_it_can_run(
    tmp_path: Path, rds: RedisPeer, web: HttpPeer, procs: Procs
) -> None:
    jobs = [{"id": f"b{i}", "url": f"{web.url}/slow/200?i={i}"} for i in range(30)]
    assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
    worker = procs.worker("w", "-n", "3")
    wait_for(lambda: pending_of(rds, "w") > 0, what="the worker to read")
    most = 0
    for _ in range(30):
        most = max(most, pending_of(rds, "w"))
        time.sleep(0.03)
    assert 0 < most <= 3
    worker.send_signal(signal.SIGTERM)
    assert procs.wait("w") == 0


def test_result_and_ack_go_in_one_transaction(
    tmp_path: Path, rds: RedisPeer, web: HttpPeer, procs: Procs
) -> None:
    """Each XACK of finished jobs sits in a MULTI/EXEC after the XADDs of their results.

    MONITOR shows what Redis ran, connection by connection: a pipeline without a transaction
    sends the same XADDs and XACK, but no MULTI and no EXEC around them.
    """
    jobs = [{"id": f"m{i}", "url": f"{web.url}/ok/m{i}"} for i in range(8)]
    assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
    with rds.client().monitor() as monitor:
        procs.worker("w", "--drain", "-n", "3")
        assert procs.wait("w") == 0, procs.log("w")
        rds.client().echo("monitor-end")
        seen: dict[str, list[str]] = {}  # client port -> the commands it sent, in order
        for cmd in monitor.listen():
            if cmd["command"] == "ECHO monitor-end":
                break
            seen.setdefault(cmd["client_port"], []).append(cmd["command"])
    blocks: list[list[str]] = []
    for commands in seen.values():
        for i, command in enumerate(commands):
            if not command.startswith("XACK fetcher:jobs "):
                continue
            start = i
            while start > 0 and commands[start - 1].startswith("XADD fetcher:results "):
                start -= 1
            assert start > 0 and commands[start - 1] == "MULTI", commands[max(0, start - 3) : i + 1]
            assert commands[i + 1 : i + 2] == ["EXEC"], commands[i : i + 3]
            assert len(command.split()) - 3 == i - start, command  # one entry per result
            blocks.append(commands[start:i])
    assert blocks, f"no XACK seen: {seen}"
    adds = [add for block in blocks for add in block]
    assert len(adds) == len(jobs)  # every result stored, each with the ack of its entry
    for job in jobs:
        assert sum(f'"id":"{job["id"]}"' in add for add in adds) == 1, job["id"]
    assert rds.client().xpending("fetcher:jobs", "fetcher")["pending"] == 0


# -- collect ---------------------------------------------------------------------------------


def add_result(rds: RedisPeer, job_id: str, **extra: Any) -> None:
    result = {"id": job_id, "kind": "http", "ok": True, "attempts": 1, "error": None, **extra}
    rds.client().xadd("fetcher:results", {"result": orjson.dumps(result)})


def test_collect_writes_each_id_once_and_appends(tmp_path: Path, rds: RedisPeer) -> None:
    for job_id in ("a", "b", "a", "c", "b"):
        add_result(rds, job_id)
    rds.client().xadd("fetcher:results", {"result": b"not json"})
    out = tmp_path / "out.jsonl"
    assert [r["id"] for r in collect(rds, out)] == ["a", "b", "c"]
    add_result(rds, "d")
    assert [r["id"] for r in collect(rds, out)] == ["a", "b", "c", "d"]  # only d was added
    assert rds.client().xlen("fetcher:results") == 7  # nothing removed unless asked
    res = fetcher("collect", "--redis", rds.url, "-o", "-", "--trim")
    assert [orjson.loads(x)["id"] for x in res.stdout.splitlines()] == ["a", "b", "c", "d"]
    assert rds.client().xlen("fetcher:results") == 0


def test_collect_follow_until_sigterm(tmp_path: Path, rds: RedisPeer) -> None:
    add_result(rds, "first")
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [*FETCHER, "collect", "--redis", rds.url, "-o", str(out), "--follow"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 0, what="the first line")
        add_result(rds, "second")
        add_result(rds, "first")
        wait_for(lambda: len(out.read_bytes().splitlines()) == 2, what="the second line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert [r["id"] for r in read_jsonl(out)] == ["first", "second"]


def test_workers_save_bodies_and_append_to_their_warc(
    tmp_path: Path, rds: RedisPeer, web: HttpPeer, procs: Procs
) -> None:
    from warcio.archiveiterator import ArchiveIterator

    save = tmp_path / "files"
    jobs = [{"id": f"s{i}", "url": f"{web.url}/ok/n{i % 5}"} for i in range(20)]
    assert enqueue(rds, write_jobs(tmp_path / "jobs.jsonl", jobs)).returncode == 0
    for name in ("a", "b"):  # two workers, one DIR; each its own WARC, a restart appends
        args = (
            "--drain",
            "-n",
            "4",
            "--save",
            str(save),
            "--warc",
            str(tmp_path / f"{name}.warc.gz"),
        )
        procs.worker(name, *args)
    for name in ("a", "b"):
        assert procs.wait(name) == 0, procs.log(name)
    results = by_id(collect(rds, tmp_path / "out.jsonl"))
    assert len(results) == 20
    for r in results.values():
        assert r["ok"], r
        assert hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest() == r["sha256"]
    assert len({r["path"] for r in results.values()}) == 5  # five bodies, each written once
    assert not list((save / ".fetcher-partial").iterdir())

    more = [{"id": "late", "url": f"{web.url}/ok/late"}]
    assert enqueue(rds, write_jobs(tmp_path / "more.jsonl", more)).returncode == 0
    procs.worker("a2", "--drain", "--warc", str(tmp_path / "a.warc.gz"))
    assert procs.wait("a2") == 0, procs.log("a2")
    warcs = [tmp_path / "a.warc.gz", tmp_path / "b.warc.gz"]
    uris = []
    for path in warcs:
        with open(path, "rb") as f:
            uris += [r.rec_headers.get_header("WARC-Target-URI") for r in ArchiveIterator(f)]
    assert uris.count(f"{web.url}/ok/late") == 2  # request and response, appended
