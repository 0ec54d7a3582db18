"""How many requests the job file still has for each host: the idle pool's look-ahead.

An idle keep-alive connection is worth keeping only if another request will go to its host, and
a job file says which hosts that is before the run gets there. Without it the idle pool can only
learn from its mistakes (connector.py): over 5,000 hosts that each come back, the first pass
closes nearly every connection before it learns that they would have served again.

``HostForecast`` is filled by the thread that counts a job file's jobs for the progress total
(inputs.JobCount), from the same blocks and with one more regex over them: the host of every
``"url"`` of a JSONL file, of every line of a URL list. The HTTP handler tells it each job it
starts (``arrive``: once per attempt, not per redirect hop) and the connector asks, as a
connection goes idle, whether its host has jobs still to come (``ahead``).

It is a table of slots indexed by the host name's hash, each two 16-bit counters and a 16-bit
fingerprint of the host (another part of the hash), sized to the job file (one slot per 4
bytes of it, about fifteen for each job) between 2**14 and 2**19 slots: at most 3 MiB whatever
the number of hosts. A slot that a second host lands in is given up (both hosts unknown,
below): counted as one, the first host would look unfinished until the second one is, and its
connection kept for nothing. A counter that reaches 65,535 stays there (such a host is never
taken as finished). A host the file does not name as written (a redirect's target, a name in
Unicode that the connection knows in its IDNA form) is not known either, and the pool treats
its connections as it would without a forecast.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Iterable

MIN_SLOTS, MAX_SLOTS = 1 << 14, 1 << 19
_STUCK = 0xFFFF
_SHARED = 0xFFFF  # the fingerprint of a slot two hosts landed in (0: a slot still free)

#  The authority of each job's URL: a JSONL line's "url" string, a URL list's line.
URL_AUTHORITY = {
    "jsonl": re.compile(rb'"url"\s*:\s*"[A-Za-z][A-Za-z0-9+.\-]*://([^"/?#\\\s]*)'),
    "urls": re.compile(rb"^[ \t]*[A-Za-z][A-Za-z0-9+.\-]*://([^/?#\s]*)", re.M),
}


def host_of(authority: bytes) -> str | None:
    """The host as aiohttp keys its connections (lower case, an IPv6 address without brackets),
    or None when it is not plain ASCII."""
    host = authority.rpartition(b"@")[2]
    host = host[1 : host.find(b"]")] if host.startswith(b"[") else host.partition(b":")[0]
    try:
        return host.decode("ascii").lower()
    except UnicodeDecodeError:
        return None


class HostForecast:
    """Per host, the jobs the job file names minus those started."""

    def __init__(self, file_size: int = 4 * MAX_SLOTS) -> None:
        slots = min(MAX_SLOTS, max(MIN_SLOTS, 1 << (file_size // 4).bit_length()))
        self.mask = slots - 1
        self._named = array("H", bytes(2 * slots))
        self._asked = array("H", bytes(2 * slots))
        self._owner = array("H", bytes(2 * slots))
        #  Set once every line of the file is counted: only then can a host be finished.
        self.complete = False

    def add(self, authorities: Iterable[bytes]) -> None:
        """Count one request to each authority's host (from the counting thread)."""
        named, owner = self._named, self._owner
        # Tallied in C first: a block of lines to a few hosts costs a few steps, not one a line
        # (the thread shares the interpreter with the loop).
        for authority, times in Counter(authorities).items():
            host = host_of(authority)
            if host is None:
                continue
            slot, print_ = self._place(host)
            if owner[slot] != print_:
                if owner[slot]:
                    owner[slot] = _SHARED
                    continue
                owner[slot] = print_
            named[slot] = min(_STUCK, named[slot] + times)

    #  arrive() and ahead() run once a job on the loop: _place() is written out in each.

    def arrive(self, host: str) -> None:
        """A job to ``host`` (as aiohttp keys its connections: ``URL.raw_host``) starts."""
        h = hash(host)
        slot = h & self.mask
        if self._owner[slot] == (h >> 20) % 0xFFFE + 1 and self._asked[slot] != _STUCK:
            self._asked[slot] += 1

    def ahead(self, host: str) -> bool | None:
        """Whether requests to ``host`` are still to come: None when the forecast cannot say."""
        h = hash(host)
        slot = h & self.mask
        if self._owner[slot] != (h >> 20) % 0xFFFE + 1:
            return None  # not in the file (as written), or sharing its slot
        named = self._named[slot]
        if named == _STUCK or named > self._asked[slot]:
            return True
        return False if self.complete else None

    def _place(self, host: str) -> tuple[int, int]:
        """The slot of ``host`` and its fingerprint (1 to 65,534), from one hash."""
        h = hash(host)
        return h & self.mask, (h >> 20) % 0xFFFE + 1
