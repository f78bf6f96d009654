"""BiC: replay with distillation, then a two-parameter correction of the new classes' logits.

Wu, Chen, Wang, Ye, Liu, Guo & Fu, "Large Scale Incremental Learning", CVPR 2019 (Sec. 3-4, eq. 1-5)::

    memory: K exemplars split evenly over the classes seen
    before task t (n old classes, m new ones): split off a small balanced validation set:
        val_old = a share (10%, the paper's 9:1 train/validation split) of every old class's exemplars,
        val_new = as many samples of every new class, both held out of training
    stage 1, on train_new + train_old:
        loss = lambda * L_d + (1 - lambda) * L_c,   lambda = n / (n + m)
        L_d = sum_{k<=n} -pi_old_k(x) log pi_k(x),  pi = softmax(logits of the old classes / T), T = 2
              (pi_old from the previous model with its own bias correction)
        L_c = cross-entropy over all n + m classes
    stage 2, model frozen: fit (alpha, beta) on val_old + val_new by the cross-entropy of
        q_k = o_k (old classes),  q_k = alpha * o_k + beta (new classes)
    then: shrink every old class to K / (n + m) exemplars and add as many of each new class

The correction applies to the latest task's classes only (a new fit replaces it). The paper does not say how
stage 2 is optimised. The public PyTorch versions (Mammoth's ``models/bic.py`` and the code it follows,
sairin1202/BIC) take a fixed number of Adam steps at lr 1e-3 from (1, 0), which with a small validation set
leaves (alpha, beta) close to where they started. clbench fits the minimiser instead (Newton's method, convex
in (alpha, beta)), with a small ridge ``bias_ridge`` * ((alpha - 1)^2 + beta^2) that keeps it finite where the
validation set is separable (the cross-entropy alone then decreases forever along a ray). Exemplars of a new class are chosen by iCaRL's herding (BiC keeps iCaRL's exemplar memory) from
all of its training samples. Defaults: K = 2000 (the paper's CIFAR-100 memory), val_share = 0.1, T = 2, bias_ridge = 1e-3 (clbench's).
Class-incremental only: the bias it corrects is that between old and new classes under one head.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from clbench.core.class_buffer import ClassBalancedBuffer, as_units, task_units, with_samples
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Stream, Task
from clbench.strategies.icarl import update_exemplars

Bias = tuple[torch.Tensor, float, float]  # (new-class units, alpha, beta)


def correct(logits: torch.Tensor, bias: Bias | None) -> torch.Tensor:
    """BiC's bias correction: alpha * z + beta on the units of ``bias``, every other logit unchanged."""
    if bias is None:
        return logits
    units, alpha, beta = bias
    out = logits.clone()
    out[:, units] = alpha * logits[:, units] + beta
    return out


