"""Elastic weight consolidation with a diagonal or an exact full Fisher.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
PNAS 2017: penalty strength/2 (theta - theta*)^T F (theta - theta*), with the
Fisher F of the previous tasks at their solution theta*. ``ewc-full`` keeps
the exact Fisher (as its gradient rows) when it fits in ``max_entries``
numbers, else Kronecker-factored layer blocks (K-FAC; Ritter et al. 2018). Online accumulation:
F <- decay * F + F_task, anchor theta* = weights after the last task
(decay = 1 sums the tasks' Fishers). Hiratani (NeurIPS 2024) shows the full
Fisher keeps retention near 1 whatever the task similarity, while the diagonal
behaves like plain L2.
"""
from __future__ import annotations

import torch

from clbench import fisher
from clbench.errors import ClbenchError
from clbench.registry import register_strategy
from clbench.strategy import Strategy, parameter_vector
from clbench.strategies.l2 import strength_from_gamma
from clbench.types import Task


@register_strategy("ewc-diag")
class EWCDiag(Strategy):
    """EWC with the diagonal Fisher (Kirkpatrick et al. 2017); true Fisher by default.

    ``anchor_initial=True`` also pulls task 1 towards the initial weights, weighted by task 1's own Fisher there
    (Hiratani's lst_cwn_diag.py uses the Fisher of an independent task 0 with the same statistics); ``gamma``
    (teacher-student only) sets the strength the paper's way (clbench.strategies.l2.strength_from_gamma).
    """
    # the useful strength spans orders of magnitude (it scales a Fisher whose size depends on model and loss): log scale
    search_space = {"strength": ("log", 1e-2, 1e3)}

    def __init__(self, strength: float = 1.0, fisher_samples: int = 1000, fisher: str = "true",
                 decay: float = 1.0, anchor_initial: bool = False, gamma: float | None = None, **train) -> None:
        super().__init__(**train)
        self.strength, self.fisher_samples, self.fisher_kind, self.decay = float(strength), int(fisher_samples), fisher, float(decay)
        self.anchor: torch.Tensor | None = None
        self.importance = None
        self.anchor_initial, self.gamma, self._initial_anchor = bool(anchor_initial), gamma, False

    def setup(self, model, stream):
        model = super().setup(model, stream)
        if self.gamma is not None:
            metric = "fisher" if isinstance(self, EWCFull) else "euclidean"
            self.strength = strength_from_gamma(float(self.gamma), stream, metric)
        return model

    def before_task(self, task: Task) -> None:
        if self.anchor_initial and self.anchor is None:
            if isinstance(self, EWCFull):
                raise ClbenchError("anchor_initial is implemented for ewc-diag (and l2), not ewc-full")
            self.importance, self.anchor, self._initial_anchor = self.task_fisher(task), parameter_vector(self.model), True

    def delta(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.trainable_parameters()]) - self.anchor

    def task_fisher(self, task: Task):
        return fisher.diagonal(self, task, self.fisher_samples, self.fisher_kind)

    def accumulate(self, new):
        return new if self.importance is None else self.decay * self.importance + new

    def quadratic_form(self, d: torch.Tensor) -> torch.Tensor:
        return (self.importance * d * d).sum()

    def after_task(self, task: Task) -> None:
        if self._initial_anchor:  # the pull to the initial weights ends with task 1
            self.importance, self._initial_anchor = None, False
        self.importance = self.accumulate(self.task_fisher(task))
        self.anchor = parameter_vector(self.model)

    def penalty(self) -> torch.Tensor | float:
        if self.anchor is None:
            return 0.0
        return 0.5 * self.strength * self.quadratic_form(self.delta())

    def extra_results(self) -> dict:
        return {"fisher": self.fisher_kind}


@register_strategy("ewc-full")
class EWCFull(EWCDiag):
    """EWC with a full (non-diagonal) Fisher: exact for small models, Kronecker-factored (K-FAC) blocks for deep ones."""

    def __init__(self, strength: float = 1.0, fisher_samples: int = 1000, fisher: str = "true",
                 decay: float = 1.0, fisher_form: str = "auto", max_entries: int = 2 * 10**8, **train) -> None:
        super().__init__(strength, fisher_samples, fisher, decay, **train)
        if fisher_form not in ("auto", "exact", "kfac", "layerwise"):
            raise ClbenchError(f"fisher_form must be auto, exact, kfac or layerwise, got {fisher_form!r}")
        self.fisher_form, self.max_entries = fisher_form, int(max_entries)
        self.form_used: str | None = None

    def task_fisher(self, task: Task):
        form = self.fisher_form
        if form == "auto":
            form = "exact" if fisher.full_fits(self, task, self.fisher_samples, self.fisher_kind,
                                               self.max_entries) else "kfac"
        self.form_used = form
        if form == "layerwise":  # Hiratani 2024's layer-wise Fisher for ReLU MLPs (clbench.layerwise_fisher)
            from clbench.layerwise_fisher import layerwise
            return "kfac", [(m, A, G, 1.0) for m, A, G in layerwise(self, task, self.fisher_samples)]
        if form == "kfac":
            return "kfac", [(m, A, G, 1.0) for m, A, G in fisher.kfac(self, task, self.fisher_samples,
                                                                      self.fisher_kind)]
        return fisher.full(self, task, self.fisher_samples, self.fisher_kind, self.max_entries)

    def accumulate(self, new):
        if self.importance is None:
            return new
        (old_form, old), (new_form, m) = self.importance, new
        if old_form == new_form == "kfac":  # one Kronecker term per task and layer, older ones decayed
            return "kfac", [(mod, A, G, w * self.decay) for mod, A, G, w in old] + m
        if old_form == new_form == "rows" and (len(old) + len(m)) < old.shape[1]:
            return "rows", torch.cat([self.decay**0.5 * old, m])
        if "kfac" in (old_form, new_form):
            raise ClbenchError("ewc-full cannot mix exact and K-FAC Fishers across tasks; set fisher_form explicitly")
        as_matrix = [x if form == "matrix" else x.T @ x for form, x in ((old_form, old), (new_form, m))]
        return "matrix", self.decay * as_matrix[0] + as_matrix[1]

    def quadratic_form(self, d: torch.Tensor) -> torch.Tensor:
        form, m = self.importance
        if form == "rows":
            return (m @ d).pow(2).sum()
        if form == "matrix":
            return d @ (m @ d)
        total = 0.0
        for module, A, G, weight in m:
            d_bias = None if module.bias is None else module.bias - self.anchor_of[module.bias]
            total = total + weight * fisher.kfac_quadratic(module, A, G, module.weight - self.anchor_of[module.weight],
                                                           d_bias)
        return total

    def after_task(self, task: Task) -> None:
        super().after_task(task)
        # per-parameter anchors for the K-FAC form (views into the flat anchor)
        self.anchor_of, offset = {}, 0
        for p in self.trainable_parameters():
            self.anchor_of[p] = self.anchor[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def extra_results(self) -> dict:
        return {"fisher": self.fisher_kind, "fisher_form": self.form_used}
