"""Running a benchmarked command: its wall time, CPU time and peak RSS, from ``os.wait4``.

The command is started by a small launcher (``python -S``) that waits for it and reports its
figures: on Linux a child's ``ru_maxrss`` starts from the RSS of the process it was forked (or
vforked) from, so started from this process after a case that grew it (a 1 GiB body hashed,
2,000 result lines parsed) a 50 MB command read as large as this process had been. Now no
figure reads below the launcher's own ~9 MB.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    cpu: float  # user + system seconds
    rss_kb: int  # peak RSS of the process (for --processes, its largest process, not the sum)


#  argv: the descriptor to report on, then the command. Reports "wall cpu maxrss_kb exitcode".
_LAUNCHER = """
import os, sys, time
fd, cmd = int(sys.argv[1]), sys.argv[2:]
t0 = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
os.write(fd, f"{wall} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss} {code}".encode())
"""


def timed(
    cmd: list[str],
    stdout: Path,
    stderr: Path,
    *,
    who: str,
    ok_codes: tuple[int, ...] = (0,),
    **popen: Any,
) -> Sample:
    """Run ``cmd`` with its output in files; exits naming ``who`` when its exit code is not
    one of ``ok_codes``. ``popen`` goes to ``subprocess.Popen`` (``env``, ``preexec_fn``)."""
    read_end, write_end = os.pipe()
    launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(write_end), *cmd]
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(launcher, stdout=out, stderr=err, pass_fds=(write_end,), **popen)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as report:
            figures = report.read().split()
        proc.wait()
    if len(figures) != 4:
        sys.stderr.write(stderr.read_text())
        sys.exit(f"{who}: {cmd[0]} could not be started (launcher exited {proc.returncode})")
    wall, cpu, rss_kb, code = float(figures[0]), float(figures[1]), int(figures[2]), int(figures[3])
    if code not in ok_codes:
        sys.stderr.write(stderr.read_text())
        sys.exit(f"{who}: {cmd[0]} exited {code}")
    return Sample(wall, cpu, rss_kb)


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)
