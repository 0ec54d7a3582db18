"""``--shard K/N`` (or ``N``, K from ``$JOB_COMPLETION_INDEX``): a leaf, read by the config's
check of a ``shard`` key and by the command line alike."""

from __future__ import annotations


def parse_shard(text: str) -> tuple[int | None, int]:
    """``K/N`` as (K, N), or ``N`` as (None, N): K then comes from $JOB_COMPLETION_INDEX.

    Raises ValueError saying what is expected.
    """
    k, sep, n = text.rpartition("/")
    if not sep:
        k, n = "", text
    try:
        count = int(n)
        index = int(k) if k else None
    except ValueError:
        raise ValueError("expected K/N, e.g. 0/4") from None
    if count < 1 or (index is not None and not 0 <= index < count):
        raise ValueError("expected 0 <= K < N")
    return index, count
