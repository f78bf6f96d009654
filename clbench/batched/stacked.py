"""The stacked model: B copies of a small Sequential (Flatten, Linear, activations) as (B, ...) tensors.

Every step is one batched matmul per layer for all members; members with equal inputs share one copy of them
(:class:`Sharing`), and a pixel order can be folded into the first layer's weights for evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from clbench.models.networks import ACTIVATIONS

ELEMENTWISE = tuple(ACTIVATIONS.values())


class StackedLinear(torch.autograd.Function):
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
class Sharing:
    """Which row of a (V, N, ...) input each of B members reads: members grouped by row, so a row is
    multiplied by all its members' first-layer weights at once ((N, in) x (in, k * out), one matmul)."""

    rows: list[int]  # member -> row
    index: torch.Tensor  # the same, on the device
    groups: list[tuple[int, slice | torch.Tensor]]  # (row, its members: a slice where they are contiguous)

    @staticmethod
    def of(rows: list[int], device: torch.device, least: int = 4) -> "Sharing | None":
        """None when members share too little to gain (fewer than ``least`` a row on average: the stacked
        matmul of one row per member is faster then)."""
        if least * len(set(rows)) > len(rows):
            return None
        members: dict[int, list[int]] = {}
        for b, r in enumerate(rows):
            members.setdefault(r, []).append(b)
        groups = [(r, slice(bs[0], bs[0] + len(bs)) if bs == list(range(bs[0], bs[0] + len(bs)))
                   else torch.tensor(bs, device=device)) for r, bs in members.items()]
        return Sharing(rows, torch.tensor(rows, device=device), groups)


def shared_matmul(x: torch.Tensor, w: torch.Tensor, sharing: Sharing, bias: torch.Tensor | None = None
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


class SharedLinear(torch.autograd.Function):
    """Members' first layer on shared inputs: x (V, N, in), w (B, out, in) -> (B, N, out), member b reading
    row ``sharing.rows[b]`` of x. The input needs no gradient (it is data)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, sharing: Sharing) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.sharing = sharing
        return shared_matmul(x, w, sharing)

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


class StackedNet:
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
                sharing: Sharing | None = None, capture: list | None = None,
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
                        x, bias = shared_matmul(x, weight, sharing, bias), None
                    else:
                        x = SharedLinear.apply(x, weight, sharing)
                    sharing = None
                elif in_place:
                    x = x if gate is None else x * gate[:, None, :]
                    x = (torch.bmm(x, weight.transpose(1, 2)) if bias is None
                         else torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2)))
                    bias = None
                else:
                    x = StackedLinear.apply(x if gate is None else x * gate[:, None, :], weight)
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

    @torch.no_grad()
    def quadratic_pull(self, anchor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per member b: 1/2 sum_j weight_bj (theta_bj - anchor_bj)^2 over ``flat()`` (weight (B, P), or (B, 1)
        for one weight per member), computed per parameter without autograd; its gradient weight (theta -
        anchor) becomes each parameter's ``.grad``, to which the step's backward then adds the loss's gradient
        in place. Two passes over the weights fewer than autograd through the value, and no gradient sum."""
        total = None
        for p, part in self.parts():
            d = p.reshape(len(p), -1) - anchor[:, part]
            pull = d * (weight if weight.shape[1] == 1 else weight[:, part])
            value = torch.linalg.vecdot(pull, d)
            total = value if total is None else total.add_(value)
            p.grad = pull.view_as(p)
        return total.mul_(0.5)

    @torch.no_grad()
    def load(self, b: int, model: nn.Module) -> None:
        for p, stacked in zip(model.parameters(), self.params):
            p.copy_(stacked[b])


def model_problem(model: nn.Module) -> str | None:
    if not isinstance(model, nn.Sequential) or any(True for _ in model.buffers()):
        return "the model is not a plain Sequential without buffers"
    for m in model:
        if not isinstance(m, (nn.Flatten, nn.Linear, *ELEMENTWISE)):
            return f"the model has a {type(m).__name__} layer (batched runs take Flatten, Linear and activations)"
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
            return "the model flattens other dimensions than all but the first"
    return None
