"""Batched runs: many small runs trained in lockstep as one stacked model.

``run_batched(members)`` trains B members (each a stream, a strategy and a
seed) at once. The members' models (``linear`` or ``mlp``: Flatten, Linear and
elementwise activations) are stacked into (B, out, in) weights and every step
is one batched matmul per layer for all members; each member keeps its own
data (e.g. one cell of a (rho_a, rho_b) grid), its own batch order (the
engine's, from its seed), its own numeric strategy arguments (EWC strength,
gating alpha ...) and its own global RNG stream. Members do not interact: each
gets the gradient of its own loss, so every member's R equals the engine's
separate run up to float rounding.

The hot loop is batched, and so is the once-a-task work that is heavy (the EWC
Fisher). Other once-a-task hooks (``before_task``, ``after_task``: anchors,
gates, probes, LwF's copy of the model) run the ordinary way on the member's own
strategy object, whose model is loaded with the member's weights first; a small
per-strategy adapter (``ADAPTERS``) then stacks what the hot loop needs
(anchors, importances, gates, masks, old models) and implements the penalty,
gating, gradient masks, path integrals, replay or distillation in batched form.
Members with equal inputs share one copy of them (see ``_Sharing``); on
permuted-pixel streams the stored images are held once and each member's pixel
order is applied per batch, or folded into the first layer's weights for
evaluation (see ``_Permuted``). A strategy without an adapter (l2p, iru, user
strategies) or a model of another kind is not batchable: :func:`batchable` says
why, and callers run it with ``clbench.run``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clbench.core import metrics
from clbench.core.engine import (Result, TrainingDiverged, _finite, _peak_memory_mb, _scores, make_optimizer, resolve_device,
                            seed_torch, versions)
from clbench.core.errors import ClbenchError
from clbench.fisher.estimators import fisher_losses
from clbench.models.networks import ACTIVATIONS, build_model, count_parameters
from clbench.core.strategy import Strategy
from clbench.data.transforms import PixelPermutation
from clbench.core.types import Stream, Task

ELEMENTWISE = tuple(ACTIVATIONS.values())
DEFAULT_MEMORY_MB = 2048


@dataclass
class Member:
    """One run of a batch: what ``clbench.run(stream, strategy, seed=seed, config=config)`` would take."""

    stream: Stream
    strategy: Strategy
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)


# --- stacked model --------------------------------------------------------------------------------------------

class _StackedLinear(torch.autograd.Function):
    """x (B, N, in) times w (B, out, in) transposed, with the weight gradient formed as g^T x (B, out, in), the
    layout F.linear's backward uses. Autograd through ``bmm(x, w.transpose(1, 2))`` forms x^T g (B, in, out)
    and transposes it: 2-3x slower for a wide input and a narrow output (the linear student)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.bmm(x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        grad_x = torch.bmm(grad, w) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


@dataclass
class _Sharing:
    """Which row of a (V, N, ...) input each of B members reads: members grouped by row, so a row is
    multiplied by all its members' first-layer weights at once ((N, in) x (in, k * out), one matmul)."""

    rows: list[int]  # member -> row
    index: torch.Tensor  # the same, on the device
    groups: list[tuple[int, slice | torch.Tensor]]  # (row, its members: a slice where they are contiguous)

    @staticmethod
    def of(rows: list[int], device: torch.device, least: int = 4) -> "_Sharing | None":
        """None when members share too little to gain (fewer than ``least`` a row on average: the stacked
        matmul of one row per member is faster then)."""
        if least * len(set(rows)) > len(rows):
            return None
        members: dict[int, list[int]] = {}
        for b, r in enumerate(rows):
            members.setdefault(r, []).append(b)
        groups = [(r, slice(bs[0], bs[0] + len(bs)) if bs == list(range(bs[0], bs[0] + len(bs)))
                   else torch.tensor(bs, device=device)) for r, bs in members.items()]
        return _Sharing(rows, torch.tensor(rows, device=device), groups)


def _shared_matmul(x: torch.Tensor, w: torch.Tensor, sharing: _Sharing, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """x (V, N, in) times w (B, out, in) transposed, plus bias (B, out) if given -> (B, N, out), member b
    reading row ``sharing.rows[b]``: one (N, in) x (in, k * out) matmul per row. When one row serves all
    members in order, the result is a transposed view of that matmul (no copy; bmm reads it as it is)."""
    B, out, features = w.shape
    groups = sharing.groups
    if len(groups) == 1 and groups[0][1] == slice(0, B):
        flat = x[groups[0][0]] @ w.reshape(-1, features).T
        if bias is not None:
            flat += bias.reshape(-1)
        return flat.view(x.shape[1], B, out).transpose(0, 1)
    y = x.new_empty(B, x.shape[1], out)
    for row, members in groups:
        wg = w[members]
        y[members] = (x[row] @ wg.reshape(-1, features).T).view(x.shape[1], len(wg), -1).transpose(0, 1)
    return y if bias is None else y.add_(bias[:, None, :])


class _SharedLinear(torch.autograd.Function):
    """Members' first layer on shared inputs: x (V, N, in), w (B, out, in) -> (B, N, out), member b reading
    row ``sharing.rows[b]`` of x. The input needs no gradient (it is data)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, sharing: _Sharing) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.sharing = sharing
        return _shared_matmul(x, w, sharing)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        x, w = ctx.saved_tensors
        gw = torch.empty_like(w)
        for row, members in ctx.sharing.groups:
            gg = grad[members]  # (k, N, out) -> (k out, N), small
            rows = gg.transpose(1, 2).reshape(-1, gg.shape[1])
            if isinstance(members, slice):  # written in place: no weight-sized concatenation
                torch.mm(rows, x[row], out=gw[members].view(-1, w.shape[2]))
            else:
                gw[members] = (rows @ x[row]).view(len(gg), *w.shape[1:])
        return None, gw, None


class _Net:
    """B copies of a Sequential of Flatten / Linear / elementwise activations as stacked (B, ...) leaf tensors."""

    def __init__(self, models: list[nn.Module]) -> None:
        self.ops: list[tuple[str, Any]] = []
        self.linears: list[tuple[int, int | None]] = []  # (weight, bias) positions in self.params
        position = 0
        for module in models[0]:
            if isinstance(module, nn.Flatten):
                self.ops.append(("flatten", None))
            elif isinstance(module, nn.Linear):
                bias = None if module.bias is None else position + 1
                self.linears.append((position, bias))
                self.ops.append(("linear", len(self.linears) - 1))
                position += 1 if bias is None else 2
            else:
                self.ops.append(("act", module))
        self.params = [torch.stack([p.detach() for p in group]).requires_grad_(True)
                       for group in zip(*(m.parameters() for m in models))]

    def forward(self, x: torch.Tensor, gates: list[torch.Tensor | None] | None = None,
                sharing: _Sharing | None = None, capture: list | None = None,
                first_weight: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, *input) -> (B, N, outputs); ``gates[k]`` (B, in) multiplies the input of Linear k.

        With ``sharing``, x is (V, N, *input) and member b reads row ``sharing.rows[b]`` (members with the
        same data and batch order); the first Linear layer maps it to (B, N, out). ``first_weight``, with
        sharing: the first Linear's weights to use instead, its gate already folded in (see folded_first).
        ``capture`` (ungated, unshared calls) receives (Linear index, its input, its output) per Linear layer."""
        # without autograd (evaluation): bias and ReLU applied in place, no (B, N, width) temporaries
        in_place = not torch.is_grad_enabled() and capture is None
        made_here = False  # whether x is a tensor made in this call (one an in-place ReLU may overwrite)
        for op, arg in self.ops:
            if op == "flatten":
                x = x.flatten(2)
            elif op == "linear":
                w, b = self.linears[arg]
                inputs, weight, bias = x, self.params[w], None if b is None else self.params[b]
                gate = None if gates is None else gates[arg]
                if sharing is not None:  # a gate on the shared input is folded into the weights
                    weight = self.folded_first(gate) if first_weight is None else first_weight
                    if in_place:
                        x, bias = _shared_matmul(x, weight, sharing, bias), None
                    else:
                        x = _SharedLinear.apply(x, weight, sharing)
                    sharing = None
                elif in_place:
                    x = x if gate is None else x * gate[:, None, :]
                    x = (torch.bmm(x, weight.transpose(1, 2)) if bias is None
                         else torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2)))
                    bias = None
                else:
                    x = _StackedLinear.apply(x if gate is None else x * gate[:, None, :], weight)
                if bias is not None:
                    x = x + bias[:, None, :]
                if capture is not None:
                    capture.append((arg, inputs, x))
                made_here = True
            elif in_place and made_here and isinstance(arg, nn.ReLU):
                x = x.relu_()
            else:
                x, made_here = arg(x), True
        return x

    def folded_first(self, gate: torch.Tensor | None, input_order: torch.Tensor | None = None) -> torch.Tensor:
        """The first Linear's weights (B, out, in) times its input gate (B, in), with member b reading input
        unit input_order[b, i] as its unit i (a pixel permutation folded into the weights)."""
        weight = self.params[self.linears[0][0]]
        weight = weight if gate is None else weight * gate[:, None, :]
        return weight if input_order is None else weight.gather(2, input_order[:, None, :].expand_as(weight))

    def flat(self) -> torch.Tensor:
        """(B, P): every member's parameters in ``model.parameters()`` order (differentiable; a view of the
        weights themselves when there is one parameter, e.g. the linear student)."""
        if len(self.params) == 1:
            return self.params[0].reshape(len(self.params[0]), -1)
        return torch.cat([p.reshape(len(p), -1) for p in self.params], 1)

    def parts(self) -> Iterator[tuple[torch.Tensor, slice]]:
        """Each stacked parameter with its columns in ``flat()``."""
        start = 0
        for p in self.params:
            yield p, slice(start, start + p[0].numel())
            start += p[0].numel()

    def quadratic(self, anchor: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Per member: sum_j weight_j (theta_j - anchor_j)^2 over ``flat()`` (weight 1 when None), computed per
        parameter, without concatenating the weights."""
        return sum(_Quadratic.apply(p.reshape(len(p), -1), anchor[:, part], None if weight is None else weight[:, part])
                   for p, part in self.parts())

    @torch.no_grad()
    def load(self, b: int, model: nn.Module) -> None:
        for p, stacked in zip(model.parameters(), self.params):
            p.copy_(stacked[b])


def _model_ok(model: nn.Module) -> str | None:
    if not isinstance(model, nn.Sequential) or any(True for _ in model.buffers()):
        return "the model is not a plain Sequential without buffers"
    for m in model:
        if not isinstance(m, (nn.Flatten, nn.Linear, *ELEMENTWISE)):
            return f"the model has a {type(m).__name__} layer (batched runs take Flatten, Linear and activations)"
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
            return "the model flattens other dimensions than all but the first"
    return None


# --- per-strategy adapters --------------------------------------------------------------------------------------

class Adapter:
    """Batched hot loop of one strategy class; the default is plain training (finetune, joint)."""

    order_matters = False  # True when the hot loop depends on the order of samples in a batch (replay)

    def __init__(self, group: "_Group") -> None:
        self.g = group

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        """Non-numeric settings that members of one batch must share."""
        return ()

    def refresh(self) -> None:
        """Stack the members' state after their before_task / after_task hooks ran."""

    def before_after_task(self) -> None:
        """Write batched state back to the members before their after_task hooks run."""

    def after_task(self, i: int) -> bool:
        """Do every member's after_task for task index i in batched form; False: run the members' own."""
        return False

    def gates(self, j: int) -> list[torch.Tensor | None] | None:
        return None

    def penalty(self) -> torch.Tensor | None:
        return None

    def extra_loss(self, x: torch.Tensor, y: torch.Tensor, t: int, loss: torch.Tensor, outputs: torch.Tensor,
                   sharing: _Sharing | None) -> torch.Tensor:
        """loss plus any term on the batch (x, y) of task t; ``outputs`` are all output units (B, N, outputs)
        of the members for x (read with ``sharing``)."""
        return loss

    def after_backward(self) -> None:
        """Adjust gradients before the optimizer step (plasticity masks)."""

    def after_step(self) -> None:
        """Called after every optimizer step (SI path integrals)."""

    def bytes_per_member(self, strategy: Strategy, stream: Stream, model: nn.Module) -> int:
        return 0


def _numbers(members: list[Member], attr: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([float(getattr(m.strategy, attr)) for m in members], device=device)


def _linear_true_fisher_inputs(g: "_Group", i: int) -> torch.Tensor | None:
    """The first fisher_samples inputs of task i, (B, n, in), when every member's model is one bias-free
    Linear layer, the loss MSE and the Fisher the true one (rows e_k (x) x_n); else None."""
    s = [m.strategy for m in g.members]
    if (g.loss_kind != "mse" or len(g.net.linears) != 1 or g.net.linears[0][1] is not None
            or any(x.fisher_kind != "true" for x in s) or len({x.fisher_samples for x in s}) != 1):
        return None
    x, _ = g.full(i)
    return x[:, : min(s[0].fisher_samples, x.shape[1])].flatten(2)


def _true_fisher_scales(g: "_Group", i: int, captured: list, out: torch.Tensor) -> list[torch.Tensor] | None:
    """Per Linear layer, the true Fisher's expected squared gradient at the layer's output, (B, n, units), in
    closed form when the network is Linear, or Linear, activation, Linear, ungated: with W the output layer's
    rows of task i's head and r the activation's slope, for cross-entropy (p = softmax of the head)
    E_c[(p - e_c)^2] = p (1 - p) at the output and E_c[(W^T (p - e_c))^2] r^2 = ((p W^2) - (p W)^2) r^2 at the
    hidden layer; for the Gaussian (MSE) Fisher, 1 and (1 W^2) r^2. The same sum as one backward per class
    (fisher_losses), in one pass. None for other networks."""
    ops = [op for op, _ in g.net.ops if op != "flatten"]
    if g.adapter.gates(i) is not None or ops not in (["linear"], ["linear", "act", "linear"]):
        return None
    head = g.data[i]["head"]
    units = g.net.params[g.net.linears[-1][0]].shape[1]
    if g.loss_kind == "ce":
        p = torch.softmax(out, -1)
        last = p * (1 - p)
    else:
        p, last = None, torch.ones_like(out)
    if head is not None:  # units outside the head get no gradient
        last = torch.zeros(*out.shape[:2], units, device=out.device).scatter_(2, head[:, None, :].expand_as(last), last)
    if len(ops) == 1:
        return [last]
    w = g.net.params[g.net.linears[-1][0]].detach().float()  # (B, units, hidden)
    if head is not None:
        w = w.gather(1, head[:, :, None].expand(-1, -1, w.shape[2]))
    z = captured[0][2].detach().float().requires_grad_(True)
    act = next(arg for op, arg in g.net.ops if op == "act")
    slope = torch.autograd.grad(act(z).sum(), z)[0]
    spread = torch.bmm(p, w * w) - torch.bmm(p, w) ** 2 if p is not None else (w * w).sum(1)[:, None, :]
    return [spread * slope**2, last]


def _diagonal_fisher(g: "_Group", i: int, batch_size: int = 512) -> torch.Tensor | None:
    """fisher.diagonal (true or empirical) of task i for every member, (B, P), on the stacked model: the
    squared per-sample gradient of Linear k is (g_n^2)(a_n^2)^T, with a_n its input and g_n the gradient at
    its output (see fisher.fisher_losses). None when the members differ in fisher_samples."""
    s = [m.strategy for m in g.members]
    if len({x.fisher_samples for x in s}) != 1:
        return None
    kind, d = s[0].fisher_kind, g.data[i]
    n = min(s[0].fisher_samples, d["train_x"].n)
    diag = [torch.zeros_like(p) for p in g.net.params]

    def add(captured: list, squared_grads: list[torch.Tensor]) -> None:
        for (layer, a, _), g2 in zip(captured, squared_grads):
            w, b = g.net.linears[layer]
            diag[w] += torch.bmm(g2.transpose(1, 2), a.detach().float() ** 2)
            if b is not None:
                diag[b] += g2.sum(1)

    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        captured: list = []
        out = g.predict(g.member_rows(d, "train_x", part), i, capture=captured).float()
        scales = _true_fisher_scales(g, i, captured, out.detach()) if kind == "true" else None
        if scales is not None:
            add(captured, scales)
            continue
        losses = fisher_losses(out, d["train_y"][:, part], kind, g.loss_kind)
        for loss_index, (loss, weight) in enumerate(losses):
            grads = torch.autograd.grad(loss, [o for _, _, o in captured], retain_graph=loss_index + 1 < len(losses))
            add(captured, [grad.float() ** 2 if weight is None else grad.float() ** 2 * weight[..., None]
                           for grad in grads])
    return torch.cat([t.reshape(g.B, -1) for t in diag], 1) / n


class _Quadratic(torch.autograd.Function):
    """Per member b: sum_j w_bj (theta_bj - anchor_bj)^2 (w = 1 when None), gradient 2 w (theta - anchor):
    the value and its gradient in a few passes over the (B, P) weights, where autograd would make several."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, anchor: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d = theta - anchor
        wd = d if w is None else w * d
        ctx.save_for_backward(wd)
        return torch.linalg.vecdot(wd, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (wd,) = ctx.saved_tensors
        return wd * (2 * grad)[:, None], None, None


class L2Adapter(Adapter):
    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.anchor = None if s[0].anchor is None else torch.stack([x.anchor for x in s])
        self.strength = _numbers(self.g.members, "strength", self.g.dev)

    def penalty(self) -> torch.Tensor | None:
        if self.anchor is None:
            return None
        return 0.5 * self.strength * self.g.net.quadratic(self.anchor, None)


class EWCDiagAdapter(L2Adapter):
    """Per-task EWC's penalties sum_k F_k (theta - theta_k)^2 are one quadratic: F (theta - a)^2 + c with
    F = sum_k F_k, a = sum_k F_k theta_k / F and the constant c (kept, so the loss curves match); the online
    form holds one (F, anchor) pair already."""

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.fisher_kind, strategy.form)

    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.strength = _numbers(self.g.members, "strength", self.g.dev)
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
        if self.anchor is None:
            return None
        quadratic = self.g.net.quadratic(self.anchor, self.importance)
        return 0.5 * self.strength * (quadratic if self.constant is None else quadratic + self.constant)

    def after_task(self, i: int) -> bool:
        """The diagonal Fisher of task i for all members at once: for one bias-free Linear layer under MSE
        (true Fisher) entry (k, j) is mean_n x_nj^2 for every output k; for any stacked MLP the per-sample
        outer products of fisher.diagonal. Members with different fisher_samples run their own after_task."""
        X = _linear_true_fisher_inputs(self.g, i)
        if X is not None:
            out = self.g.net.params[0].shape[1]
            new = (X * X).mean(1)[:, None, :].expand(-1, out, -1).reshape(self.g.B, -1)
        else:
            new = _diagonal_fisher(self.g, i)
            if new is None:
                return False
        s = [m.strategy for m in self.g.members]
        anchor = self.g.net.flat().detach().clone()
        if s[0].form == "per-task":  # one more penalty each
            for b, x in enumerate(s):
                x.penalties.append((new[b], anchor[b]))
            return True
        decay = _numbers(self.g.members, "decay", self.g.dev)
        importance = new if s[0].importance is None else decay[:, None] * torch.stack([x.importance for x in s]) + new
        for b, x in enumerate(s):
            x.importance, x.anchor = importance[b], anchor[b]
        return True

    def bytes_per_member(self, strategy, stream, model):
        return 3 * count_parameters(model) * 4


class _BatchedKronecker(torch.autograd.Function):
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


class EWCFullAdapter(EWCDiagAdapter):
    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.fisher_kind, strategy.fisher_form, strategy.fisher_samples, strategy.max_entries)

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
        X = _linear_true_fisher_inputs(self.g, i)
        s = [m.strategy for m in self.g.members]
        if X is None or any(x.fisher_form == "kfac" for x in s):
            return False
        P, K = self.g.net.params[0][0].numel(), X.shape[1] * self.g.net.params[0].shape[1]
        if any(x.fisher_form == "auto" and min(K, P) * P > x.max_entries for x in s):
            return False  # the engine would use K-FAC
        if getattr(self, "factor", None) is None and s[0].importance is not None:
            return False  # the members already hold another form
        decay = _numbers(self.g.members, "decay", self.g.dev)
        X = X / X.shape[1] ** 0.5
        self.factor = X if getattr(self, "factor", None) is None else torch.cat(
            [decay.sqrt()[:, None, None] * self.factor, X], 1)
        self.anchor = self.g.net.flat().detach().clone()
        self.strength = _numbers(self.g.members, "strength", self.g.dev)
        for b, x in enumerate(s):
            x.anchor, x.form_used, x.importance = self.anchor[b], "exact", ("rows (batched, factored)", None)
        return True

    def penalty(self) -> torch.Tensor | None:
        if self.anchor is None:
            return None
        if self.factor is not None:
            dW = self.g.net.params[0] - self.anchor.view_as(self.g.net.params[0])
            return 0.5 * self.strength * _StackedLinear.apply(self.factor, dW).pow(2).flatten(1).sum(1)
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
            total = total + weight * _BatchedKronecker.apply(dW, A, G)
        return 0.5 * self.strength * total

    def bytes_per_member(self, strategy, stream, model):
        params, samples = count_parameters(model), min(strategy.fisher_samples, len(stream.tasks[0].train_x))
        linears = [m for m in model if isinstance(m, nn.Linear)]
        if (stream.loss == "mse" and strategy.fisher_kind == "true" and len(linears) == 1
                and linears[0].bias is None and strategy.fisher_form != "kfac"):  # factored: inputs only
            return 3 * params * 4 + samples * len(stream.tasks) * linears[0].in_features * 4
        rows = samples * stream.num_outputs * len(stream.tasks)
        return 3 * params * 4 + 2 * min(rows, params) * params * 4


class SIAdapter(Adapter):
    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.c = _numbers(self.g.members, "c", self.g.dev)
        self.anchor = None if s[0].anchor is None else torch.stack([x.anchor for x in s])
        self.omega = None if s[0].omega is None else torch.stack([x.omega for x in s])
        if hasattr(s[0], "path"):  # set by before_task
            self.previous = torch.stack([x.previous for x in s])
            self.path = torch.stack([x.path for x in s])

    def before_after_task(self) -> None:
        for b, m in enumerate(self.g.members):
            m.strategy.path, m.strategy.previous = self.path[b].clone(), self.previous[b].clone()

    def penalty(self) -> torch.Tensor | None:
        if self.anchor is None:
            return None
        return self.c * self.g.net.quadratic(self.anchor, self.omega)

    @torch.no_grad()
    def after_step(self) -> None:
        for p, part in self.g.net.parts():  # per parameter: no (B, P) concatenation a step
            current = p.reshape(len(p), -1)
            grad = torch.zeros_like(current) if p.grad is None else p.grad.reshape(len(p), -1)
            self.path[:, part].addcmul_(grad, current - self.previous[:, part], value=-1.0)
            self.previous[:, part].copy_(current)

    def bytes_per_member(self, strategy, stream, model):
        return 6 * count_parameters(model) * 4


class ActivityGatingAdapter(Adapter):
    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.layers,)

    def gates(self, j: int) -> list[torch.Tensor | None]:
        members = self.g.members
        per_member = [m.strategy.gate(self.g.tasks[b][j]) for b, m in enumerate(members)]
        stacked = [torch.stack(g) for g in zip(*per_member)]
        linears = len(self.g.net.linears)
        return ([None] * (linears - len(stacked))) + stacked  # layers="hidden" gates all but the first


class PlasticityGatingAdapter(Adapter):
    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.masks = [torch.stack(g) for g in zip(*(x.masks for x in s))] if s[0].masks else []

    def after_backward(self) -> None:
        for (w, _), mask in zip(self.g.net.linears, self.masks):
            grad = self.g.net.params[w].grad
            if grad is not None:
                grad.mul_(mask[:, None, :])


class ReplayAdapter(Adapter):
    """Reservoir buffers stacked (B, size, ...); each member draws its picks and slots from its own RNG stream."""

    order_matters = True

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.buffer_size, strategy.replay_batch_size)

    def refresh(self) -> None:
        if not hasattr(self, "x"):
            self.x = self.y = self.task_ids = None
            self.filled = self.seen = 0
            self.size = self.g.members[0].strategy.buffer_size

    def extra_loss(self, x, y, t, loss, outputs, sharing):
        g, B, dev = self.g, self.g.B, self.g.dev
        picks = slots = None
        n, k = x.shape[1], 0
        if self.filled:
            k = min(g.members[0].strategy.replay_batch_size or n, self.filled)
        index = torch.arange(self.seen, self.seen + n, device=dev)
        with torch.no_grad():
            p_list, s_list, drawn = [], [], {}
            for b in range(B):
                key = g.rng_key(b)
                if key not in drawn:  # members whose random streams are equal draw alike: draw once
                    with g.rng(b):
                        picks = torch.randint(0, self.filled, (k,), device=dev) if k else None
                        slots = torch.where(index < self.size, index, (torch.rand(n, device=dev) * (index + 1)).long())
                    drawn[key] = (picks, slots, g.rng_states[b])
                picks, slots, g.rng_states[b] = drawn[key]
                p_list.append(picks)
                s_list.append(slots)
            slots = torch.stack(s_list)
            picks = torch.stack(p_list) if k else None
        if k:
            rows = g.member_index
            bx, by, bt = self.x[rows, picks], self.y[rows, picks], self.task_ids[rows, picks]
            for j in torch.unique(bt).tolist():
                per_sample = g.per_sample_loss(g.predict(bx, j), by)
                loss = loss + (per_sample * (bt == j)).sum(1) / k
        self._add(x.detach(), y, t, slots, sharing)
        return loss

    @torch.no_grad()
    def _add(self, x, y, t, slots, sharing) -> None:
        B, dev = self.g.B, self.g.dev
        if self.x is None:
            self.x = torch.empty((B, self.size, *x.shape[2:]), dtype=x.dtype, device=dev)
            self.y = torch.empty((B, self.size, *y.shape[2:]), dtype=y.dtype, device=dev)
            self.task_ids = torch.empty((B, self.size), dtype=torch.long, device=dev)
        # every member's kept samples in one write (a slot drawn twice in one write keeps one of the two, as in
        # the engine's own index assignment)
        member, sample = (slots < self.size).nonzero(as_tuple=True)
        slot = slots[member, sample]
        source = member if sharing is None else sharing.index[member]
        self.x[member, slot], self.y[member, slot], self.task_ids[member, slot] = x[source, sample], y[member, sample], t
        self.seen += x.shape[1]
        self.filled = min(self.seen, self.size)

    def finish(self) -> None:
        """Tell the members what their extra_results report."""
        for m in self.g.members:
            m.strategy.buffer.seen = self.seen

    def bytes_per_member(self, strategy, stream, model):
        task = stream.tasks[0]
        return strategy.buffer_size * int(task.inputs(task.train_x[:1]).numel() + 2) * 4


class LwFAdapter(Adapter):
    """The members' frozen previous models (their own after_task copies them) stacked; the distillation term
    of strategies/lwf.py per member, with its own alpha and temperature."""

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.t_squared,)

    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.old = None if s[0].old is None else _Net([x.old for x in s])
        for p in self.old.params if self.old is not None else []:
            p.requires_grad_(False)
        if self.old is not None and any(x.seen_units != s[0].seen_units for x in s):
            raise ClbenchError("batched lwf members have seen different output units; run them unbatched")
        self.units = torch.tensor(s[0].seen_units, device=self.g.dev)
        self.alpha = _numbers(self.g.members, "alpha", self.g.dev)
        self.temperature = _numbers(self.g.members, "temperature", self.g.dev)[:, None, None]

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


def _adapters() -> dict[type, type[Adapter]]:
    from clbench.strategies import (ActivityGating, AdaptiveGating, EWCDiag, EWCFull, Finetune, Joint, L2, LwF,
                                    PlasticityGating, Replay, SynapticIntelligence)

    return {Finetune: Adapter, Joint: Adapter, L2: L2Adapter, EWCDiag: EWCDiagAdapter, EWCFull: EWCFullAdapter,
            SynapticIntelligence: SIAdapter, ActivityGating: ActivityGatingAdapter,
            AdaptiveGating: ActivityGatingAdapter, PlasticityGating: PlasticityGatingAdapter, Replay: ReplayAdapter,
            LwF: LwFAdapter}


ADAPTERS: dict[type, type[Adapter]] = {}  # filled on first use (strategies import the core)


def adapter_for(strategy: Strategy) -> type[Adapter] | None:
    """The batched adapter of ``strategy``'s exact class, or None (subclasses may change any hook)."""
    if not ADAPTERS:
        ADAPTERS.update(_adapters())
    return ADAPTERS.get(type(strategy))


def batchable(stream: Stream, strategy: Strategy) -> str | None:
    """None if this stream and strategy can run batched, else why not."""
    if adapter_for(strategy) is None:
        return f"strategy {strategy.name or type(strategy).__name__!r} has no batched form"
    if any(t.augment is not None for t in stream.tasks):
        return "the stream augments training batches"
    if not getattr(strategy, "shuffle", True):
        return "shuffle=False (batches in stored order) has no batched form"
    if getattr(strategy, "anchor_initial", False):
        return "anchor_initial (a pull to the initial weights during task 1) has no batched form"
    if strategy.name == "ewc-full" and strategy.form == "per-task" and len(stream.tasks) > 2:
        return "per-task ewc-full on more than two tasks has no batched form (form=online has; on two tasks they agree)"
    return None


# --- one batch --------------------------------------------------------------------------------------------------

def _take(x: torch.Tensor, rows: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    """x (V, n, ...) at rows (K,) and samples ``index`` ((K, m), or one slice for all) -> (K, m, ...): whole
    samples copied by one index_select (faster than advanced indexing on two dimensions)."""
    n = x.shape[1]
    if isinstance(index, slice):
        index = torch.arange(n, device=x.device)[index].expand(len(rows), -1)
    flat = (rows[:, None] * n + index).reshape(-1)
    return x.reshape(-1, *x.shape[2:]).index_select(0, flat).view(*index.shape, *x.shape[2:])


class _Dense:
    """A task's distinct inputs, transformed and stacked: row r is x[r], (V, n, ...)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    @property
    def n(self) -> int:
        return self.x.shape[1]

    def take(self, rows: torch.Tensor, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """(K, m, ...): rows (K,) at samples ``index``, (K, m) or one slice for all."""
        return _take(self.x, rows, index)

    def all(self) -> torch.Tensor:
        return self.x


class _Permuted:
    """A task's distinct inputs when its transform is a pixel permutation (permuted MNIST): the stored images
    (uint8) once per distinct content, base (U, n, pixels), and each row's pixel order (V, pixels). A seed or
    (rho_a, rho_b) sweep then holds the images once per seed, not transformed once per task and member.
    Training batches are built as needed (the floats the transform gives); evaluation instead folds a row's
    order into the first layer's weights, so that all members read the shared images (see _Group.evaluate)."""

    def __init__(self, base: torch.Tensor, base_of: list[int], perm: torch.Tensor, shape: tuple[int, ...],
                 cache: dict) -> None:
        self.base, self.perm, self.shape, self.cache = base, perm, shape, cache
        self.base_of = torch.tensor(base_of, device=base.device)
        self.inverse = perm.argsort(1)  # scaled(base) @ w[:, inverse]^T = (scaled(base)[:, perm]) @ w^T
        self._all: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.perm)

    @property
    def n(self) -> int:
        return self.base.shape[1]

    def take(self, rows: torch.Tensor, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        x = _take(self.base, self.base_of[rows], index)
        x = x.gather(2, self.perm[rows][:, None, :].expand(-1, x.shape[1], -1))
        return torch.div(x, 255).view(*x.shape[:2], *self.shape)  # PixelPermutation's floats: gather, then scale

    def all(self) -> torch.Tensor:
        if self._all is None:
            self._all = self.take(torch.arange(len(self), device=self.base.device))
        return self._all

    def scaled(self) -> torch.Tensor:
        """The images in model units, (U, n, pixels), in their stored pixel order (one copy for all tasks)."""
        key = ("scaled", id(self.base))
        if key not in self.cache:
            self.cache[key] = torch.div(self.base, 255)
        return self.cache[key]


class _Canonical:
    """Maps each tensor to the first equal one seen (by object, else by a strided fingerprint, then compared in
    full), so that equal data held in separate streams is stored once."""

    def __init__(self) -> None:
        self.by_id: dict[int, torch.Tensor] = {}
        self.by_fingerprint: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if id(x) not in self.by_id:
            key = (tuple(x.shape), x.dtype, float(x.flatten()[::97].sum(dtype=torch.float64)))
            same = [y for y in self.by_fingerprint.setdefault(key, []) if torch.equal(x, y)]
            if not same:
                self.by_fingerprint[key].append(x)
            self.by_id[id(x)] = same[0] if same else x
        return self.by_id[id(x)]


@torch.no_grad()
def _permuted_inputs(members: list[Member], j: int, dev: torch.device, cache: dict
                     ) -> tuple[list[int], _Permuted, _Permuted]:
    """_distinct_inputs for tasks whose transform is a PixelPermutation: a base per distinct stored train and
    test images (by content), a row per distinct (train base, test base, pixel order). ``cache`` keeps the
    stacked bases from task to task (the tasks of a permuted stream share their images)."""
    canonical = cache.setdefault("canonical", _Canonical())
    bases: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] = ({}, {})  # per split: id -> images, in order
    row_of: dict[tuple[int, int, bytes], int] = {}
    rows, base_of, perms = [], ([], []), []
    for member in members:
        task = member.stream.tasks[j]
        which = []
        for split, x in zip(bases, (task.train_x, task.test_x)):
            x = split.setdefault(id(canonical(x)), canonical(x))
            which.append(list(split).index(id(x)))
        key = (*which, task.transform.perm.cpu().numpy().tobytes())
        if key not in row_of:
            row_of[key] = len(perms)
            for of, base in zip(base_of, which):
                of.append(base)
            perms.append(task.transform.perm)
        rows.append(row_of[key])
    perm, shape = torch.stack(perms).to(dev), (1, *task.transform.shape)
    out = []
    for split, of in zip(bases, base_of):
        key = ("images", tuple(split))
        if key not in cache:
            cache[key] = torch.stack([x.to(dev).reshape(len(x), -1) for x in split.values()])
        out.append(_Permuted(cache[key], of, perm, shape, cache))
    return rows, out[0], out[1]


@torch.no_grad()
def _distinct_inputs(members: list[Member], tasks: list[list[Task]], j: int, cache: dict | None = None
                     ) -> tuple[list[int], _Dense | _Permuted, _Dense | _Permuted]:
    """Task j's train and test inputs after the task transform, V rows of them, once per distinct content, and
    each member's row among them: members of a (rho_a, rho_b) grid with one seed and rho_a hold equal inputs
    in separate streams, a strength sweep's members of one seed the same stream. The transform writes in
    chunks straight into the stacked tensors (no second copy of them); pixel permutations are kept as the
    images and each row's order (_Permuted)."""
    if all(type(m.stream.tasks[j].transform) is PixelPermutation for m in members):
        return _permuted_inputs(members, j, tasks[0][j].train_x.device, {} if cache is None else cache)
    objects: dict[int, int] = {}  # task object -> the first member holding it
    for b, member in enumerate(members):
        objects.setdefault(id(member.stream.tasks[j]), b)

    def stacked(split: str) -> torch.Tensor:  # room for every object; pages of unused rows are never touched
        task = tasks[next(iter(objects.values()))][j]
        x = getattr(task, f"{split}_x")
        probe = task.inputs(x[:1])
        return torch.empty((len(objects), len(x), *probe.shape[1:]), dtype=probe.dtype, device=probe.device)

    train, test = stacked("train"), stacked("test")
    row_of: dict[int, int] = {}
    by_fingerprint: dict[tuple, list[int]] = {}
    rows = 0
    for key, b in objects.items():
        task = tasks[b][j]
        for x, out in ((task.train_x, train[rows]), (task.test_x, test[rows])):
            for start in range(0, len(x), 4096):
                out[start:start + 4096] = task.inputs(x[start:start + 4096])
        # a cheap fingerprint (a strided sample); equal ones are then compared in full
        fingerprint = tuple(float(x[rows].flatten()[::97].sum(dtype=torch.float64)) for x in (train, test))
        same = [r for r in by_fingerprint.get(fingerprint, [])
                if torch.equal(train[r], train[rows]) and torch.equal(test[r], test[rows])]
        if same:
            row_of[key] = same[0]  # and the next object overwrites this row
        else:
            row_of[key] = rows
            by_fingerprint.setdefault(fingerprint, []).append(rows)
            rows += 1
    return [row_of[id(m.stream.tasks[j])] for m in members], _Dense(train[:rows]), _Dense(test[:rows])


class _Group:
    """B compatible members: stacked model, stacked data, per-member generators and RNG streams."""

    def __init__(self, members: list[Member], models: list[nn.Module], dev: torch.device) -> None:
        self.B, self.dev = len(members), dev
        tasks = [[t.to(dev) for t in m.stream.tasks] for m in members]
        cache: dict = {}
        distinct = [_distinct_inputs(members, tasks, j, cache) for j in range(len(tasks[0]))]
        # members that share inputs side by side, so each set's stacked weights are one contiguous slice
        self.order = sorted(range(self.B), key=lambda b: [rows[b] for rows, _, _ in distinct])
        self.members = [members[b] for b in self.order]
        self.models = [models[b] for b in self.order]
        self.tasks = [tasks[b] for b in self.order]
        self.net = _Net(self.models)
        self.loss_kind = members[0].stream.loss
        self.rng_states: list[tuple] = [m._rng for m in self.members]
        self.member_index = torch.arange(self.B, device=dev)[:, None]  # (B, 1), for per-member gathers
        self.data = [self._stack(j, [rows[b] for b in self.order], train, test)
                     for j, (rows, train, test) in enumerate(distinct)]

    def _stack(self, j: int, rows: list[int], train: torch.Tensor, test: torch.Tensor) -> dict[str, Any]:
        """Task j's distinct inputs (see _distinct_inputs); targets and heads stacked per member."""
        with torch.no_grad():
            out: dict[str, Any] = {
                "rows": rows, "rows_index": torch.tensor(rows, device=self.dev),
                "sharing": _Sharing.of(rows, self.dev), "train_x": train, "test_x": test,
                "eval_sharing": None, "input_order": None,
                "train_y": torch.stack([self.tasks[b][j].train_y for b in range(self.B)]),
                "test_y": torch.stack([self.tasks[b][j].test_y for b in range(self.B)])}
        if isinstance(test, _Permuted):  # evaluation reads the shared images, the order folded into the weights
            out["eval_sharing"] = _Sharing.of([test.base_of[r].item() for r in rows], self.dev, least=1)
            out["input_order"] = test.inverse[out["rows_index"]]
        heads = [self.tasks[b][j].head for b in range(self.B)]
        out["head"] = None if heads[0] is None else torch.stack(heads)
        return out

    def full(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's whole training set of task j, (B, n, ...) (cached)."""
        d = self.data[j]
        if "full" not in d:
            d["full"] = (self.member_rows(d, "train_x"), d["train_y"])
        return d["full"]

    def member_rows(self, d: dict[str, Any], key: str, part: slice = slice(None)) -> torch.Tensor:
        """d[key] (distinct inputs) as one row per member, (B, N, ...); the stored tensor itself when it is."""
        if isinstance(d[key], _Dense) and d["rows"] == list(range(self.B)):
            return d[key].x[:, part]
        return d[key].take(d["rows_index"], part)

    def rng_key(self, b: int) -> bytes:
        """Member b's random stream state as bytes (equal for members whose streams are equal)."""
        cpu, cuda = self.rng_states[b]
        return cpu.numpy().tobytes() + (b"" if cuda is None else cuda.cpu().numpy().tobytes())

    @contextlib.contextmanager
    def rng(self, b: int) -> Iterator[None]:
        """Member b's global RNG stream (as its own run would have it)."""
        cpu, cuda = self.rng_states[b]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.dev)
        try:
            yield
        finally:
            self.rng_states[b] = (torch.get_rng_state(),
                                  torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None)

    def predict(self, x: torch.Tensor, j: int, gates=None, sharing: _Sharing | None = None,
                capture: list | None = None) -> torch.Tensor:
        return self.head(self.net.forward(x, self.adapter.gates(j) if gates is None else gates, sharing, capture), j)

    def head(self, out: torch.Tensor, j: int) -> torch.Tensor:
        """All output units (B, N, outputs) -> task j's head."""
        head = self.data[j]["head"]
        if head is None:
            return out
        return out.gather(2, head[:, None, :].expand(-1, out.shape[1], -1))

    def per_sample_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "ce":
            return F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none").view(out.shape[:2])
        return ((out - y) ** 2).mean(2)

    @torch.no_grad()
    def evaluate(self) -> np.ndarray:
        row = []
        for j in range(len(self.data)):
            d = self.data[j]
            gates = self.adapter.gates(j)
            total = torch.zeros(self.B, device=self.dev, dtype=torch.float64)
            n = d["test_x"].n
            folded = (None if d["eval_sharing"] is None  # once a task, not once a chunk
                      else self.net.folded_first(None if gates is None else gates[0], d["input_order"]))
            for start in range(0, n, 2048):
                part = slice(start, start + 2048)
                if folded is not None:
                    pred = self.head(self.net.forward(d["test_x"].scaled()[:, part], gates, d["eval_sharing"],
                                                      first_weight=folded), j)
                else:
                    x = d["test_x"].x[:, part] if d["sharing"] is not None else self.member_rows(d, "test_x", part)
                    pred = self.predict(x, j, gates, d["sharing"])
                y = d["test_y"][:, part]
                total += ((pred.argmax(2) == y).sum(1) if self.loss_kind == "ce"
                          else ((pred - y) ** 2).mean(2).sum(1))
            row.append(total / max(n, 1))
        return torch.stack(row, 1).cpu().numpy()

    def hook(self, b: int, name: str, *args) -> Any:
        """Run member b's own hook on its own model, loaded with its current weights."""
        strategy = self.members[b].strategy
        self.net.load(b, strategy.model)
        with self.rng(b):
            return getattr(strategy, name)(*args)


def _batch_sharing(rows: list[int], seeds: list[int], dev: torch.device) -> dict[str, Any]:
    """Members with the same input row and seed draw the same batch order (their generators are seeded
    alike and drawn in lockstep), so each such set reads one gathered batch."""
    keys: dict[tuple[int, int], int] = {}
    first, batch_of = [], []
    for b, key in enumerate(zip(rows, seeds)):
        if key not in keys:
            keys[key] = len(first)
            first.append(b)
        batch_of.append(keys[key])
    sharing = _Sharing.of(batch_of, dev)
    if sharing is None:  # too little to share: one gathered batch per member
        first = list(range(len(rows)))
    return {"first": torch.tensor(first, device=dev), "rows": torch.tensor([rows[b] for b in first], device=dev),
            "sharing": sharing}


def _signature(member: Member, model: nn.Module) -> str:
    s, stream = member.strategy, member.stream
    shapes = [(tuple(t.train_x.shape), tuple(t.train_y.shape), tuple(t.test_x.shape), tuple(t.test_y.shape),
               str(t.train_y.dtype), t.head is None) for t in stream.tasks]
    return json.dumps([type(s).__module__, type(s).__name__, adapter_for(s).signature(s), s.settings(), shapes,
                       stream.loss, stream.scenario, [tuple(p.shape) for p in model.parameters()],
                       [type(m).__name__ for m in model]], default=str)


def run_batched(members: list[Member], *, model_name: str | None = None, model_args: dict[str, Any] | None = None,
                device: str | torch.device = "auto", memory_mb: float | None = None, max_members: int | None = None
                ) -> list[Result | ClbenchError]:
    """Train every member, batching compatible ones; returns per member its Result (or the error its run raised).

    Members are grouped by what must match (stream shapes, strategy class and its non-numeric settings,
    training settings, model); each group runs in batches that fit ``memory_mb`` (default
    $CLBENCH_BATCH_MEMORY_MB, else 2048) and hold at most ``max_members``. A member that cannot be
    batched (see :func:`batchable`) raises; use ``clbench.run`` for it.
    """
    dev = resolve_device(device)
    budget = float(memory_mb or os.environ.get("CLBENCH_BATCH_MEMORY_MB", DEFAULT_MEMORY_MB)) * 2**20
    models, groups = [], {}
    for k, m in enumerate(members):
        why = batchable(m.stream, m.strategy)
        seed_torch(m.seed, dev)  # the engine's order: seed, model, strategy setup
        name = model_name or m.stream.defaults.model
        args = dict(m.stream.defaults.model_args) if model_name is None else {}
        args.update(model_args or {})
        model = build_model(name, m.stream.input_shape, m.stream.num_outputs, **args)
        why = why or _model_ok(model)
        if why:
            raise ClbenchError(f"member {k} cannot run batched: {why}; run it with clbench.run")
        model = m.strategy.setup(model.to(dev), m.stream)
        settings = m.strategy.settings()
        if settings["epochs"] < 0 or settings["batch_size"] < 1 or not settings["lr"] > 0:
            raise ClbenchError(f"training settings out of range: {settings}; need epochs >= 0, batch_size >= 1, lr > 0")
        m._rng = (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
        models.append(model)
        groups.setdefault(_signature(m, model), []).append(k)
    results: list[Result | ClbenchError | None] = [None] * len(members)
    for indices in groups.values():
        for chunk in _chunks(indices, members, models, budget, max_members):
            for k, r in zip(chunk, _run_group([members[k] for k in chunk], [models[k] for k in chunk], dev)):
                results[k] = r
    return results


def _member_bytes(m: Member, model: nn.Module, seen: set[int]) -> tuple[float, set[int]]:
    """Estimated memory of one member of a batch that already holds the tasks and images in ``seen`` (ids),
    and the ids it adds."""
    cost = 8 * count_parameters(model) * 4 + adapter_for(m.strategy)(None).bytes_per_member(m.strategy, m.stream, model)
    new: set[int] = set()
    for t in m.stream.tasks:
        if id(t) in seen | new:
            continue
        new.add(id(t))
        cost += 4 * (t.train_y.numel() + t.test_y.numel())
        if type(t.transform) is not PixelPermutation:
            cost += 4 * (t.train_x.numel() + t.test_x.numel())
            continue
        for x, scaled in ((t.train_x, False), (t.test_x, True)):  # images held once, as stored (_Permuted)
            if id(x) not in seen | new:
                new.add(id(x))
                cost += x.numel() * (x.element_size() + 4 * scaled)
    return cost, new


def _chunks(indices: list[int], members: list[Member], models: list[nn.Module], budget: float,
            max_members: int | None) -> Iterator[list[int]]:
    """Consecutive runs of members whose estimated memory fits the budget (at least one member each)."""
    chunk, used, seen = [], 0.0, set()
    for k in indices:
        cost, new = _member_bytes(members[k], models[k], seen)
        if chunk and (used + cost > budget or (max_members and len(chunk) >= max_members)):
            yield chunk
            chunk, used, seen = [], 0.0, set()
            cost, new = _member_bytes(members[k], models[k], seen)
        chunk.append(k)
        used, seen = used + cost, seen | new
    if chunk:
        yield chunk


def _run_group(members: list[Member], models: list[nn.Module], dev: torch.device) -> list[Result | ClbenchError]:
    g = _Group(members, models, dev)
    members, models, group_order = g.members, g.models, g.order  # in the group's order from here on
    g.adapter = adapter = adapter_for(members[0].strategy)(g)
    B, T = g.B, len(g.tasks[0])
    stream0, settings = members[0].stream, members[0].strategy.settings()
    bs = settings["batch_size"]
    generators = [torch.Generator(device=dev).manual_seed(m.seed) for m in members]
    all_full = not adapter.order_matters and all(bs >= d["train_x"].n for d in g.data)
    raw = np.full((B, T + 1, T), np.nan)
    curves: list[list[list[float]]] = [[] for _ in range(B)]
    failed: dict[int, ClbenchError] = {}
    start = time.perf_counter()

    def result(b: int, complete: bool) -> Result:
        m = members[b]
        R = _scores(raw[b], stream0.loss)
        config = dict(m.config)
        config.update(stream=m.stream.name, strategy=m.strategy.name, scenario=m.stream.scenario, device=str(dev),
                      precision="fp32", seed=m.seed, threads=torch.get_num_threads(), provenance=m.stream.provenance,
                      **settings)
        return Result(R=R.tolist(), metrics=metrics.summary(R) if complete else {}, loss_curves=curves[b],
                      wall_time_s=(time.perf_counter() - start) / B, peak_memory_mb=_peak_memory_mb(dev),
                      parameter_count=count_parameters(models[b]), config=config, seed=m.seed, versions=versions(),
                      extra={"uses_task_id_at_test": m.strategy.uses_task_id_at_test, **m.strategy.extra_results(),
                             "raw": _finite(raw[b].tolist()), "batched_members": B},
                      complete=complete)

    adapter.refresh()
    raw[:, 0] = g.evaluate()
    for i in range(T):
        for b in range(B):
            g.hook(b, "before_task", g.tasks[b][i])
        adapter.refresh()
        seen = g.tasks[0][: i + 1]
        train_on = [next(k for k, s in enumerate(seen) if s is t)
                    for t in members[0].strategy.train_tasks(g.tasks[0][i], seen)]
        optimizer = make_optimizer(settings["optimizer"], g.net.params, settings["lr"])
        steps = max(math.ceil(g.data[t]["train_x"].n / bs) for t in train_on)
        gates = {t: adapter.gates(t) for t in train_on}
        batches = {t: _batch_sharing(g.data[t]["rows"], [m.seed for m in members], dev) for t in train_on}
        for curve in curves:
            curve.append([])  # one list of epoch losses per task, as the engine records
        for epoch in range(settings["epochs"]):
            # the generators serve batch orders only: with every task of the stream full batch, no order is read
            orders = {t: None if all_full else torch.stack([
                torch.randperm(g.data[t]["train_x"].n, device=dev, generator=gen) for gen in generators])
                for t in train_on}
            epoch_loss = torch.zeros(B, device=dev)
            for step in range(steps):
                loss = torch.zeros(B, device=dev)
                for t in train_on:
                    d, order = g.data[t], orders[t]
                    if bs >= d["train_x"].n and not adapter.order_matters:
                        # full batch (e.g. teacher-student exact mode): the mean loss does not depend on the
                        # order, so skip the gather (sums differ from the engine's in rounding only)
                        x, y = (d["train_x"].all(), d["train_y"]) if d["sharing"] is not None else g.full(t)
                        sharing = d["sharing"]
                    else:
                        idx = order[:, (step * bs) % order.shape[1]:][:, :bs]
                        batch = batches[t]  # members with the same data and seed draw the same batches
                        x = d["train_x"].take(batch["rows"], idx[batch["first"]])
                        y = d["train_y"][g.member_index, idx]
                        sharing = batch["sharing"]
                    out = g.net.forward(x, gates[t], sharing)
                    loss = loss + g.per_sample_loss(g.head(out, t), y).mean(1)
                    penalty = adapter.penalty()
                    if penalty is not None:
                        loss = loss + penalty
                    loss = adapter.extra_loss(x, y, t, loss, out, sharing)
                for p in g.net.params:
                    p.grad = None
                loss.sum().backward()  # members do not interact: each gets its own loss's gradient
                adapter.after_backward()
                optimizer.step()
                adapter.after_step()
                epoch_loss += loss.detach()
            mean_loss = (epoch_loss / steps).tolist()
            for b in range(B):
                curves[b][-1].append(mean_loss[b])
                if b not in failed and not math.isfinite(mean_loss[b]):
                    failed[b] = TrainingDiverged(
                        f"training loss became {mean_loss[b]} on task {i + 1}, epoch {epoch + 1} "
                        f"(lr={settings['lr']}); lower the learning rate with --strategy-arg lr=...",
                        result(b, complete=False))
        adapter.before_after_task()
        if not adapter.after_task(i):
            for b in range(B):
                if b in failed:
                    continue
                try:
                    g.hook(b, "after_task", g.tasks[b][i])
                except ClbenchError as e:
                    failed[b] = e
        adapter.refresh()
        raw[:, i + 1] = g.evaluate()
    if hasattr(adapter, "finish"):
        adapter.finish()
    for b in range(B):
        g.net.load(b, members[b].strategy.model)
    results = [failed[b] if b in failed else result(b, complete=True) for b in range(B)]
    return [results[group_order.index(k)] for k in range(B)]  # back in the caller's order


# --- sweeps -----------------------------------------------------------------------------------------------------

TRAINING_KEYS = ("epochs", "lr", "batch_size", "optimizer")


def parse_batch(value: str | int) -> str | int:
    """``auto``, ``off`` or a positive integer (the most members one batch holds)."""
    if value in ("auto", "off"):
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ClbenchError(f"--batch takes auto, off or a positive integer (members per batch), got {value!r}")
    return n


def _group_key(cell: dict[str, Any]) -> str:
    """Cells that may share a batch: equal but for the seed and numeric stream/strategy arguments
    (training settings must match). run_batched splits further by shapes and settings."""
    wild = lambda args, keep=(): {k: ("#" if isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
                                       and k not in keep else v) for k, v in args.items()}
    key = {k: v for k, v in cell.items() if k != "seed"}
    key["stream_args"] = wild(cell["stream_args"], ("seed",))
    key["strategy_args"] = wild(cell["strategy_args"], TRAINING_KEYS)
    return json.dumps(key, sort_keys=True, default=str)


def plan(cells: list[dict[str, Any]], batch: str | int, jobs: int = 1) -> list[list[dict[str, Any]]]:
    """Cells in batches: compatible cells together, ``batch`` at most (auto: enough batches to keep ``jobs``
    workers busy). Memory limits are applied when a batch runs (see run_batched)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(_group_key(cell), []).append(cell)
    out = []
    for group in groups.values():
        size = batch if isinstance(batch, int) else max(1, math.ceil(len(group) / max(jobs, 1)))
        out += [group[k:k + size] for k in range(0, len(group), size)]
    return out


def run_cells(cells: list[dict[str, Any]], device: str, threads: int | None = None, commit: str | None = None,
              plugins: tuple[str, ...] = (), memory_mb: float | None = None) -> list[tuple]:
    """Run sweep cells, batching what can be; returns (cell, record, error) per cell, records as run_cell's."""
    return list(iter_cells(cells, device, threads, commit, plugins, memory_mb))


def iter_cells(cells: list[dict[str, Any]], device: str, threads: int | None = None, commit: str | None = None,
               plugins: tuple[str, ...] = (), memory_mb: float | None = None) -> Iterator[tuple]:
    """run_cells, yielding each (cell, record, error) as soon as it is known, so that a sweep stores every
    finished run before the next one starts (a killed sweep loses only the runs in flight)."""
    import clbench
    from clbench.core.registry import load_plugin
    from clbench.experiments.sweep import cell_record, cell_stream, cell_stream_key, run_cell

    for plugin in plugins:
        load_plugin(plugin)
    if threads:
        torch.set_num_threads(threads)
    streams: dict[str, Stream] = {}
    members, single = [], []
    for cell in cells:
        try:
            key = cell_stream_key(cell)
            if key not in streams:  # cells on the same stream share its data
                streams[key] = cell_stream(cell)
            strategy = clbench.make_strategy(cell["strategy"], **cell["strategy_args"])
        except Exception as e:  # noqa: BLE001  (reported per cell, as run_cell's errors are)
            yield cell, None, e
            continue
        if batchable(streams[key], strategy) is None:
            members.append((cell, Member(streams[key], strategy, cell["seed"], {"cell": cell})))
        else:
            single.append(cell)
    by_model: dict[str, list] = {}
    for cell, member in members:
        by_model.setdefault(json.dumps([cell["model"], cell["model_args"]], default=str), []).append((cell, member))
    for group in by_model.values():
        cell0 = group[0][0]
        try:
            results = run_batched([m for _, m in group], model_name=cell0["model"], model_args=cell0["model_args"],
                                  device=device, memory_mb=memory_mb)
        except Exception:  # noqa: BLE001  (a batch that cannot run falls back to one run per cell)
            single += [c for c, _ in group]
            continue
        for (cell, _), result in zip(group, results):
            if isinstance(result, Exception):
                yield cell, None, result
                continue
            yield cell, cell_record(result, cell, commit, "local"), None
    for cell in single:
        try:
            record = run_cell(cell, device, commit=commit)
        except Exception as e:  # noqa: BLE001
            yield cell, None, e
            continue
        yield cell, record, None


def sweep_outcomes(todo: list[dict[str, Any]], device: str, commit: str | None, jobs: int, batch: str | int,
                   threads: int | None = None) -> Iterator[tuple]:
    """What run_sweep stores: (cell, record, error) per cell, batches run in ``jobs`` processes (which exit
    when the sweep process dies)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from clbench.core.registry import LOADED_PLUGINS
    from clbench.experiments.sweep import _exit_with_parent

    batches = plan(todo, batch, jobs)
    budget = float(os.environ.get("CLBENCH_BATCH_MEMORY_MB", DEFAULT_MEMORY_MB)) / jobs
    if jobs == 1:
        for cells in batches:
            yield from iter_cells(cells, device, threads, commit=commit, memory_mb=budget)
        return
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_cells, cells, device, threads, commit, tuple(LOADED_PLUGINS), budget): cells
                   for cells in batches}
        for future in as_completed(futures):
            error = future.exception()
            if error is None:
                yield from future.result()
            else:
                yield from ((cell, None, error) for cell in futures[future])
