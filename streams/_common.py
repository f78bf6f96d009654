"""Helpers shared by the image streams: subsets, derangements, scenario heads."""
from __future__ import annotations

import numpy as np
import torch

from clbench.core.errors import ClbenchError, warn


def cyclic_derangement(items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of one random cycle through ``items``: target[i] takes what was at source[i], so no
    item keeps its place (for 2 or more items)."""
    order = rng.permutation(items)
    return np.roll(order, 1), order  # item order[i] takes the place of order[i-1]


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, rng: np.random.Generator, what: str = "samples",
           dataset: str = "the dataset"):
    """The first ``n`` samples of a seeded shuffle (all when n is None).

    ``n`` must be a positive whole number; more than there are gives all of them, with a
    warning that says how many were used.
    """
    if n is None:
        return x, y
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ClbenchError(f"{what} must be a positive whole number (or None for all), got {n!r}")
    if n >= len(x):
        if n > len(x):
            warn(f"{what}={n} is more than the {len(x)} that {dataset} has; using all {len(x)}")
        return x, y
    keep = torch.from_numpy(np.sort(rng.permutation(len(x))[:n]))
    return x[keep], y[keep]


def check_scenario(scenario: str, allowed: tuple[str, ...]) -> None:
    if scenario not in allowed:
        raise ClbenchError(f"scenario must be one of {', '.join(allowed)}, got {scenario!r}")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ClbenchError(f"{name} must be a positive integer, got {value!r}")
