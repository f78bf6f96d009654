"""Incremental rank updates (IRU): rank-1 factor growth per task.

Hyder, Shao, Bhatt, Asif, Ravi, "Incremental Task Learning with Incremental
Rank Updates", ECCV 2022. Algorithm, per factorised layer (Linear, or Conv2d
with its kernel reshaped to out x in*k*k)::

    task 1:   W_1 = U_1 diag(s_1) V_1^T,  U_1, V_1 with r1 columns, s_1 = 1
    task t:   append r2 new columns to U and V;  s_t = [0 ... 0, 1 ... 1] (old, new)
              train the new columns, s_t, the task's bias and output layer
              W_t = U[:, :R_t] diag(s_t) V[:, :R_t]^T,  R_t = r1 + (t-1) r2
    after t:  freeze everything learned so far (factors, s_t, bias, head)

Each task keeps its own selector, biases and output layer (a per-task head),
so the task id is needed at test and old tasks are never changed: zero
forgetting by construction. Parameters added by task t (k-th slot, rank r =
r1 if t = 1 else r2) per factorised layer: r (n_in + n_out) + R_t + n_out
(bias, if the layer has one); plus one output layer (n_in + 1) n_out.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Stream, Task


class RankUpdateLayer(nn.Module):
    """A Linear or Conv2d layer stored as growing factors U, V with per-slot selectors and biases."""

    def __init__(self, layer: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            if layer.groups != 1 or layer.padding_mode != "zeros":
                raise ClbenchError("iru factorises Conv2d layers with groups=1 and zero padding only")
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            self.kernel = (layer.in_channels, *layer.kernel_size)
            self.n_in, self.n_out = math.prod(self.kernel), layer.out_channels
        else:
            self.n_in, self.n_out = layer.in_features, layer.out_features
        self.has_bias = layer.bias is not None
        self.device = layer.weight.device
        self.U, self.V = nn.ParameterList(), nn.ParameterList()  # one (n_out x r), (n_in x r) chunk per slot
        self.s, self.b = nn.ParameterList(), nn.ParameterList()  # one selector / bias per slot
        self.slot = 0

    def grow(self, r: int) -> None:
        """Add a slot: r new columns (random), selector [0 (old), 1 (new)], a bias copied from the last slot."""
        kw = dict(device=self.device)
        self.U.append(nn.Parameter(torch.randn(self.n_out, r, **kw) * math.sqrt(2.0 / r)))
        self.V.append(nn.Parameter(torch.randn(self.n_in, r, **kw) / math.sqrt(self.n_in)))
        old = sum(u.shape[1] for u in self.U) - r
        self.s.append(nn.Parameter(torch.cat([torch.zeros(old, **kw), torch.ones(r, **kw)])))
        if self.has_bias:
            self.b.append(nn.Parameter(self.b[-1].detach().clone() if len(self.b) else torch.zeros(self.n_out, **kw)))

    def slot_parameters(self, k: int) -> list[nn.Parameter]:
        return [self.U[k], self.V[k], self.s[k]] + ([self.b[k]] if self.has_bias else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.slot
        U = torch.cat(list(self.U[: k + 1]), 1)
        V = torch.cat(list(self.V[: k + 1]), 1)
        bias = self.b[k] if self.has_bias else None
        if not self.conv:  # x V diag(s) U^T + b, never forming W
            return F.linear(F.linear(x, V.T) * self.s[k], U, bias)
        h = F.conv2d(x, V.T.reshape(-1, *self.kernel), **self.conv_args) * self.s[k][:, None, None]
        return F.conv2d(h, U[:, :, None, None], bias)


def _replace(module: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, child in module.named_children():
        if child is old:
            setattr(module, name, new)
            return
        _replace(child, old, new)


@register_strategy("iru")
class IRU(Strategy):
    """Incremental rank updates: U diag(s_t) V^T layers, r2 new columns per task, frozen factors (Hyder et al. 2022)."""
    # r1 sets the first task's capacity, r2 the growth per task (integers; the notebook uses 11 and 1)
    search_space = {"r1": ("int", 2, 32), "r2": ("int", 1, 4)}

    scenarios = ("task", "domain")
    uses_task_id_at_test = True
    # the factorised layers diverge with SGD at the MNIST-family streams' lr 0.05 (NaN on task 1)
    train_defaults = {"optimizer": "adam", "lr": 1e-3}

    def __init__(self, r1: int = 11, r2: int = 1, **train) -> None:
        super().__init__(**train)
        if int(r1) < 1 or int(r2) < 1:
            raise ClbenchError(f"iru needs ranks r1 >= 1 and r2 >= 1, got r1={r1}, r2={r2}")
        self.r1, self.r2 = int(r1), int(r2)
        self.slots: dict[int, int] = {}
        self.growth: list[int] = []

    def setup(self, model: nn.Module, stream: Stream) -> nn.Module:
        model = super().setup(model, stream)
        weighted = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        others = [type(m).__name__ for m in model.modules() if not isinstance(m, (nn.Linear, nn.Conv2d))
                  and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))]
        if len(weighted) < 2 or others:
            raise ClbenchError("iru needs a model built from Linear/Conv2d layers (at least one hidden layer plus "
                               f"an output layer) and no other parameters or buffers, e.g. --model mlp; found {others or 'too few layers'}")
        self.layers = [RankUpdateLayer(m) for m in weighted[:-1]]
        for old, new in zip(weighted[:-1], self.layers):
            _replace(model, old, new)
        self.heads = nn.ModuleList([weighted[-1]])  # the output layer: one copy per slot
        _replace(model, weighted[-1], _HeadSwitch(self.heads))
        self.model = model
        self._grow(self.r1)
        return model

    def _grow(self, r: int) -> None:
        before = sum(p.numel() for p in self.model.parameters())
        for layer in self.layers:
            layer.grow(r)
        if len(self.heads) < len(self.layers[0].s):
            head = copy.deepcopy(self.heads[-1])
            head.reset_parameters()
            self.heads.append(head)
        self.growth.append(sum(p.numel() for p in self.model.parameters()) - (before if self.growth else 0))

    def slot_of(self, task: Task) -> int:
        """The task's slot; an unseen task reads the latest slot."""
        return self.slots.get(task.id, len(self.heads) - 1)

    def before_task(self, task: Task) -> None:
        if task.id in self.slots:
            raise ClbenchError(f"iru saw task id {task.id} twice; its factors are frozen (each task trains once)")
        if self.slots:
            self._grow(self.r2)
        self.slots[task.id] = len(self.heads) - 1

    def forward(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        k = self.slot_of(task)
        for layer in self.layers:
            layer.slot = k
        self.heads.slot = k
        return self.model(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        k = len(self.heads) - 1
        return [p for layer in self.layers for p in layer.slot_parameters(k)] + list(self.heads[k].parameters())

    def after_task(self, task: Task) -> None:
        for p in self.trainable_parameters():
            p.requires_grad_(False)

    def extra_results(self) -> dict[str, Any]:
        return {"iru_parameters_per_task": self.growth, "iru_rank_per_task": [self.r1] + [self.r2] * (len(self.growth) - 1),
                "iru_layers": [(layer.n_in, layer.n_out) for layer in self.layers]}


class _HeadSwitch(nn.Module):
    """Applies the output layer of the active slot."""

    def __init__(self, heads: nn.ModuleList) -> None:
        super().__init__()
        self.heads = heads
        heads.slot = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.heads.slot](x)
