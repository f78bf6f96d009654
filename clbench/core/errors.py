"""The one exception type users see.

Anything raised as :class:`ClbenchError` is a problem with the user's input or
environment; its message names the problem and the fix. The CLI prints it as a
single line and exits with status 2.
"""
from __future__ import annotations

from typing import Iterable


class ClbenchError(ValueError):
    """Bad input or missing resource, with a message that says how to fix it."""


def check_unit_interval(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    """Return ``value`` as float, or raise a ClbenchError if it is outside [low, high]."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ClbenchError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}") from None
    if not (low <= value <= high):
        raise ClbenchError(f"{name} must be in [{low:g}, {high:g}], got {value:g}")
    return value


def unknown_key(key: str, known: "Iterable[str]", where: str) -> ClbenchError:
    """The error for a misspelt key in a file (a sweep or a suite), naming the nearest known key."""
    import difflib

    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ClbenchError(f"{where}: unknown key {key!r}{hint} (known keys: {', '.join(known)})")


class ClbenchWarning(UserWarning):
    """Something was done differently from what was asked (e.g. a sample count capped); the message says what."""


def warn(message: str) -> None:
    """Issue a :class:`ClbenchWarning` (the CLI prints it as one line ``clbench: warning: ...``)."""
    import warnings

    warnings.warn(message, ClbenchWarning, stacklevel=3)


def env_number(name: str, default: float, low: float = 0.0) -> float:
    """The environment variable ``name`` as a number > ``low`` (``default`` when unset or empty)."""
    import math
    import os

    raw = os.environ.get(name, "")
    if not raw.strip():
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > low):
        raise ClbenchError(f"${name}={raw!r} must be a number > {low:g}; set it to one (e.g. {default:g}) or unset it")
    return value


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept and what was lost (the CLI prints it and exits with status 130)."""


def cpu_limit(option: str, value: int, what: str) -> int:
    """``value`` for a per-core setting (--threads, --jobs): an error below 1, capped with a warning at
    the number of CPU cores this process may use (more threads than cores only slows torch down, and a
    huge count crashes it)."""
    import os

    if value < 1:
        raise ClbenchError(f"{option} must be at least 1, got {value}")
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if value > cores:
        warn(f"{option} {value} is more than the {cores} CPU cores here; using {cores} {what}")
        return cores
    return value


def check_weight(name: str, value: object) -> float:
    """Return a loss weight as float, or raise a ClbenchError unless it is a finite number >= 0."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ClbenchError(f"{name} must be a finite number >= 0, e.g. {name.split(': ')[-1]}=0.5; got {value!r}")
    return float(value)
