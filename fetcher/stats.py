"""Run statistics: counts by outcome, a latency histogram, the summary and progress lines."""

from __future__ import annotations

import asyncio
import bisect
import math
import sys
import time
from collections import Counter
from typing import IO, Any

# Latency buckets grow by 5% from 0.1 ms to ~30 min: percentiles within 5%, in constant memory.
_BOUNDS = [0.1 * 1.05**i for i in range(int(math.log(18_000_000) / math.log(1.05)) + 1)]


class Stats:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.total = 0
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self._hist = [0] * (len(_BOUNDS) + 1)

    def record(self, result: dict[str, Any]) -> None:
        self.total += 1
        error = result["error"]
        if error is None:
            self.ok += 1
        else:
            self.errors[error["type"]] += 1
        if result["attempts"]:
            self._hist[bisect.bisect_left(_BOUNDS, result["elapsed_ms"])] += 1

    def absorb(self, other: Stats) -> None:
        """Add ``other``'s counts to these and empty it (once per written batch, not per job)."""
        if not other.total:
            return
        self.total += other.total
        self.ok += other.ok
        self.errors.update(other.errors)
        hist = self._hist
        for i, n in enumerate(other._hist):
            if n:
                hist[i] += n
        other.total = other.ok = 0
        other.errors.clear()
        other._hist = [0] * len(hist)

    @property
    def failed(self) -> int:
        return self.total - self.ok

    def percentile(self, q: float) -> float | None:
        timed = sum(self._hist)
        if not timed:
            return None
        rank = math.ceil(q * timed)
        seen = 0
        for i, n in enumerate(self._hist):
            seen += n
            if seen >= rank:
                return _BOUNDS[min(i, len(_BOUNDS) - 1)]
        return None  # pragma: no cover

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.total / elapsed if elapsed > 0 else 0.0

    def progress_line(self) -> str:
        return (
            f"fetcher: {self.total} done, {self.ok} ok, {self.failed} failed, "
            f"{self.rate():.0f} jobs/s"
        )

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = [
            f"fetcher: {self.total} jobs in {elapsed:.2f} s ({self.rate():.0f} jobs/s)",
            f"{self.ok} ok, {self.failed} failed",
        ]
        if self.errors:
            by_type = ", ".join(f"{t} {n}" for t, n in sorted(self.errors.items()))
            parts[-1] += f" ({by_type})"
        lat = [self.percentile(q) for q in (0.5, 0.95, 0.99)]
        if lat[0] is not None:
            parts.append(
                "latency p50 {} / p95 {} / p99 {} ms".format(
                    *(f"{v:.1f}" for v in lat if v is not None)
                )
            )
        return parts[0] + ": " + "; ".join(parts[1:])


class Progress:
    """A tqdm bar on a terminal, or a one-line log every ``interval`` seconds otherwise.

    The log line comes from its own loop timer, not from results, so that a run waiting on slow
    jobs still says how it is doing; a result then costs no clock read either.
    """

    def __init__(
        self, stats: Stats, *, bar: bool, log_interval: float | None, stream: IO[str] = sys.stderr
    ) -> None:
        self._stats = stats
        self._stream = stream
        self._interval = log_interval
        self._bar: Any = None
        self._timer: asyncio.TimerHandle | None = None
        #  Made before its loop ran (fetcher worker): the timer starts at the first result.
        self._unarmed = False
        if bar:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(file=stream, unit="job", dynamic_ncols=True, mininterval=0.2)
        elif log_interval is not None:
            try:
                self._arm(asyncio.get_running_loop())
            except RuntimeError:
                self._unarmed = True

    def tick(self) -> None:
        """Called after each result; cheap (the log line has its own timer)."""
        if self._bar is not None:
            self._bar.update(1)
        elif self._unarmed:
            self._unarmed = False
            self._arm(asyncio.get_running_loop())

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._interval is not None
        self._timer = loop.call_later(self._interval, self._log, loop)

    def _log(self, loop: asyncio.AbstractEventLoop) -> None:
        print(self._stats.progress_line(), file=self._stream, flush=True)
        self._arm(loop)

    def close(self) -> None:
        self._unarmed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
