"""Progress bars (tqdm) for long work: stream construction and runs.

A bar shows on a terminal only (never in logs or pipes), and only once the work
has taken ``DELAY`` seconds, so quick work prints nothing. ``quiet()`` turns every
bar off (the CLI's ``--quiet``; sweep workers, whose own bar is the sweep's).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

DELAY = 2.0
_enabled = True
T = TypeVar("T")


def bar(total: float, desc: str, unit: str = "it", enabled: bool = True, fraction: bool = False):
    """A tqdm bar (a no-op one when disabled); ``fraction``: the total is a work measure, shown as a percentage."""
    from tqdm.auto import tqdm

    fmt = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]" if fraction else None
    return tqdm(total=total, desc=desc, unit=unit, delay=DELAY, disable=None if (enabled and _enabled) else True,
                bar_format=fmt)


def steps(items: Iterable[T], total: int, desc: str, unit: str = "task") -> Iterator[T]:
    """Iterate ``items`` with a bar (stream construction: one step per task)."""
    with bar(total, desc, unit) as b:
        for item in items:
            yield item
            b.update(1)


@contextmanager
def quiet() -> Iterator[None]:
    """No bars inside this block."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
