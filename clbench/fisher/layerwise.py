"""Hiratani's layer-wise Fisher for a ReLU MLP (NeurIPS 2024; the "fim" regulariser of the authors'
pm/pm_model.py, github nhiratani/transfer_retention_model).

For a network of Linear layers with ReLU between them and a linear output, layer l gets a Kronecker block
A_l (x) G_l with A_l = E[a_l a_l^T] over its inputs a_l and, instead of K-FAC's sampled gradient moments,
G_l = D_l M_l^T M_l D_l, where D_l = diag(E[phi'(z_l)]) is the mean ReLU slope of the layer's units and
M_l the mean-slope linearised map from the layer's output to the network output (M = W_out for the last
hidden layer; the output layer has G = I). Each block is divided by ||M_l^T M_l||_2 ||A_l||_2 (spectral
norms; ||A||_2 alone for the output layer). Biases are not regularised (their row and column of A are 0).
Penalty strength/2 sum_l tr(G_l dW_l A_l dW_l^T), whose gradient is the authors' update with lmbd = strength.
"""
from __future__ import annotations

import torch
from torch import nn

from clbench.core.errors import ClbenchError
from clbench.core.types import Task


@torch.no_grad()
def layerwise(strategy, task: Task, samples: int) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """(module, A, G) per Linear layer of a ReLU MLP, normalised as the authors do, on ``samples`` training inputs."""
    model = strategy.model
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    others = [m for m in model.modules() if not isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten, nn.Sequential))
              and m is not model]
    if not layers or others or not all(m.weight.requires_grad for m in layers):
        raise ClbenchError("the layer-wise Fisher needs a plain ReLU MLP (Linear, ReLU, Flatten layers, all trainable); "
                           "use fisher_form=kfac for other models")
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod, (args[0], out))) for m in layers]
    was_training = model.training
    model.eval()
    try:
        n = min(samples, len(task.train_x))
        strategy.predict(task.inputs(task.train_x[:n]), task)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    blocks = []
    M = None  # linearised map from the current layer's output to the network output
    for k in range(len(layers) - 1, -1, -1):
        m = layers[k]
        a, z = seen[m]
        a = a.reshape(len(a), -1).double()
        A = a.T @ a / len(a)
        if m.bias is not None:
            A = torch.nn.functional.pad(A, (0, 1, 0, 1))
        if M is None:
            G = torch.eye(m.out_features, dtype=A.dtype, device=A.device)
            scale = torch.linalg.matrix_norm(A, 2)
            M = m.weight.double()
        else:
            slope = (z > 0).double().mean(0)  # D = diag(mean phi'), ReLU
            MtM = M.T @ M
            G = slope[:, None] * MtM * slope[None, :]
            scale = torch.linalg.matrix_norm(MtM, 2) * torch.linalg.matrix_norm(A, 2)
            M = (M * slope[None, :]) @ m.weight.double()
        blocks.append((m, (A / scale.clamp(min=1e-30)).float(), G.float()))
    return blocks[::-1]
