"""Adaptive activity gating: reuse the previous task's gate as far as it helps the new task.

Hiratani, "Disentangling and mitigating the impact of task similarity for
continual learning", NeurIPS 2024. After task t, probe task t + 1 with the
model trained so far (so the gate is in place when transfer is measured)::

    err_base  = normalised error on the new task through a fresh random gate
    err_probe = normalised error on the new task through the previous task's gate
    rho_g     = clip(err_base - err_probe, 0, 1)
    gate_t    = each unit takes the previous gate's value with probability rho_g, else the fresh gate's

Similar tasks (the old gate already helps) share units and transfer; dissimilar
ones get independent gates and are protected. Normalised error: MSE / mean(y^2)
for regression, cross-entropy / log(classes) for classification.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from clbench.registry import register_strategy
from clbench.types import Task
from clbench.strategies.activity_gating import ActivityGating, random_gate


@register_strategy("adaptive-gating")
class AdaptiveGating(ActivityGating):
    """Activity gating that reuses the previous gate with the probability its probe measures (Hiratani 2024)."""

    def __init__(self, alpha: float = 0.5, layers: str = "all", rescale: bool = True, probe_samples: int = 1000,
                 **train) -> None:
        super().__init__(alpha, layers, rescale, **train)
        self.probe_samples = int(probe_samples)
        self.reuse: dict[int, float] = {}

    @torch.no_grad()
    def _error(self, task: Task, gate: list[torch.Tensor]) -> float:
        x, y = task.inputs(task.train_x[: self.probe_samples]), task.train_y[: self.probe_samples]
        self.current = gate
        out = self.model(x)
        out = out if task.head is None else out.index_select(1, task.head)
        if self.stream.loss == "mse":
            return float(((out - y) ** 2).mean() / (y**2).mean())
        return float(torch.nn.functional.cross_entropy(out, y) / math.log(out.shape[1]))

    def after_task(self, task: Task) -> None:
        position = [t.id for t in self.stream.tasks].index(task.id)
        if position + 1 == len(self.stream.tasks):
            return
        upcoming = self.stream.tasks[position + 1]
        n, device = self.probe_samples, next(self.model.parameters()).device
        probe = replace(upcoming, train_x=upcoming.train_x[:n], train_y=upcoming.train_y[:n],
                        test_x=upcoming.test_x[:0], test_y=upcoming.test_y[:0]).to(device)
        old = self.gate(task)
        fresh = [random_gate(layer.in_features, self.alpha, self.base_seed + 7919 * upcoming.id + k, self.rescale)
                 .to(device) for k, layer in enumerate(self.gated)]
        rho_g = min(max(self._error(probe, fresh) - self._error(probe, old), 0.0), 1.0)
        g = torch.Generator().manual_seed(self.base_seed + 104729 * (upcoming.id + 1))
        self.gates[upcoming.id] = [torch.where(torch.rand(len(o), generator=g).to(device) < rho_g, o, f)
                                   for o, f in zip(old, fresh)]
        self.reuse[upcoming.id] = rho_g

    def extra_results(self) -> dict:
        return {"gate_reuse_probability": {str(k): v for k, v in self.reuse.items()}}


__all__ = ["AdaptiveGating", "random_gate"]
