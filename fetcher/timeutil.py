"""Wall-clock timestamps for result lines."""

from __future__ import annotations

import time

#  The last whole second formatted, and the last millisecond's whole text: a busy run starts
#  several jobs in the same millisecond, and one strftime a second serves the rest.
_second: tuple[int, str] = (-1, "")
_milli: tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """Now as ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T04:37:11.123Z``."""
    global _second, _milli
    now_ms = time.time_ns() // 1_000_000
    if _milli[0] == now_ms:
        return _milli[1]
    second, millis = divmod(now_ms, 1000)
    if _second[0] != second:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    text = f"{_second[1]}.{millis:03d}Z"
    _milli = (now_ms, text)
    return text
