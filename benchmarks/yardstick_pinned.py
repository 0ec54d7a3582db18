#!/usr/bin/env python3
"""The yardstick (``../shared/bench/baseline_aiohttp.py``) with one change: host names are pinned.

Every name resolves to the address in PIN (as fetcher's ``resolve:`` config does), so a job file
that names thousands of hosts can run against one local server. An https URL is verified against
the system's trust store, which ``SSL_CERT_FILE`` can point at a test CA. Nothing else differs
from the yardstick: same queue, workers, connector limit, DNS cache and result line.

Usage: yardstick_pinned.py JOBS.jsonl OUT.jsonl CONCURRENCY PIN
"""

import asyncio
import socket
import sys
import time

import aiohttp
import orjson
import uvloop
from aiohttp.abc import AbstractResolver, ResolveResult


class Pinned(AbstractResolver):
    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host, port=0, family=socket.AF_INET):  # type: ignore[no-untyped-def]
        return [
            ResolveResult(
                hostname=host,
                host=self.address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


async def main(path: str, out: str, conc: int, pin: str) -> None:
    q: asyncio.Queue = asyncio.Queue(maxsize=conc * 2)
    conn = aiohttp.TCPConnector(limit=conc, ttl_dns_cache=300, resolver=Pinned(pin))
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        with open(out, "wb") as w:  # noqa: ASYNC230 - as the yardstick does

            async def worker() -> None:
                while (job := await q.get()) is not None:
                    t = time.perf_counter()
                    try:
                        async with s.get(job["url"]) as r:
                            body = await r.read()
                            rec = {
                                "id": job["id"],
                                "ok": r.status < 400,
                                "status": r.status,
                                "bytes": len(body),
                                "elapsed_ms": (time.perf_counter() - t) * 1000,
                            }
                    except Exception as e:  # noqa: BLE001 - the yardstick records every failure
                        rec = {"id": job["id"], "ok": False, "error": repr(e)}
                    w.write(orjson.dumps(rec) + b"\n")

            tasks = [asyncio.create_task(worker()) for _ in range(conc)]
            with open(path, "rb") as f:  # noqa: ASYNC230
                for line in f:
                    await q.put(orjson.loads(line))
            for _ in tasks:
                await q.put(None)
            await asyncio.gather(*tasks)


uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
