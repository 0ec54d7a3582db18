"""Run statistics: counts by outcome, a latency histogram, the summary and progress lines."""

from __future__ import annotations

import asyncio
import bisect
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
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

    def progress_line(
        self, total: int | None = None, *, exact: bool = True, initial: int = 0
    ) -> str:
        """The progress log line; with the number of jobs the input holds when it is known."""
        return progress_text(
            done=initial + self.total,
            total=total,
            ok=self.ok,
            failed=self.failed,
            rate=self.rate(),
            exact=exact,
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


def progress_text(
    *, done: int, total: int | None, ok: int, failed: int, rate: float, exact: bool = True
) -> str:
    """``fetcher: 1151/20000 done (5.8%), 1140 ok, 11 failed, 492 jobs/s, ETA 0:00:38``.

    Without a total (standard input) the line has the counts and the rate only. An estimated
    total (a .gz file's) is shown as ``~N``; one the run has gone past is no limit any more.
    """
    counts = f"{ok} ok, {failed} failed, {rate:.0f} jobs/s"
    if total is None:
        return f"fetcher: {done} done, {counts}"
    total = max(total, done)
    share = 100.0 * done / total if total else 100.0
    mark = "" if exact else "~"
    eta = format_eta((total - done) / rate) if rate > 0 else "--"
    return f"fetcher: {done}/{mark}{total} done ({share:.1f}%), {counts}, ETA {eta}"


def format_eta(seconds: float) -> str:
    """``H:MM:SS``, as curl and wget show the time left."""
    minutes, secs = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


#  How often the bar is redrawn: a timer on the loop, so a result costs no redraw check.
BAR_INTERVAL = 0.2

Total = Callable[[], tuple[int | None, bool]]


class Progress:
    """A tqdm bar on a terminal, or a one-line log every ``interval`` seconds otherwise.

    Both come from their own loop timer, not from results, so that a run waiting on slow jobs
    still says how it is doing, and a result costs no clock read. ``total`` tells the number of
    jobs in the input as far as it is known yet ((None, _) for standard input, (N, False) for
    an estimate); ``initial`` counts jobs done before this run (``--resume``).
    """

    def __init__(
        self,
        stats: Stats,
        *,
        bar: bool,
        log_interval: float | None,
        stream: IO[str] = sys.stderr,
        total: Total | None = None,
        initial: int = 0,
    ) -> None:
        self._stats = stats
        self._stream = stream
        self._total = total
        self._initial = initial
        self._interval: float | None = BAR_INTERVAL if bar else log_interval
        self._bar: Any = None
        self._timer: asyncio.TimerHandle | None = None
        #  Made before its loop ran (fetcher worker): the timer starts at the first result.
        self._unarmed = False
        if bar:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(
                file=stream,
                unit="job",
                dynamic_ncols=True,
                initial=initial,
                total=self._known_total(),
                mininterval=0,
                miniters=1,
            )
        if self._interval is not None:
            try:
                self._arm(asyncio.get_running_loop())
            except RuntimeError:
                self._unarmed = True

    def tick(self) -> None:
        """Called after each result; cheap (the bar and the log line have their own timer)."""
        if self._unarmed:
            self._unarmed = False
            self._arm(asyncio.get_running_loop())

    def line(self) -> str:
        """The log line as it stands now."""
        total, exact = self._total() if self._total is not None else (None, True)
        return self._stats.progress_line(total, exact=exact, initial=self._initial)

    def _known_total(self) -> int | None:
        return self._total()[0] if self._total is not None else None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._interval is not None
        self._timer = loop.call_later(self._interval, self._show, loop)

    def _show(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._bar is not None:
            self._draw()
        else:
            print(self.line(), file=self._stream, flush=True)
        self._arm(loop)

    def _draw(self) -> None:
        bar, stats = self._bar, self._stats
        total = self._known_total()
        if total is not None:
            bar.total = max(total, self._initial + stats.total)
        bar.set_postfix_str(f"{stats.ok} ok, {stats.failed} failed", refresh=False)
        delta = self._initial + stats.total - bar.n
        if delta > 0:
            bar.update(delta)  # draws, and feeds tqdm's smoothed rate
        else:
            bar.refresh()

    def close(self) -> None:
        self._unarmed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._bar is not None:
            self._draw()
            self._bar.close()
            self._bar = None
