"""Mail throughput: fetcher's pooled MailHandler vs one aiosmtplib connection per message.

Both send the same messages to one local aiosmtpd sink (127.0.0.1, port 0, in its own process,
as a real mail server would be), with the same number of messages in flight at once, in one
run, on uvloop as ``fetcher run`` uses::

    python benchmarks/bench_mail.py [-n 2000] [--pool-size 8]

The plain script is what a notification sender without pooling does: ``aiosmtplib.send()`` per
message, so every message pays TCP setup, the greeting, EHLO and QUIT.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import uvloop
from aiosmtpd.controller import Controller

from fetcher.config import Settings
from fetcher.jobs import JobParser
from fetcher.mail import MailHandler
from fetcher.pool import Pool, RetryPolicy


class Sink:
    """Accepts everything; counts messages and sessions in shared memory for the parent."""

    def __init__(self, messages: Any, connections: Any) -> None:
        self.messages = messages
        self.connections = connections

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.connections.value += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.value += 1
        return "250 OK"


class SinkController(Controller):
    def __init__(self, handler: Sink) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(512)
        super().__init__(
            handler,
            hostname="127.0.0.1",
            port=self._sock.getsockname()[1],
            server_hostname="localhost",
        )

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)


def job(i: int) -> dict[str, Any]:
    return {
        "id": str(i),
        "kind": "mail",
        "from": "noreply@example.com",
        "to": [f"user{i}@example.org"],
        "subject": f"Notification {i}",
        "text": "Your report is ready.\n" * 20,
    }


async def run_fetcher(port: int, n: int, pool_size: int) -> tuple[float, int]:
    profile = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "pool_size": pool_size,
        "max_messages_per_connection": 1000,
    }
    settings = Settings(smtp={"default": profile}, concurrency=pool_size * 4)
    parser = JobParser()
    failed = 0

    async def jobs() -> AsyncIterator[Any]:
        for i in range(n):
            yield parser.parse(job(i), i + 1)

    def emit(result: dict[str, Any]) -> None:
        nonlocal failed
        failed += not result["ok"]

    t0 = time.perf_counter()
    async with MailHandler(settings) as handler:
        pool = Pool(
            handlers={"mail": handler},
            emit=emit,
            concurrency=settings.concurrency,
            policy=RetryPolicy(retries=0),
        )
        await pool.run(jobs())
    return time.perf_counter() - t0, failed


async def run_plain(port: int, n: int, in_flight: int) -> tuple[float, int]:
    sem = asyncio.Semaphore(in_flight)
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        spec = job(i)
        msg = EmailMessage()
        msg["From"] = spec["from"]
        msg["To"] = spec["to"][0]
        msg["Subject"] = spec["subject"]
        msg.set_content(spec["text"])
        async with sem:
            try:
                await aiosmtplib.send(
                    msg,
                    hostname="127.0.0.1",
                    port=port,
                    start_tls=False,
                    local_hostname="localhost",
                )
            except aiosmtplib.SMTPException:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0, failed


def serve(messages: Any, connections: Any, ports: Any, stop: Any) -> None:
    controller = SinkController(Sink(messages, connections))
    controller.start()
    ports.put(controller.port)
    stop.wait()
    controller.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="messages per contender")
    ap.add_argument("--pool-size", type=int, default=8, help="connections / messages in flight")
    args = ap.parse_args()

    ctx = multiprocessing.get_context("spawn")
    messages, connections = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
    ports: Any = ctx.Queue()
    stop = ctx.Event()
    server = ctx.Process(target=serve, args=(messages, connections, ports, stop), daemon=True)
    server.start()
    try:
        port = await asyncio.to_thread(ports.get, True, 30)
        # Warm up imports, code paths and the sink.
        await run_fetcher(port, 20, args.pool_size)
        await run_plain(port, 20, args.pool_size)
        messages.value = connections.value = 0

        t_fetcher, f_fail = await run_fetcher(port, args.n, args.pool_size)
        c_fetcher = connections.value
        connections.value = 0
        t_plain, p_fail = await run_plain(port, args.n, args.pool_size)
        c_plain = connections.value
    finally:
        stop.set()
        server.join(10)

    print(f"messages: {args.n} each, {args.pool_size} in flight, local aiosmtpd sink")
    print(
        f"fetcher (pooled):          {t_fetcher:7.2f} s  {args.n / t_fetcher:8.0f} msg/s  "
        f"{c_fetcher} connections, {f_fail} failed"
    )
    print(
        f"plain (conn per message):  {t_plain:7.2f} s  {args.n / t_plain:8.0f} msg/s  "
        f"{c_plain} connections, {p_fail} failed"
    )
    print(f"ratio: fetcher is {t_plain / t_fetcher:.1f}x faster")
    print(f"sink received {messages.value} messages in total")


if __name__ == "__main__":
    uvloop.run(main())
