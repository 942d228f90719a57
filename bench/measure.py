"""How the benchmarks time work and read a process's memory (Linux ``/proc``)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def median_seconds(work, repeats: int, warmup: bool = False) -> float:
    """Median wall time of ``repeats`` calls of ``work()`` (after one untimed call if ``warmup``)."""
    if warmup:
        work()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def status_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A memory field of ``/proc/PID/status`` (VmRSS: resident now, VmHWM: its peak) in MB; NaN
    where it cannot be read (no such process, not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
