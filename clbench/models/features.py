"""A model's penultimate features: what its output layer reads (for feature-space methods such as iCaRL)."""
from __future__ import annotations

import torch
from torch import nn

from clbench.core.errors import ClbenchError


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last ``nn.Linear`` (every built-in model ends with one)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ClbenchError(f"{type(model).__name__} has no nn.Linear output layer, so it has no penultimate "
                           "features; use a model that ends with a Linear layer (mlp, resnet18-reduced, vit-tiny)")
    return layers[-1]


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features the output layer reads for inputs ``x``, one row a sample (for an MLP: the activations of
    its last hidden layer)."""
    kept: list[torch.Tensor] = []
    handle = output_layer(model).register_forward_hook(lambda m, args, out: kept.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return kept[-1].flatten(1)
