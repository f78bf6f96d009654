"""Elastic weight consolidation with a diagonal or a full (exact or K-FAC) Fisher, in two forms.

``form="per-task"`` (default), Kirkpatrick et al., "Overcoming catastrophic
forgetting in neural networks", PNAS 2017: one penalty per earlier task k, each
anchored at that task's solution theta*_k with that task's Fisher F_k::

    penalty = strength/2 sum_k (theta - theta*_k)^T F_k (theta - theta*_k)

``form="online"``, Schwarz et al., "Progress & Compress", ICML 2018 (online
EWC): one penalty at the latest solution theta*_t with the decayed sum of the
Fishers, F <- decay * F + F_t (``decay`` = 1 sums them)::

    penalty = strength/2 (theta - theta*_t)^T F (theta - theta*_t)

The two agree for two tasks. ``ewc-full`` keeps the exact Fisher (as its
gradient rows) when it fits in ``max_entries`` numbers, else Kronecker-factored
layer blocks (K-FAC; Ritter et al. 2018, whose online Laplace approximation is
the online form). Hiratani (NeurIPS 2024) shows the full Fisher keeps retention
near 1 whatever the task similarity, while the diagonal behaves like plain L2.
Hiratani's own settings are reachable too: ``anchor_initial`` (ewc-diag), ``gamma``
and ``fisher_form="layerwise"`` (ewc-full).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clbench.batched import StackedLinear, batched_form, member_numbers
from clbench.batched import fisher as batched_fisher
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy, count_parameters, parameter_vector
from clbench.core.types import Stream, Task
from clbench.fisher import estimators as fisher
from clbench.strategies.l2 import L2Adapter, strength_from_gamma

FORMS = ("per-task", "online")


@register_strategy("ewc-diag")
class EWCDiag(Strategy):
    """EWC, diagonal Fisher: form=per-task (default) one penalty per task at its solution (Kirkpatrick et al. 2017); form=online one decayed sum at the latest weights (Schwarz et al. 2018).

    ``anchor_initial=True`` also pulls task 1 towards the initial weights, weighted by task 1's own Fisher there
    (Hiratani's lst_cwn_diag.py uses the Fisher of an independent task 0 with the same statistics); ``gamma``
    (teacher-student only) sets the strength the paper's way (clbench.strategies.l2.strength_from_gamma).
    """

    # the useful strength spans orders of magnitude (it scales a Fisher whose size depends on model and loss): log scale
    search_space = {"strength": ("log", 1e-2, 1e3)}

    def __init__(self, strength: float = 1.0, fisher_samples: int = 1000, fisher: str = "true",
                 form: str = "per-task", decay: float = 1.0, anchor_initial: bool = False,
                 gamma: float | None = None, **train) -> None:
        super().__init__(**train)
        if form not in FORMS:
            raise ClbenchError(f"form must be per-task (Kirkpatrick et al. 2017) or online (Schwarz et al. 2018), "
                               f"got {form!r}")
        if form == "per-task" and float(decay) != 1.0:
            raise ClbenchError(f"decay={decay} applies to form=online only (Schwarz et al. 2018); the per-task form "
                               "keeps every task's penalty as it is: set form=online or drop decay")
        self.strength, self.fisher_samples, self.fisher_kind = float(strength), int(fisher_samples), fisher
        self.form, self.decay = form, float(decay)
        # (Fisher, anchor) pairs: one per finished task (per-task), or a single pair (online)
        self.penalties: list[tuple[Any, torch.Tensor]] = []
        self.anchor_initial, self.gamma, self._initial_anchor = bool(anchor_initial), gamma, False

    # --- what a Fisher structure defines ---------------------------------------------------------------
    def task_fisher(self, task: Task) -> Any:
        """The Fisher of ``task`` at the current weights."""
        return fisher.diagonal(self, task, self.fisher_samples, self.fisher_kind)

    def combine(self, old: Any, new: Any) -> Any:
        """Online accumulation: decay * old + new."""
        return self.decay * old + new

    def quadratic_form(self, importance: Any, anchor: torch.Tensor) -> torch.Tensor:
        """(theta - anchor)^T F (theta - anchor) for the current weights theta."""
        d = self.flat_parameters() - anchor
        return (importance * d * d).sum()

    # --- hooks -----------------------------------------------------------------------------------------
    def setup(self, model, stream):
        model = super().setup(model, stream)
        if self.gamma is not None:
            metric = "fisher" if isinstance(self, EWCFull) else "euclidean"
            self.strength = strength_from_gamma(float(self.gamma), stream, metric)
        return model

    def before_task(self, task: Task) -> None:
        if self.anchor_initial and not self.penalties and not self._initial_anchor:
            if isinstance(self, EWCFull):
                raise ClbenchError("anchor_initial is implemented for ewc-diag (and l2), not ewc-full")
            self.penalties, self._initial_anchor = [(self.task_fisher(task), parameter_vector(self.model))], True

    def after_task(self, task: Task) -> None:
        if self._initial_anchor:  # the pull to the initial weights ends with task 1
            self.penalties, self._initial_anchor = [], False
        importance, anchor = self.task_fisher(task), parameter_vector(self.model)
        if self.form == "per-task":
            self.penalties.append((importance, anchor))
        else:
            if self.penalties:
                importance = self.combine(self.penalties[0][0], importance)
            self.penalties = [(importance, anchor)]

    def penalty(self) -> torch.Tensor | float:
        if not self.penalties:
            return 0.0
        return 0.5 * self.strength * sum(self.quadratic_form(F, anchor) for F, anchor in self.penalties)

    def flat_parameters(self) -> torch.Tensor:
        """The trainable parameters as one vector (differentiable)."""
        return torch.cat([p.reshape(-1) for p in self.trainable_parameters()])

    def extra_results(self) -> dict:
        return {"fisher": self.fisher_kind, "ewc_form": self.form}

    # The single (Fisher, anchor) pair by name, for clbench.batched.run, which runs the online form (and the
    # per-task form on two-task streams, where the two are the same) and reads and writes these.
    @property
    def importance(self) -> Any:
        return self.penalties[0][0] if self.penalties else None

    @importance.setter
    def importance(self, value: Any) -> None:
        self.penalties = [(value, self.penalties[0][1] if self.penalties else None)]

    @property
    def anchor(self) -> torch.Tensor | None:
        return self.penalties[0][1] if self.penalties else None

    @anchor.setter
    def anchor(self, value: torch.Tensor) -> None:
        self.penalties = [(self.penalties[0][0] if self.penalties else None, value)]


@register_strategy("ewc-full")
class EWCFull(EWCDiag):
    """EWC, full Fisher (exact for small models, K-FAC blocks for deep ones): form=per-task (default, Kirkpatrick et al. 2017) or online (Schwarz et al. 2018; Ritter et al. 2018)."""

    def __init__(self, strength: float = 1.0, fisher_samples: int = 1000, fisher: str = "true",
                 form: str = "per-task", decay: float = 1.0, fisher_form: str = "auto", max_entries: int = 2 * 10**8,
                 **train) -> None:
        super().__init__(strength, fisher_samples, fisher, form, decay, **train)
        if fisher_form not in ("auto", "exact", "kfac", "layerwise"):
            raise ClbenchError(f"fisher_form must be auto, exact, kfac or layerwise, got {fisher_form!r}")
        self.fisher_form, self.max_entries = fisher_form, int(max_entries)
        self.form_used: str | None = None

    def task_fisher(self, task: Task) -> tuple[str, Any]:
        """``("rows", M)`` with F = M^T M, ``("matrix", F)``, or ``("kfac", [(layer, A, G, weight), ...])``."""
        form = self.fisher_form
        if form == "auto":
            form = "exact" if fisher.full_fits(self, task, self.fisher_samples, self.fisher_kind,
                                               self.max_entries) else "kfac"
        self.form_used = form
        if form == "layerwise":  # Hiratani 2024's layer-wise Fisher for ReLU MLPs (clbench.fisher.layerwise)
            from clbench.fisher.layerwise import layerwise

            return "kfac", [(m, A, G, 1.0) for m, A, G in layerwise(self, task, self.fisher_samples)]
        if form == "kfac":
            return "kfac", [(m, A, G, 1.0) for m, A, G in fisher.kfac(self, task, self.fisher_samples,
                                                                      self.fisher_kind)]
        return fisher.full(self, task, self.fisher_samples, self.fisher_kind, self.max_entries)

    def combine(self, old: tuple[str, Any], new: tuple[str, Any]) -> tuple[str, Any]:
        (old_form, old), (new_form, m) = old, new
        if old_form == new_form == "kfac":  # one Kronecker term per task and layer, older ones decayed
            return "kfac", [(mod, A, G, w * self.decay) for mod, A, G, w in old] + m
        if old_form == new_form == "rows" and (len(old) + len(m)) < old.shape[1]:
            return "rows", torch.cat([self.decay**0.5 * old, m])
        if "kfac" in (old_form, new_form):
            raise ClbenchError("online ewc-full cannot mix exact and K-FAC Fishers across tasks; "
                               "set fisher_form explicitly")
        as_matrix = [x if form == "matrix" else x.T @ x for form, x in ((old_form, old), (new_form, m))]
        return "matrix", self.decay * as_matrix[0] + as_matrix[1]

    def quadratic_form(self, importance: tuple[str, Any], anchor: torch.Tensor) -> torch.Tensor:
        form, m = importance
        if form == "kfac":  # per layer tr(G dW A dW^T), dW against views of the flat anchor
            anchor_of, total = self.split(anchor), 0.0
            for module, A, G, weight in m:
                d_bias = None if module.bias is None else module.bias - anchor_of[module.bias]
                total = total + weight * fisher.kfac_quadratic(module, A, G, module.weight - anchor_of[module.weight],
                                                               d_bias)
            return total
        d = self.flat_parameters() - anchor
        return (m @ d).pow(2).sum() if form == "rows" else d @ (m @ d)

    def split(self, flat: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Views of a flat vector shaped like each trainable parameter."""
        views, offset = {}, 0
        for p in self.trainable_parameters():
            views[p] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return views

    def extra_results(self) -> dict:
        return {**super().extra_results(), "fisher_form": self.form_used}

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(EWCDiag)
class EWCDiagAdapter(L2Adapter):
    """Per-task EWC's penalties sum_k F_k (theta - theta_k)^2 are one quadratic: F (theta - a)^2 + c with
    F = sum_k F_k, a = sum_k F_k theta_k / F and the constant c (kept, so the loss curves match); the online
    form holds one (F, anchor) pair already."""

    state_in_members = True  # refresh stacks everything from the members (see Adapter)

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.fisher_kind, strategy.form)

    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.strength = member_numbers(self.g.members, "strength", self.g.dev)
        pairs = [pair for x in s for pair in x.penalties]
        folded = getattr(self, "folded_from", None)  # the pairs last folded (held, so none is a new one)
        if folded is not None and len(folded) == len(pairs) and all(
                F is F0 and a is a0 for (F, a), (F0, a0) in zip(pairs, folded)):
            return  # the same penalties as at the last refresh (refresh runs before and after every task)
        self.folded_from = pairs
        self.anchor = self.importance = self.constant = None
        if not s[0].penalties:
            return
        Fk = torch.stack([torch.stack([F for F, _ in x.penalties]) for x in s])  # (B, K, P)
        Tk = torch.stack([torch.stack([a for _, a in x.penalties]) for x in s])
        if Fk.shape[1] == 1:
            self.importance, self.anchor = Fk[:, 0], Tk[:, 0]
            return
        Fk, Tk = Fk.double(), Tk.double()
        F, FT = Fk.sum(1), (Fk * Tk).sum(1)
        anchor = torch.where(F > 0, FT / F.clamp_min(torch.finfo(F.dtype).tiny), 0.0)
        self.constant = ((Fk * Tk * Tk).sum((1, 2)) - (F * anchor * anchor).sum(1)).float()
        self.importance, self.anchor = F.float(), anchor.float()

    def penalty(self) -> torch.Tensor | None:
        return self.pull(0.5)

    def pull(self, factor: float) -> torch.Tensor | None:
        """factor * strength * (F (theta - a)^2 + c), its gradient left in the weights' .grad (quadratic_pull)."""
        if self.anchor is None:
            return None
        held = getattr(self, "pull_weight", None)
        if held is None or held[0] is not self.importance or held[1] != factor:
            held = self.pull_weight = (self.importance, factor, 2 * factor * self.strength[:, None] * self.importance)
        value = self.g.net.quadratic_pull(self.anchor, held[2])
        return value if self.constant is None else value.add_(factor * self.strength * self.constant)

    def after_task(self, i: int) -> bool:
        """The diagonal Fisher of task i for all members at once: for one bias-free Linear layer under MSE
        (true Fisher) entry (k, j) is mean_n x_nj^2 for every output k; for any stacked MLP the per-sample
        outer products of fisher.diagonal. Members with different fisher_samples run their own after_task."""
        X = batched_fisher.linear_true_fisher_inputs(self.g, i)
        if X is not None:
            out = self.g.net.params[0].shape[1]
            new = (X * X).mean(1)[:, None, :].expand(-1, out, -1).reshape(self.g.B, -1)
        else:
            new = batched_fisher.diagonal_fisher(self.g, i)
            if new is None:
                return False
        s = [m.strategy for m in self.g.members]
        anchor = self.g.net.flat().detach().clone()
        if s[0].form == "per-task":  # one more penalty each
            for b, x in enumerate(s):
                x.penalties.append((new[b], anchor[b]))
            return True
        decay = member_numbers(self.g.members, "decay", self.g.dev)
        importance = new if s[0].importance is None else decay[:, None] * torch.stack([x.importance for x in s]) + new
        for b, x in enumerate(s):
            x.importance, x.anchor = importance[b], anchor[b]
        return True

    def bytes_per_member(self, strategy, stream, model):
        return 3 * count_parameters(model) * 4


