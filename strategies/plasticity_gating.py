"""Plasticity gating: per task, only the synapses from a random fraction alpha of inputs may change.

Hiratani, "Disentangling and mitigating the impact of task similarity for
continual learning", NeurIPS 2024: unlike activity gating, every unit stays
active; what is gated is learning. For each task and each Linear layer a fixed
random set of round(alpha * inputs) input units is drawn; the gradient of the
layer's weights is zeroed on the columns of the other inputs (biases stay
plastic). In the over-parameterised linear model this behaves like vanilla
training (no benefit), as the paper shows.
"""
from __future__ import annotations

import torch
from torch import nn

from clbench.batched import Adapter, batched_form
from clbench.core.errors import ClbenchError, check_unit_interval
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Stream, Task
from clbench.strategies.activity_gating import random_gate


@register_strategy("plasticity-gating")
class PlasticityGating(Strategy):
    """Per-task random masks on which weights may change: synapses from an alpha fraction of inputs (Hiratani 2024)."""
    # the plastic fraction of inputs per task (linear scale)
    search_space = {"alpha": ("float", 0.05, 1.0)}

    def __init__(self, alpha: float = 0.5, **train) -> None:
        super().__init__(**train)
        self.alpha = check_unit_interval("alpha", alpha)
        if self.alpha == 0:
            raise ClbenchError("alpha must be > 0: with no plastic synapse nothing can be learned")
        self.masks: list[torch.Tensor] = []

    def setup(self, model: nn.Module, stream: Stream) -> nn.Module:
        model = super().setup(model, stream)
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.base_seed = int(torch.randint(0, 2**31 - 1, (1,)))
        for k, layer in enumerate(self.layers):
            layer.weight.register_hook(lambda grad, k=k: grad * self.masks[k] if self.masks else grad)
        return model

    def before_task(self, task: Task) -> None:
        self.masks = [random_gate(layer.in_features, self.alpha, self.base_seed + 7919 * task.id + k, False)
                      .to(layer.weight.device) for k, layer in enumerate(self.layers)]

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(PlasticityGating)
class PlasticityGatingAdapter(Adapter):
    state_in_members = True  # refresh stacks everything from the members (see Adapter)

    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.masks = [torch.stack(g) for g in zip(*(x.masks for x in s))] if s[0].masks else []

    def after_backward(self) -> None:
        for (w, _), mask in zip(self.g.net.linears, self.masks):
            grad = self.g.net.params[w].grad
            if grad is not None:
                grad.mul_(mask[:, None, :])
