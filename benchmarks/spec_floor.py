#!/usr/bin/env python3
"""The yardstick with SPEC's result line: what those fields cost on their own.

This is ``../shared/bench/baseline_aiohttp.py`` (the same session, queue and workers, N workers
on a bounded queue) changed in one place only: each result is the line SPEC.md asks of an http
job (``id``, ``kind``, ``ok``, ``attempts``, ``started_at``, ``elapsed_ms``, ``error``, ``url``,
``final_url``, ``method``, ``status``, ``headers`` with lower-cased names, ``content_type``,
``bytes``, ``sha256``, ``redirects``), built the plain way. It has none of fetcher's other
features: no validation, retries, deadlines, limits, resume, statistics or signal handling.

``benchmarks/bench_floor.py`` runs it beside fetcher and the yardstick.

Usage: spec_floor.py JOBS.jsonl OUT.jsonl CONCURRENCY
"""

import asyncio
import hashlib
import sys
import time
from datetime import UTC, datetime

import aiohttp
import orjson
import uvloop


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def main(path: str, out: str, conc: int) -> None:
    q: asyncio.Queue = asyncio.Queue(maxsize=conc * 2)
    conn = aiohttp.TCPConnector(limit=conc, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        with open(out, "wb") as w:  # noqa: ASYNC230 - as in the yardstick

            async def worker() -> None:
                while (job := await q.get()) is not None:
                    started_at = utc_now()
                    t = time.monotonic()
                    url = job["url"]
                    try:
                        async with s.get(url) as r:
                            body = await r.read()
                            headers = {k.lower(): v for k, v in r.headers.items()}
                            ok = r.status < 400
                            rec = {
                                "id": job["id"],
                                "kind": "http",
                                "ok": ok,
                                "attempts": 1,
                                "started_at": started_at,
                                "elapsed_ms": round((time.monotonic() - t) * 1000, 3),
                                "error": None if ok else {"type": "http_status", "message": ""},
                                "url": url,
                                "final_url": str(r.url) if r.history else url,
                                "method": "GET",
                                "status": r.status,
                                "headers": headers,
                                "content_type": headers.get("content-type"),
                                "bytes": len(body),
                                "sha256": hashlib.sha256(body).hexdigest(),
                                "redirects": len(r.history),
                            }
                    except Exception as e:  # noqa: BLE001 - like the yardstick, records every failure
                        rec = {"id": job["id"], "ok": False, "error": repr(e)}
                    w.write(orjson.dumps(rec) + b"\n")

            tasks = [asyncio.create_task(worker()) for _ in range(conc)]
            with open(path, "rb") as f:  # noqa: ASYNC230 - as in the yardstick
                for line in f:
                    await q.put(orjson.loads(line))
            for _ in tasks:
                await q.put(None)
            await asyncio.gather(*tasks)


uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
