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


def check_weight(name: str, value: object) -> float:
    """Return a loss weight as float, or raise a ClbenchError unless it is a finite number >= 0."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ClbenchError(f"{name} must be a finite number >= 0, e.g. {name.split(': ')[-1]}=0.5; got {value!r}")
    return float(value)
