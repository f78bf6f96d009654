"""How many torch CPU threads clbench's commands use when the user names none.

torch's default is one thread per core. When other processes keep those cores busy, every parallel
operation of a small-tensor training step waits for a sibling thread that is not scheduled: a run with a
thread per core was 4-6x slower than on a quiet machine, one with a single thread 1.7x
(docs/performance.md, "On a busy machine"). So the commands give torch only the cores others leave idle:
the usable cores minus the threads runnable now (less the caller itself), at least one, never more than
torch's own default. "Now" is read from Linux's /proc/loadavg, a few times over 50 ms; elsewhere the
1-minute load average stands in, which lags: it still counts a job that ended within the last minute or
so. ``CLBENCH_THREADS=N`` sets the cores to use instead (shared out among ``--jobs``); ``--threads N`` sets
each run's threads.
"""
from __future__ import annotations

import math
import os
import statistics
import time

from clbench.core.errors import ClbenchError, cpu_limit


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runnable_now(path: str = "/proc/loadavg", samples: int = 5, interval_s: float = 0.01) -> float | None:
    """Threads runnable on the machine now, the caller included: the median of ``samples`` reads of the
    running count in ``path`` (Linux's /proc/loadavg, fourth field ``running/total``), or None without it."""
    counts = []
    for k in range(samples):
        try:
            with open(path) as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if k < samples - 1:
            time.sleep(interval_s)
    return float(statistics.median(counts))


def current_load() -> float | None:
    """The load to count others by: runnable_now(), else the 1-minute load average, else None (a quiet
    machine is assumed)."""
    load = runnable_now()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows)
            return None
    return load


def idle_cores(load: float | None = None, cores: int | None = None) -> int:
    """Cores that other processes leave idle: ``cores`` minus ``load`` (default: current_load()) less one for
    the caller, rounded to the nearest core, between 1 and ``cores``."""
    cores = usable_cores() if cores is None else cores
    load = current_load() if load is None else load
    if load is None:
        return cores
    others = max(0.0, load - 1.0)
    return max(1, min(cores, math.floor(cores - others + 0.5)))


def default_threads(jobs: int = 1) -> int:
    """Torch threads for each of ``jobs`` processes: the cores to use, ``$CLBENCH_THREADS`` when set, else
    the idle ones, shared out among the jobs (at least one each)."""
    raw = os.environ.get("CLBENCH_THREADS", "").strip()
    if raw:
        try:
            cores = cpu_limit("$CLBENCH_THREADS", int(raw), "threads")
        except ValueError:
            raise ClbenchError(f"$CLBENCH_THREADS={raw!r} must be a whole number of threads, e.g. 2; "
                               "set it to one or unset it") from None
    else:
        cores = idle_cores()
    return max(1, cores // max(1, jobs))
