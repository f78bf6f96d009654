"""L2 (Euclidean) regularisation towards the previous task's weights."""
from __future__ import annotations

import torch

from clbench.batched import Adapter, batched_form, member_numbers
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy, parameter_vector
from clbench.core.types import Stream, Task


def strength_from_gamma(gamma: float, stream: Stream, metric: str = "euclidean") -> float:
    """clbench's penalty strength for Hiratani's gamma on the teacher-student stream (NeurIPS 2024).

    The authors' scripts (lst_wn.py, lst_cwn_diag.py, lst_cwn.py) add lambda (W - W_prev) M to the gradient
    of ||B - W A||^2 with lambda = (Nx/Ns)(1/gamma - 1) for L2 (M = I) and the diagonal Fisher
    (M = diag(A A^T)), lambda = 1/gamma - 1 for the full Fisher (M = A A^T, ``metric="fisher"``). clbench
    minimises ||B - W A||^2 / Ny + strength/2 (W - W_prev) M (W - W_prev)^T, so strength = 2 lambda / Ny.
    With the penalty also on task 1 (anchor at W = 0), task 1 is learned to the fraction gamma.
    """
    if stream.name != "teacher-student":
        raise ClbenchError(f"gamma is defined for the teacher-student stream, not {stream.name!r}; give strength instead")
    if not 0 < gamma <= 1:
        raise ClbenchError(f"gamma must be in (0, 1], got {gamma!r}")
    if metric not in ("euclidean", "fisher"):
        raise ClbenchError(f"metric must be 'euclidean' or 'fisher', got {metric!r}")
    p = stream.provenance
    lam = (1 / gamma - 1) * (p["input_dim"] / p["latent_dim"] if metric == "euclidean" else 1.0)
    return 2 * lam / p["output_dim"]


@register_strategy("l2")
class L2(Strategy):
    """Penalty strength/2 ||theta - theta_prev||^2 to the weights after the previous task (Hiratani 2024).

    ``anchor_initial=True`` also pulls task 1 towards the initial weights, as the authors' lst_wn.py does;
    ``gamma`` (teacher-student only) sets the strength the paper's way (see ``strength_from_gamma``).
    """

    # strength trades plasticity for stability over orders of magnitude: log scale
    search_space = {"strength": ("log", 1e-4, 10.0)}

    def __init__(self, strength: float = 1.0, anchor_initial: bool = False, gamma: float | None = None,
                 **train) -> None:
        super().__init__(**train)
        self.strength, self.anchor_initial, self.gamma = float(strength), bool(anchor_initial), gamma
        self.anchor: torch.Tensor | None = None

    def setup(self, model, stream):
        model = super().setup(model, stream)
        if self.gamma is not None:
            self.strength = strength_from_gamma(float(self.gamma), stream)
        if self.anchor_initial:
            self.anchor = parameter_vector(model)
        return model

    def after_task(self, task: Task) -> None:
        self.anchor = parameter_vector(self.model)

    def penalty(self) -> torch.Tensor | float:
        if self.anchor is None:
            return 0.0
        delta = torch.cat([p.reshape(-1) for p in self.trainable_parameters()]) - self.anchor
        return 0.5 * self.strength * delta.pow(2).sum()

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(L2)
class L2Adapter(Adapter):
    state_in_members = True  # refresh stacks everything from the members (see Adapter)

    @staticmethod
    def refuse(stream: Stream, strategy: Strategy) -> str | None:
        if strategy.anchor_initial:
            return "anchor_initial (a pull to the initial weights during task 1) has no batched form"
        return None

    def refresh(self) -> None:
        s = [m.strategy for m in self.g.members]
        self.anchor = None if s[0].anchor is None else torch.stack([x.anchor for x in s])
        self.strength = member_numbers(self.g.members, "strength", self.g.dev)

    def penalty(self) -> torch.Tensor | None:
        if self.anchor is None:
            return None
        return self.g.net.quadratic_pull(self.anchor, self.strength[:, None])