class BatchedKronecker(torch.autograd.Function):
    """Per member b: tr(G_b dW_b A_b dW_b^T); the gradient 2 G dW A is the product the value needs."""

    @staticmethod
    def forward(ctx, dW, A, G):
        GdWA = torch.bmm(torch.bmm(G, dW), A)
        ctx.save_for_backward(GdWA)
        return (dW * GdWA).flatten(1).sum(1)

    @staticmethod
    def backward(ctx, grad):
        (GdWA,) = ctx.saved_tensors
        return 2 * grad[:, None, None] * GdWA, None, None


@batched_form(EWCFull)
class EWCFullAdapter(EWCDiagAdapter):
    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.fisher_kind, strategy.fisher_form, strategy.fisher_samples, strategy.max_entries)

    @staticmethod
    def refuse(stream: Stream, strategy: Strategy) -> str | None:
        if strategy.form == "per-task" and len(stream.tasks) > 2:
            return "per-task ewc-full on more than two tasks has no batched form (form=online has; on two tasks they agree)"
        return L2Adapter.refuse(stream, strategy)

    def refresh(self) -> None:
        if getattr(self, "factor", None) is not None:
            return  # state kept here (see after_task)
        L2Adapter.refresh(self)
        self.factor = None
        s = [m.strategy for m in self.g.members]
        self.form = None if s[0].importance is None else s[0].importance[0]
        if self.form is None:
            return
        if any(x.importance[0] != self.form for x in s):
            raise ClbenchError("batched ewc-full members ended with different Fisher forms; run them unbatched "
                               "(--batch off) or set fisher_form explicitly")
        if self.form in ("rows", "matrix"):
            self.importance = torch.stack([x.importance[1] for x in s])
            for b, x in enumerate(s):  # views, so the stacked copy is the only one
                x.importance = (self.form, self.importance[b])
            return
        terms = [x.importance[1] for x in s]
        linears = [m for m in s[0].model.modules() if isinstance(m, nn.Linear)]
        self.kfac = []
        for k in range(len(terms[0])):
            layer = linears.index(terms[0][k][0])
            self.kfac.append((layer, torch.stack([t[k][1] for t in terms]), torch.stack([t[k][2] for t in terms]),
                              torch.tensor([float(t[k][3]) for t in terms], device=self.g.dev)))
        offsets, total = [], 0
        for p in self.g.net.params:
            offsets.append(total)
            total += p[0].numel()
        self.offsets = offsets

    def after_task(self, i: int) -> bool:
        """Exact true Fisher of one bias-free Linear layer under MSE, for all members at once.

        The Fisher rows are the output Jacobian rows e_k (x) x_n / sqrt(n), so with X the stacked inputs
        ||M vec(dW)||^2 = ||X dW^T||_F^2: X is the exact Fisher in factored form (accumulated as the rows
        are: older rows scaled by sqrt(decay)). Any other case runs the members' own after_task."""
        X = batched_fisher.linear_true_fisher_inputs(self.g, i)
        s = [m.strategy for m in self.g.members]
        if X is None or any(x.fisher_form == "kfac" for x in s):
            return False
        P, K = self.g.net.params[0][0].numel(), X.shape[1] * self.g.net.params[0].shape[1]
        if any(x.fisher_form == "auto" and min(K, P) * P > x.max_entries for x in s):
            return False  # the engine would use K-FAC
        if getattr(self, "factor", None) is None and s[0].importance is not None:
            return False  # the members already hold another form
        decay = member_numbers(self.g.members, "decay", self.g.dev)
        X = X / X.shape[1] ** 0.5
        self.factor = X if getattr(self, "factor", None) is None else torch.cat(
            [decay.sqrt()[:, None, None] * self.factor, X], 1)
        self.anchor = self.g.net.flat().detach().clone()
        self.strength = member_numbers(self.g.members, "strength", self.g.dev)
        for b, x in enumerate(s):
            x.anchor, x.form_used, x.importance = self.anchor[b], "exact", ("rows (batched, factored)", None)
        return True

    def penalty(self) -> torch.Tensor | None:
        if self.anchor is None:
            return None
        if self.factor is not None:
            dW = self.g.net.params[0] - self.anchor.view_as(self.g.net.params[0])
            return 0.5 * self.strength * StackedLinear.apply(self.factor, dW).pow(2).flatten(1).sum(1)
        if self.form == "rows":
            d = self.g.net.flat() - self.anchor
            return 0.5 * self.strength * torch.bmm(self.importance, d[:, :, None]).pow(2).flatten(1).sum(1)
        if self.form == "matrix":
            d = self.g.net.flat() - self.anchor
            return 0.5 * self.strength * (d * torch.bmm(self.importance, d[:, :, None])[:, :, 0]).sum(1)
        total = 0.0
        params = self.g.net.params
        for layer, A, G, weight in self.kfac:
            w, b = self.g.net.linears[layer]
            shape = params[w].shape
            dW = params[w] - self.anchor[:, self.offsets[w]:self.offsets[w] + shape[1] * shape[2]].view(shape)
            if b is not None:
                n = params[b].shape[1]
                db = params[b] - self.anchor[:, self.offsets[b]:self.offsets[b] + n]
                dW = torch.cat([dW, db[:, :, None]], 2)
            total = total + weight * BatchedKronecker.apply(dW, A, G)
        return 0.5 * self.strength * total

    def bytes_per_member(self, strategy, stream, model):
        params, samples = count_parameters(model), min(strategy.fisher_samples, len(stream.tasks[0].train_x))
        linears = [m for m in model if isinstance(m, nn.Linear)]
        if (stream.loss == "mse" and strategy.fisher_kind == "true" and len(linears) == 1
                and linears[0].bias is None and strategy.fisher_form != "kfac"):  # factored: inputs only
            return 3 * params * 4 + samples * len(stream.tasks) * linears[0].in_features * 4
        rows = samples * stream.num_outputs * len(stream.tasks)
        return 3 * params * 4 + 2 * min(rows, params) * params * 4