def fit_bias(logits: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor, new: torch.Tensor,
             ridge: float = 1e-3, iterations: int = 50) -> tuple[float, float]:
    """(alpha, beta) minimising the cross-entropy of the corrected ``logits[:, columns]`` at the targets'
    ``positions`` in ``columns`` (``new``: the units corrected) plus ridge * ((alpha - 1)^2 + beta^2):
    Newton's method from (1, 0) with step halving, in float64. The objective is convex, and the ridge keeps its
    minimiser finite when the validation set is separable."""
    z = logits.detach().double()

    def objective(p: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(correct(z, (new, p[0], p[1])).index_select(1, columns), positions)
        return ce + ridge * ((p[0] - 1) ** 2 + p[1] ** 2)

    p = torch.tensor([1.0, 0.0], dtype=torch.float64, device=z.device)
    for _ in range(iterations):
        g = torch.autograd.functional.jacobian(objective, p)
        if float(g.norm()) < 1e-9:
            break
        step = torch.linalg.solve(torch.autograd.functional.hessian(objective, p), g)
        current, t = float(objective(p)), 1.0
        while t > 1e-8 and float(objective(p - t * step)) > current:
            t /= 2
        p = p - t * step
    return float(p[0]), float(p[1])


@register_strategy("bic")
class BiC(Strategy):
    """BiC: replay + distillation, then alpha * z + beta on the new classes' logits, fitted on a balanced held-out set (Wu et al. 2019)."""

    scenarios = ("class",)
    # memory_size is fixed by the suite; lambda = n/(n+m), T = 2 and the 9:1 split are the paper's: nothing to search
    search_space = {}

    def __init__(self, memory_size: int = 2000, val_share: float = 0.1, temperature: float = 2.0,
                 bias_ridge: float = 1e-3, **train) -> None:
        super().__init__(**train)
        if not isinstance(bias_ridge, (int, float)) or isinstance(bias_ridge, bool) or not bias_ridge > 0:
            raise ClbenchError(f"bic: bias_ridge must be a positive number, e.g. bias_ridge=0.001; got {bias_ridge!r}")
        self.bias_ridge = float(bias_ridge)
        if not isinstance(val_share, (int, float)) or not 0 < val_share < 1:
            raise ClbenchError(f"bic: val_share must be a fraction in (0, 1), e.g. val_share=0.1; got {val_share!r}")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ClbenchError(f"bic: temperature must be positive, e.g. temperature=2; got {temperature!r}")
        self.memory = ClassBalancedBuffer(memory_size)
        self.val_share, self.temperature = float(val_share), float(temperature)
        self.old: torch.nn.Module | None = None
        self.old_bias: Bias | None = None
        self.bias: Bias | None = None
        self.seen_units: list[int] = []
        self.corrections: list[tuple[float, float]] = []

    def setup(self, model: torch.nn.Module, stream: Stream) -> torch.nn.Module:
        model = super().setup(model, stream)
        if stream.loss != "ce":
            raise ClbenchError(f"bic corrects classification logits; {stream.name!r} is a regression (mse) stream")
        return model

    def before_task(self, task: Task) -> None:
        device = task.train_x.device
        new = [u for u in task_units(task) if u not in self.seen_units]
        self.units = torch.tensor(sorted(set(self.seen_units) | set(new)), dtype=torch.long, device=device)
        self.old_units = torch.tensor(self.seen_units, dtype=torch.long, device=device)
        self.new_units = torch.tensor(new, dtype=torch.long, device=device)
        self.lam = len(self.seen_units) / len(self.units)
        x, u = task.inputs(task.train_x), as_units(task, task.train_y)
        self.val = None
        if len(self.memory):
            mx, mu, _ = self.memory.data()
            per_class = max(1, round(self.val_share * (self.memory.capacity // len(self.seen_units))))
            val_old, val_new = self._hold_out(mu, per_class), self._hold_out(u, per_class)
            self.val = torch.cat([mx[val_old], x[val_new]]), torch.cat([mu[val_old], u[val_new]])
            x, u = torch.cat([x[~val_new], mx[~val_old]]), torch.cat([u[~val_new], mu[~val_old]])
        self.train_set = with_samples(task, x, u)

    @staticmethod
    def _hold_out(units: torch.Tensor, per_class: int) -> torch.Tensor:
        """A mask of ``per_class`` randomly drawn samples of every class in ``units`` (all, if it has fewer)."""
        mask = torch.zeros(len(units), dtype=torch.bool, device=units.device)
        for c in units.unique().tolist():
            idx = (units == c).nonzero().squeeze(1)
            mask[idx[torch.randperm(len(idx)).to(idx.device)[:per_class]]] = True
        return mask

    def train_tasks(self, task: Task, seen: list[Task]) -> list[Task]:
        return [self.train_set]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        logits = self.model(x).float()
        classification = F.cross_entropy(logits.index_select(1, self.units), torch.searchsorted(self.units, y))
        if self.old is None or not len(self.old_units):
            return classification
        with torch.no_grad():
            old = correct(self.old(x).float(), self.old_bias).index_select(1, self.old_units)
        T = self.temperature
        distill = -(F.softmax(old / T, 1) * F.log_softmax(logits.index_select(1, self.old_units) / T, 1)).sum(1).mean()
        return self.lam * distill + (1 - self.lam) * classification

    def after_task(self, task: Task) -> None:
        self.bias = None
        if self.val is not None and len(self.new_units):
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                logits = self.model(self.val[0]).float()
            self.model.train(was_training)
            alpha, beta = fit_bias(logits, torch.searchsorted(self.units, self.val[1]), self.units, self.new_units,
                                   self.bias_ridge)
            if not (math.isfinite(alpha) and math.isfinite(beta)):
                raise ClbenchError(f"bic: the bias correction fit gave alpha={alpha}, beta={beta} on task {task.id}")
            self.bias = (self.new_units, alpha, beta)
            self.corrections.append((alpha, beta))
        self.seen_units = self.units.tolist()
        update_exemplars(self.memory, self.model, task, self.seen_units)
        self.old, self.old_bias = copy.deepcopy(self.model).eval(), self.bias
        for p in self.old.parameters():
            p.requires_grad_(False)
        self.val = self.train_set = None

    def forward(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        return correct(self.model(x), self.bias)

    def extra_results(self) -> dict[str, Any]:
        return {"memory_size": self.memory.capacity, "memory_samples": len(self.memory),
                "bias_correction": [list(c) for c in self.corrections]}
