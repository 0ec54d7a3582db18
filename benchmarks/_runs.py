"""Running a benchmarked command: its wall time, CPU time and peak RSS, from ``os.wait4``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    cpu: float  # user + system seconds
    rss_kb: int  # peak RSS of the process (for --processes, its largest process, not the sum)


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
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, **popen)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code not in ok_codes:
        sys.stderr.write(stderr.read_text())
        sys.exit(f"{who}: {cmd[0]} exited {code}")
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)
