"""Synaptic intelligence (SI): importance from each parameter's contribution to the loss decrease.

Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017::

    during task t:  w_k += -g_k * (theta_k(step) - theta_k(step - 1))     (path integral)
    after task t:   Omega_k += w_k / ((theta_k(end) - theta_k(start))^2 + xi);  w = 0;  theta* = theta(end)
    loss:           task loss + c * sum_k Omega_k (theta_k - theta*_k)^2

g is the gradient the optimizer used (task loss plus the SI penalty).
"""
from __future__ import annotations

import math

import torch

from clbench.batched import Adapter, batched_form, member_numbers
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy, count_parameters, parameter_vector
from clbench.core.types import Task


@register_strategy("si")
class SynapticIntelligence(Strategy):
    """Synaptic intelligence: path-integral importance, quadratic penalty (Zenke et al. 2017)."""
    # c scales the importance (Zenke et al. searched 0.01 to 10 on a log grid); xi stays fixed
    search_space = {"c": ("log", 1e-3, 10.0)}

    def __init__(self, c: float = 0.1, xi: float = 1e-3, **train) -> None:
        super().__init__(**train)
        self.c, self.xi = float(c), float(xi)
        if not self.c >= 0 or not math.isfinite(self.c):
            raise ClbenchError(f"c must be a finite number >= 0 (the penalty's strength; c < 0 rewards forgetting), "
                               f"got {c}")
        if not self.xi > 0 or not math.isfinite(self.xi):
            raise ClbenchError(f"xi must be a finite number > 0 (it keeps the importance's denominator away from 0), "
                               f"got {xi}")
        self.omega: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None

    def _flat(self, grads: bool = False) -> torch.Tensor:
        params = self.trainable_parameters()
        if grads:
            return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        return parameter_vector(self.model)

    def before_task(self, task: Task) -> None:
        self.start = self.previous = self._flat()
        self.path = torch.zeros_like(self.start)

    def after_step(self) -> None:
        current = self._flat()
        self.path -= self._flat(grads=True) * (current - self.previous)
        self.previous = current

    def after_task(self, task: Task) -> None:
        end = self._flat()
        importance = self.path.clamp(min=0) / ((end - self.start) ** 2 + self.xi)
        self.omega = importance if self.omega is None else self.omega + importance
        self.anchor = end

    def penalty(self) -> torch.Tensor | float:
        if self.anchor is None:
            return 0.0
        delta = torch.cat([p.reshape(-1) for p in self.trainable_parameters()]) - self.anchor
        return self.c * (self.omega * delta * delta).sum()

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(SynapticIntelligence)
class SIAdapter(Adapter):
    state_in_members = True  # refresh stacks everything from the members (see Adapter)

    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.c = member_numbers(self.g.members, "c", self.g.dev)
        self.anchor = None if s[0].anchor is None else torch.stack([x.anchor for x in s])
        self.omega = None if s[0].omega is None else torch.stack([x.omega for x in s])
        self.pull = None if self.omega is None else 2 * self.c[:, None] * self.omega  # c sum omega delta^2
        if hasattr(s[0], "path"):  # set by before_task
            self.previous = torch.stack([x.previous for x in s])
            self.path = torch.stack([x.path for x in s])

    def before_after_task(self) -> None:
        for b, m in enumerate(self.g.members):
            m.strategy.path, m.strategy.previous = self.path[b].clone(), self.previous[b].clone()

    def penalty(self) -> torch.Tensor | None:
        if self.anchor is None:
            return None
        return self.g.net.quadratic_pull(self.anchor, self.pull)

    @torch.no_grad()
    def after_step(self) -> None:
        for p, part in self.g.net.parts():  # per parameter: no (B, P) concatenation a step
            current = p.reshape(len(p), -1)
            grad = torch.zeros_like(current) if p.grad is None else p.grad.reshape(len(p), -1)
            self.path[:, part].addcmul_(grad, current - self.previous[:, part], value=-1.0)
            self.previous[:, part].copy_(current)

    def bytes_per_member(self, strategy, stream, model):
        return 6 * count_parameters(model) * 4
