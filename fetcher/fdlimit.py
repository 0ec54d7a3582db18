"""Fitting a run into the process's open-file limit.

Most Linux systems start a process with a soft ``RLIMIT_NOFILE`` of 1024 and a hard limit far
above it (containers often 1048576). Like nginx's ``worker_rlimit_nofile`` and the Go runtime,
fetcher raises the soft limit to the hard one at start: no privilege is needed for that.

A run then opens at most ``concurrency`` sockets in use plus ``max_idle_connections`` idle ones
(connector.py), the SMTP pools' connections, and a few files and loop internals (``RESERVE``).
When even the raised limit cannot hold that, the concurrency (and the idle pool with it, in the
same proportion) is lowered to what fits, with one warning line, rather than letting jobs fail
with "Too many open files".
"""

from __future__ import annotations

import logging
import resource

from .config import Settings

log = logging.getLogger("fetcher")

#  Descriptors a run holds besides its HTTP and SMTP sockets: stdio, the job file and the
#  output, the event loop's epoll and wake-up fds, the metrics listener and its clients, Redis
#  connections (worker), resolver threads' sockets, with room to spare.
RESERVE = 64


def raise_soft_limit() -> int:
    """Raise the soft open-file limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):  # a hard limit the kernel will not grant (nr_open): keep soft
        return soft
    return target


#  The most idle keep-alive connections kept by default (connector.py adapts the number in use
#  up to it): about 8 KB each over plain http, about 25 KB over TLS.
DEFAULT_MAX_IDLE = 8192


def idle_bounds(settings: Settings) -> tuple[int, int]:
    """(fewest, most) idle connections the connector keeps over all hosts.

    The fewest is ``min_idle_connections``, by default the concurrency: what one busy host needs
    to keep every connection warm. The most is ``max_idle_connections`` (``DEFAULT_MAX_IDLE``
    when unset); the fewest never passes it.
    """
    most = settings.max_idle_connections
    if most is None:
        most = DEFAULT_MAX_IDLE
    fewest = settings.min_idle_connections
    if fewest is None:
        fewest = settings.concurrency
    return min(fewest, most), most


def fit_open_files(settings: Settings, limit: int | None = None) -> Settings:
    """``settings`` with a concurrency and an idle pool that fit the open-file limit.

    Raises the soft limit first (unless ``limit`` is given, for tests). When the concurrency
    and its idle connections cannot both fit, both are lowered in proportion, with one
    warning; the most idle connections are cut to what room is left, silently.
    """
    if limit is None:
        limit = raise_soft_limit()
    smtp = sum(profile.pool_size for profile in settings.smtp.values())
    room = max(2, limit - RESERVE - smtp)
    concurrency = settings.concurrency
    _, most = idle_bounds(settings)
    # What must fit is -n in use plus -n idle (one busy host kept warm); a larger
    # min_idle_connections is a wish the room left may cut, never a reason to lower -n.
    fewest = min(concurrency, most)
    if concurrency + fewest > room:
        fitted = max(1, room * concurrency // (concurrency + fewest))
        log.warning(
            "open-file limit %d cannot hold %d connections in flight plus %d idle: "
            "concurrency lowered to %d (raise the limit with ulimit -n)",
            limit,
            concurrency,
            fewest,
            fitted,
        )
        concurrency = fitted
    most = min(most, room - concurrency)  # never negative: concurrency + fewest fits room
    if (concurrency, most) == (settings.concurrency, settings.max_idle_connections):
        return settings
    return settings.model_copy(update={"concurrency": concurrency, "max_idle_connections": most})
