"""Fisher information of every member of a batch at once, on the stacked model (the batched form of
:mod:`clbench.fisher.estimators`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clbench.fisher.estimators import fisher_losses

if TYPE_CHECKING:
    from clbench.batched.group import Group


def linear_true_fisher_inputs(g: "Group", i: int) -> torch.Tensor | None:
    """The first fisher_samples inputs of task i, (B, n, in), when every member's model is one bias-free
    Linear layer, the loss MSE and the Fisher the true one (rows e_k (x) x_n); else None."""
    s = [m.strategy for m in g.members]
    if (g.loss_kind != "mse" or len(g.net.linears) != 1 or g.net.linears[0][1] is not None
            or any(x.fisher_kind != "true" for x in s) or len({x.fisher_samples for x in s}) != 1):
        return None
    x, _ = g.full(i)
    return x[:, : min(s[0].fisher_samples, x.shape[1])].flatten(2)


CLOSED_FORM_BYTES = 2**28  # the per-class gradients the closed form holds at once; beyond, one backward per class


def true_fisher_scales(g: "Group", i: int, captured: list, out: torch.Tensor) -> list[torch.Tensor] | None:
    """Per Linear layer, the true Fisher's expected squared gradient at the layer's output, (B, n, units), in
    closed form for an ungated chain Linear (activation Linear)*: D_c, the gradient at the output for class c
    (p - e_c for cross-entropy, p the softmax of task i's head, weighted p_c; e_c for the Gaussian Fisher of
    MSE, weighted 1), carried down a layer as (D_c W) * act'(z), gives sum_c weight_c D_c^2 at every layer:
    p (1 - p) at a cross-entropy output. The same sum as one backward per class (fisher_losses), with one
    product per layer for all classes. None for other networks."""
    ops = [op for op, _ in g.net.ops if op != "flatten"]
    if g.adapter.gates(i) is not None or ops != ["linear"] + ["act", "linear"] * (len(ops) // 2):
        return None
    head = g.data[i]["head"]
    B, n, C = out.shape
    widths = [g.net.params[w].shape[1] for w, _ in g.net.linears]
    if 4 * B * n * C * max(widths) > CLOSED_FORM_BYTES:
        return None
    eye = torch.eye(C, device=out.device)
    if g.loss_kind == "ce":
        p = torch.softmax(out, -1)
        D, weight = p[:, :, None, :] - eye, p[..., None]  # (B, n, class, unit), (B, n, class, 1)
    else:
        D, weight = eye.expand(B, n, C, C), None

    def expected(D: torch.Tensor) -> torch.Tensor:
        return (D * D if weight is None else D * D * weight).sum(2)

    last = expected(D)
    if head is not None:  # units outside the head get no gradient
        last = torch.zeros(B, n, widths[-1], device=out.device).scatter_(2, head[:, None, :].expand_as(last), last)
    scales = [last]
    acts = [arg for op, arg in g.net.ops if op == "act"]
    for k in range(len(captured) - 2, -1, -1):  # down from the output layer
        w = g.net.params[g.net.linears[k + 1][0]].detach().float()  # (B, out, in)
        if k + 2 == len(captured) and head is not None:
            w = w.gather(1, head[:, :, None].expand(-1, -1, w.shape[2]))
        z = captured[k][2].detach().float().requires_grad_(True)
        slope = torch.autograd.grad(acts[k](z).sum(), z)[0]
        D = torch.bmm(D.flatten(1, 2), w).view(B, n, D.shape[2], -1) * slope[:, :, None, :]
        scales.insert(0, expected(D))
    return scales


def diagonal_fisher(g: "Group", i: int, batch_size: int = 512) -> torch.Tensor | None:
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
        scales = true_fisher_scales(g, i, captured, out.detach()) if kind == "true" else None
        if scales is not None:
            add(captured, scales)
            continue
        losses = fisher_losses(out, d["train_y"][:, part], kind, g.loss_kind)
        for loss_index, (loss, weight) in enumerate(losses):
            grads = torch.autograd.grad(loss, [o for _, _, o in captured], retain_graph=loss_index + 1 < len(losses))
            add(captured, [grad.float() ** 2 if weight is None else grad.float() ** 2 * weight[..., None]
                           for grad in grads])
    return torch.cat([t.reshape(g.B, -1) for t in diag], 1) / n
