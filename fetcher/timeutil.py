"""Wall-clock timestamps for result lines."""

from __future__ import annotations

import time

#  The last whole second formatted, and its text: one strftime a second, not one per job.
_last: tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """Now as ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T04:37:11.123Z``."""
    global _last
    second, millis = divmod(time.time_ns() // 1_000_000, 1000)
    if _last[0] != second:
        _last = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_last[1]}.{millis:03d}Z"
