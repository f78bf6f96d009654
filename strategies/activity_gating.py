"""Activity gating: a fixed random gate per task on the units' activity.

Context-dependent gating (XdG), Masse, Grant & Freedman, PNAS 2018; analysed
in the teacher-student model by Hiratani (NeurIPS 2024), where a gate with
active fraction alpha acts like replacing rho_a by alpha * rho_a: lower
transfer, higher retention. The gate multiplies the input of each gated
Linear layer; with ``layers="all"`` that includes the network's input (as in
Hiratani on MNIST), with ``layers="hidden"`` only hidden units (XdG). The task
id selects the gate at test time.

Hiratani's own scripts (github nhiratani/transfer_retention_model) draw
Bernoulli(alpha) gates and do not rescale them: ``sampling="bernoulli",
rescale=False`` reproduces that. clbench's defaults (exactly round(alpha n)
active units, scaled by 1/sqrt(alpha) to keep the activity's scale) are kept
for continuity.
"""
from __future__ import annotations

import torch
from torch import nn

from clbench.batched import Adapter, batched_form
from clbench.core.errors import ClbenchError, check_unit_interval
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Stream, Task


def random_gate(size: int, alpha: float, seed: int, rescale: bool, sampling: str = "exact") -> torch.Tensor:
    """A 0/1 vector (scaled by 1/sqrt(alpha) if rescale): round(alpha * size) ones at random places
    (``sampling="exact"``), or each unit on independently with probability alpha (``"bernoulli"``, Hiratani's scripts).
    An alpha that leaves less than half a unit active (round(alpha * size) = 0) is an error: one unit scaled
    by 1/sqrt(alpha) would only blow the activity up."""
    if alpha * size < 0.5:
        raise ClbenchError(f"alpha={alpha:g} leaves round(alpha * {size}) = 0 of a layer's {size} units active; "
                           f"use alpha >= {0.5 / size:.3g} (at least one active unit)")
    g = torch.Generator().manual_seed(seed)
    if sampling == "bernoulli":
        gate = (torch.rand(size, generator=g) < alpha).float()
    elif sampling == "exact":
        gate = torch.zeros(size)
        gate[torch.randperm(size, generator=g)[: max(1, round(alpha * size))]] = 1.0
    else:
        raise ClbenchError(f"sampling must be 'exact' or 'bernoulli', got {sampling!r}")
    return gate / alpha**0.5 if rescale else gate


@register_strategy("activity-gating")
class ActivityGating(Strategy):
    """Fixed random per-task gates on unit activity, active fraction alpha (XdG; Hiratani 2024); task id at test."""
    # the active fraction trades capacity per task against overlap between tasks (linear scale, 5% to 100%)
    search_space = {"alpha": ("float", 0.05, 1.0)}

    scenarios = ("task", "domain")
    uses_task_id_at_test = True

    def __init__(self, alpha: float = 0.5, layers: str = "all", rescale: bool = True, sampling: str = "exact",
                 **train) -> None:
        super().__init__(**train)
        self.alpha = check_unit_interval("alpha", alpha)
        if self.alpha == 0:
            raise ClbenchError("alpha must be > 0: a gate with no active unit blocks all learning")
        if layers not in ("all", "hidden"):
            raise ClbenchError(f"layers must be 'all' or 'hidden', got {layers!r}")
        if sampling not in ("exact", "bernoulli"):
            raise ClbenchError(f"sampling must be 'exact' or 'bernoulli', got {sampling!r}")
        self.layers, self.rescale, self.sampling = layers, bool(rescale), sampling
        self.gates: dict[int, list[torch.Tensor]] = {}
        self.current: list[torch.Tensor] = []

    def setup(self, model: nn.Module, stream: Stream) -> nn.Module:
        model = super().setup(model, stream)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.gated = linears if self.layers == "all" else linears[1:]
        if not self.gated:
            raise ClbenchError("activity-gating found no Linear layer to gate; use layers=all or a model with hidden layers")
        self.base_seed = int(torch.randint(0, 2**31 - 1, (1,)))
        for k, layer in enumerate(self.gated):
            layer.register_forward_pre_hook(lambda module, args, k=k: (args[0] * self.current[k],))
        return model

    def gate(self, task: Task) -> list[torch.Tensor]:
        """The task's gates, one per gated layer (drawn once, deterministic in the run's seed)."""
        if task.id not in self.gates:
            device = next(self.model.parameters()).device
            with torch.inference_mode(False):  # first drawn during evaluation; training must be able to use it
                self.gates[task.id] = [
                    random_gate(layer.in_features, self.alpha, self.base_seed + 7919 * task.id + k, self.rescale,
                                self.sampling).to(device) for k, layer in enumerate(self.gated)
                ]
        return self.gates[task.id]

    def forward(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        self.current = self.gate(task)
        return self.model(x)

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(ActivityGating)
class ActivityGatingAdapter(Adapter):
    state_in_members = True  # refresh stacks everything from the members (see Adapter)

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.layers,)

    def gates(self, j: int) -> list[torch.Tensor | None]:
        members = self.g.members
        per_member = [m.strategy.gate(self.g.tasks[b][j]) for b, m in enumerate(members)]
        stacked = [torch.stack(g) for g in zip(*per_member)]
        linears = len(self.g.net.linears)
        return ([None] * (linears - len(stacked))) + stacked  # layers="hidden" gates all but the first
