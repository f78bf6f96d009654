"""L2 (Euclidean) regularisation towards the previous task's weights."""
from __future__ import annotations

import torch

from clbench.registry import register_strategy
from clbench.strategy import Strategy, parameter_vector
from clbench.types import Task


@register_strategy("l2")
class L2(Strategy):
    """Penalty strength/2 ||theta - theta_prev||^2 to the weights after the previous task (Hiratani 2024)."""
    # strength trades plasticity for stability over orders of magnitude: log scale
    search_space = {"strength": ("log", 1e-4, 10.0)}

    def __init__(self, strength: float = 1.0, **train) -> None:
        super().__init__(**train)
        self.strength = float(strength)
        self.anchor: torch.Tensor | None = None

    def after_task(self, task: Task) -> None:
        self.anchor = parameter_vector(self.model)

    def penalty(self) -> torch.Tensor | float:
        if self.anchor is None:
            return 0.0
        delta = torch.cat([p.reshape(-1) for p in self.trainable_parameters()]) - self.anchor
        return 0.5 * self.strength * delta.pow(2).sum()
