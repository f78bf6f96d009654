"""Learning without Forgetting (LwF): distil the previous model's outputs on the new task's inputs.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017::

    after task t:  old = frozen copy of the model
    loss:          task loss + alpha * KL(softmax(old(x)/T) || softmax(model(x)/T))   (over units seen so far)
                   (regression streams: alpha * ||model(x) - old(x)||^2 / outputs)

alpha is the paper's lambda_o (1 by default) and T its temperature (2): the paper's cross-entropy to
the old model's soft outputs differs from this KL only by a constant. ``t_squared=True`` multiplies the
distillation term by T^2, as Hinton et al. 2015 do to keep its gradient scale independent of T (not in
Li & Hoiem; at T = 2 it weighs distillation 4x). Avalanche's ``LwF(alpha, temperature)`` is the default
form with the same alpha.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from clbench.batched import Adapter, StackedNet, batched_form, member_numbers
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy, count_parameters
from clbench.core.types import Task


@register_strategy("lwf")
class LwF(Strategy):
    """Learning without forgetting: distillation to the previous model's outputs (Li & Hoiem 2017)."""
    # the distillation weight alpha is a loss ratio (log scale); temperature 2 is the paper's choice
    search_space = {"alpha": ("log", 0.01, 100.0)}

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0, t_squared: bool = False, **train) -> None:
        super().__init__(**train)
        self.alpha, self.temperature, self.t_squared = float(alpha), float(temperature), bool(t_squared)
        self.old = None
        self.seen_units: list[int] = []

    def after_task(self, task: Task) -> None:
        self.old = copy.deepcopy(self.model).eval()
        for p in self.old.parameters():
            p.requires_grad_(False)
        units = task.head.tolist() if task.head is not None else (task.classes or range(self.stream.num_outputs))
        self.seen_units = sorted(set(self.seen_units) | set(int(u) for u in units))

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        outputs = self.forward(x, task)
        logits = outputs if task.head is None else outputs.index_select(1, task.head)
        loss = self.task_loss(logits, y)
        if self.old is None:
            return loss
        with torch.no_grad():
            old = self.old(x)
        units = torch.tensor(self.seen_units, device=x.device)
        new, old = outputs.index_select(1, units), old.index_select(1, units)
        if self.stream.loss == "mse":
            return loss + self.alpha * F.mse_loss(new, old)
        T = self.temperature
        distill = F.kl_div(F.log_softmax(new / T, 1), F.log_softmax(old / T, 1), log_target=True, reduction="batchmean")
        return loss + self.alpha * (T * T if self.t_squared else 1.0) * distill

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(LwF)
class LwFAdapter(Adapter):
    """The members' frozen previous models (their own after_task copies them) stacked; the distillation term
    of strategies/lwf.py per member, with its own alpha and temperature."""

    state_in_members = True  # refresh stacks everything from the members (see Adapter)

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.t_squared,)

    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.old = None if s[0].old is None else StackedNet([x.old for x in s])
        for p in self.old.params if self.old is not None else []:
            p.requires_grad_(False)
        if self.old is not None and any(x.seen_units != s[0].seen_units for x in s):
            raise ClbenchError("batched lwf members have seen different output units; run them unbatched")
        self.units = torch.tensor(s[0].seen_units, device=self.g.dev)
        self.alpha = member_numbers(self.g.members, "alpha", self.g.dev)
        self.temperature = member_numbers(self.g.members, "temperature", self.g.dev)[:, None, None]

    def extra_loss(self, x, y, t, loss, outputs, sharing):
        if self.old is None:
            return loss
        with torch.no_grad():
            old = self.old.forward(x, None, sharing).index_select(2, self.units)
        new = outputs.index_select(2, self.units)
        if self.g.loss_kind == "mse":
            return loss + self.alpha * (new - old).pow(2).flatten(1).mean(1)
        T = self.temperature
        log_old, log_new = F.log_softmax(old / T, 2), F.log_softmax(new / T, 2)
        distill = (log_old.exp() * (log_old - log_new)).sum(2).mean(1)  # KL, batchmean, per member
        weight = self.temperature[:, 0, 0] ** 2 if self.g.members[0].strategy.t_squared else 1.0
        return loss + self.alpha * weight * distill

    def bytes_per_member(self, strategy, stream, model):
        return 4 * count_parameters(model) * 4
