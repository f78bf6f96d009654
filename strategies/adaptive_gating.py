"""Adaptive activity gating: reuse the previous task's gate as far as it helps the new task.

Hiratani, "Disentangling and mitigating the impact of task similarity for
continual learning", NeurIPS 2024. After task t, probe task t + 1 (so the gate
is in place when transfer is measured), compute a reuse probability rho_g and
draw the next gate: each unit takes the previous gate's value with probability
rho_g, else a fresh random gate's. Similar tasks (the old gate already helps)
share units and transfer; dissimilar ones get independent gates and are
protected. Three rules for rho_g (``rule=...``):

- ``"paper"`` (default), the teacher-student rule of the authors' script
  ``teacher-student/lst_acg.py`` (github nhiratani/transfer_retention_model):
  rho_g = clip(L_base - L_probe, 0, 1), with L_base the loss of the untrained
  model (W = 0 there) on the new task and L_probe the loss of the trained model
  through the previous gate. Raw MSE for regression (the teacher's output
  variance is about 1, so this is on the paper's scale), cross-entropy / log(classes)
  for classification.
- ``"normalised"``, the permuted-MNIST rule of ``pm/pm_gated_perm1.py``:
  rho_g = clip((L_base - L_probe) / (L_base - L_min), 0, 1), L_base the untrained
  model's loss on the new task through the fresh gate, L_min the trained model's
  loss on the finished task through its own gate (divided by L_base alone when
  L_base <= L_min). Same losses as ``"paper"``.
- ``"fresh"``, clbench's first rule: rho_g = clip(E_fresh - E_probe, 0, 1) with
  both errors of the trained model (through a fresh gate and through the old
  one), normalised (MSE / mean(y^2), cross-entropy / log(classes)). It transfers
  less than the paper's rule at high similarity (about 0.1 at rho_a = rho_b = 0.9).

Losses are measured on the first ``probe_samples`` training samples (never the
test set). The authors' settings: ``sampling="bernoulli", rescale=False`` and
500 epochs (``epochs=500`` on the teacher-student stream).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.func import functional_call

from clbench.batched import batched_form
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.types import Task
from clbench.strategies.activity_gating import (
    ActivityGating,
    ActivityGatingAdapter,
    random_gate,
)

RULES = ("paper", "normalised", "fresh")


@register_strategy("adaptive-gating")
class AdaptiveGating(ActivityGating):
    """Activity gating that reuses the previous gate with the probability its probe measures (Hiratani 2024)."""

    def __init__(self, alpha: float = 0.5, layers: str = "all", rescale: bool = True, probe_samples: int = 1000,
                 rule: str = "paper", sampling: str = "exact", **train) -> None:
        super().__init__(alpha, layers, rescale, sampling, **train)
        if rule not in RULES:
            raise ClbenchError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.probe_samples, self.rule = int(probe_samples), rule
        self.reuse: dict[int, float] = {}

    def setup(self, model, stream):
        model = super().setup(model, stream)
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}  # the untrained model
        return model

    @torch.no_grad()
    def _loss(self, task: Task, gate: list[torch.Tensor], normalise: bool, initial: bool = False) -> float:
        x, y = task.inputs(task.train_x[: self.probe_samples]), task.train_y[: self.probe_samples]
        self.current = gate
        out = functional_call(self.model, self.initial, (x,)) if initial else self.model(x)
        out = out if task.head is None else out.index_select(1, task.head)
        if self.stream.loss == "mse":
            mse = ((out - y) ** 2).mean()
            return float(mse / (y**2).mean() if normalise else mse)
        return float(torch.nn.functional.cross_entropy(out, y) / math.log(out.shape[1]))

    def _probe(self, n: int, task: Task, device) -> Task:
        return replace(task, train_x=task.train_x[:n], train_y=task.train_y[:n],
                       test_x=task.test_x[:0], test_y=task.test_y[:0]).to(device)

    def reuse_probability(self, done: Task, upcoming: Task, old: list, fresh: list) -> float:
        """rho_g by ``self.rule`` (see the module docstring); ``upcoming`` and ``done`` are probe-sized tasks."""
        if self.rule == "fresh":
            value = self._loss(upcoming, fresh, True) - self._loss(upcoming, old, True)
        else:
            base, probe = self._loss(upcoming, fresh, False, initial=True), self._loss(upcoming, old, False)
            value = base - probe
            if self.rule == "normalised":
                least = self._loss(done, old, False)
                value = value / (base - least) if base > least else value / base
        return min(max(value, 0.0), 1.0)

    def after_task(self, task: Task) -> None:
        position = [t.id for t in self.stream.tasks].index(task.id)
        if position + 1 == len(self.stream.tasks):
            return
        upcoming = self.stream.tasks[position + 1]
        n, device = self.probe_samples, next(self.model.parameters()).device
        old = self.gate(task)
        fresh = [random_gate(layer.in_features, self.alpha, self.base_seed + 7919 * upcoming.id + k, self.rescale,
                             self.sampling).to(device) for k, layer in enumerate(self.gated)]
        rho_g = self.reuse_probability(self._probe(n, task, device), self._probe(n, upcoming, device), old, fresh)
        g = torch.Generator().manual_seed(self.base_seed + 104729 * (upcoming.id + 1))
        self.gates[upcoming.id] = [torch.where(torch.rand(len(o), generator=g).to(device) < rho_g, o, f)
                                   for o, f in zip(old, fresh)]
        self.reuse[upcoming.id] = rho_g

    def extra_results(self) -> dict:
        return {"gate_reuse_probability": {str(k): v for k, v in self.reuse.items()}, "rule": self.rule}


# batched form: the gates are the members' own (chosen in before_task), stacked as for activity gating
batched_form(AdaptiveGating)(ActivityGatingAdapter)

__all__ = ["AdaptiveGating", "random_gate", "RULES"]
