"""How many torch CPU threads clbench's commands use when the user names none.

torch's default is one thread per core. When other processes keep those cores busy, every parallel
operation of a small-tensor training step waits for a sibling thread that is not scheduled: a run with a
thread per core was 4-6x slower than on a quiet machine, one with a single thread 1.7x
(docs/performance.md, "On a busy machine"). So the commands give torch only the cores others leave idle:
the usable cores minus the 1-minute load average (less the one runnable task that is the caller itself),
at least one, never more than torch's own default. ``CLBENCH_THREADS=N`` sets the cores to use instead
(shared out among ``--jobs``); ``--threads N`` sets each run's threads.
"""
from __future__ import annotations

import math
import os

from clbench.core.errors import ClbenchError, cpu_limit


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_cores(load: float | None = None, cores: int | None = None) -> int:
    """Cores that other processes leave idle: ``cores`` minus ``load`` (default: the 1-minute load average)
    less one for the caller, rounded to the nearest core, between 1 and ``cores``."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows): assume a quiet machine
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
