"""The optimizers of a batch whose members train at different learning rates.

Every stacked parameter is (B, ...): member b's slice gets the update of its own optimizer at its own
learning rate, written out as torch.optim's single-tensor steps do it (``torch.optim.sgd``, ``torch.optim.adam``
and ``adamw`` with their defaults), so each member follows its separate run up to float rounding. A batch whose
members share one learning rate uses the engine's optimizer itself (clbench.core.engine.make_optimizer).
"""
from __future__ import annotations

import math

import torch

from clbench.core.errors import ClbenchError

BETAS, EPS, ADAMW_DECAY = (0.9, 0.999), 1e-8, 1e-2  # torch.optim.Adam / AdamW defaults


class MemberOptimizer:
    """SGD (no momentum), Adam or AdamW over stacked parameters, with one learning rate per member."""

    def __init__(self, name: str, params: list[torch.Tensor], lrs: list[float]) -> None:
        if name not in ("sgd", "adam", "adamw"):
            raise ClbenchError(f"unknown optimizer {name!r}; use sgd, adam or adamw")
        self.name, self.params, self.steps = name, list(params), 0
        self.lr = torch.tensor(lrs, dtype=self.params[0].dtype, device=self.params[0].device)
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def per_member(self, values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *[1] * (p.dim() - 1))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = BETAS
        for k, p in enumerate(self.params):
            if p.grad is None:
                continue
            lr = self.per_member(self.lr, p)
            if self.name == "sgd":
                p.sub_(lr * p.grad)
                continue
            if self.name == "adamw":
                p.mul_(1 - lr * ADAMW_DECAY)
            if k not in self.state:
                self.state[k] = (torch.zeros_like(p), torch.zeros_like(p))
            mean, square = self.state[k]
            mean.lerp_(p.grad, 1 - beta1)
            square.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (square.sqrt() / math.sqrt(1 - beta2 ** self.steps)).add_(EPS)
            p.sub_(lr / (1 - beta1 ** self.steps) * mean / denom)
