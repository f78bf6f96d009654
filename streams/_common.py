"""Helpers shared by the image streams: subsets, derangements, scenario heads."""
from __future__ import annotations

import numpy as np
import torch

from clbench.errors import ClbenchError


def cyclic_derangement(items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of one random cycle through ``items``: target[i] takes what was at source[i], so no
    item keeps its place (for 2 or more items)."""
    order = rng.permutation(items)
    return np.roll(order, 1), order  # item order[i] takes the place of order[i-1]


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, rng: np.random.Generator):
    """The first ``n`` samples of a seeded shuffle (all when n is None)."""
    if n is None or n >= len(x):
        return x, y
    if n < 1:
        raise ClbenchError(f"sample counts must be positive, got {n}")
    keep = torch.from_numpy(np.sort(rng.permutation(len(x))[:n]))
    return x[keep], y[keep]


def check_scenario(scenario: str, allowed: tuple[str, ...]) -> None:
    if scenario not in allowed:
        raise ClbenchError(f"scenario must be one of {', '.join(allowed)}, got {scenario!r}")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ClbenchError(f"{name} must be a positive integer, got {value!r}")
