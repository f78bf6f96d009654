"""Models by name. Each builder takes the stream's input shape and number of outputs."""
from __future__ import annotations

import math

import torch
from torch import nn

from clbench.core.errors import ClbenchError
from clbench.core.registry import build_model, register_model  # noqa: F401  (build_model: its old home)
from clbench.core.strategy import count_parameters  # noqa: F401

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "identity": nn.Identity}


@register_model("linear")
def linear(input_shape: tuple[int, ...], num_outputs: int, bias: bool = False, zero_init: bool = True) -> nn.Module:
    """Linear map y = W x (Hiratani's student); starts at W = 0 unless zero_init=false."""
    layer = nn.Linear(math.prod(input_shape), num_outputs, bias=bias)
    if zero_init:
        nn.init.zeros_(layer.weight)
        if bias:
            nn.init.zeros_(layer.bias)
    return nn.Sequential(nn.Flatten(), layer)


@register_model("mlp")
def mlp(
    input_shape: tuple[int, ...],
    num_outputs: int,
    widths: tuple[int, ...] | list[int] | int = (400, 400),
    activation: str = "relu",
    bias: bool = True,
    init: str = "default",
) -> nn.Module:
    """Fully connected network: Flatten, [Linear, activation] per hidden width, Linear output.

    ``init="small"``: weights and biases N(0, 1/fan_in^2), as Hiratani's pm/pm_model.py ("small
    initialization"); ``"xavier"``: Glorot & Bengio 2010's uniform weights and zero biases (the
    initialization of Mammoth's MLP, ``backbone/__init__.py``); ``"default"`` keeps torch's.
    """
    if init not in ("default", "small", "xavier"):
        raise ClbenchError(f"init must be 'default', 'small' or 'xavier', got {init!r}")
    if activation not in ACTIVATIONS:
        raise ClbenchError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    widths = [widths] if isinstance(widths, int) and not isinstance(widths, bool) else widths
    if not isinstance(widths, (list, tuple)) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ClbenchError(f"mlp widths must be hidden-layer sizes (positive integers), e.g. widths=(400,400) or "
                           f"widths=100; got {widths!r}")
    widths = list(widths)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for w in widths:
        layers += [nn.Linear(fan_in, w, bias=bias), ACTIVATIONS[activation]()]
        fan_in = w
    layers.append(nn.Linear(fan_in, num_outputs, bias=bias))
    if init == "small":
        with torch.no_grad():
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    for p in layer.parameters():
                        p.normal_(0.0, 1.0 / layer.in_features)
    if init == "xavier":
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


__all__ = ["build_model", "count_parameters", "linear", "mlp"]
