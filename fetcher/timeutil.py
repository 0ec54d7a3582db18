"""Wall-clock timestamps for result lines."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now_iso() -> str:
    """Now as ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T04:37:11.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
