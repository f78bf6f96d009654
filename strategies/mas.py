"""Memory aware synapses (MAS): a quadratic penalty weighted by how sensitive the output is to each parameter.

Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, "Memory Aware Synapses: Learning what (not) to forget",
ECCV 2018 (Sec. 3, eq. 2-4)::

    after task t:  for every input x_k of the task (no labels needed)
                       g(x_k) = d ||F(x_k; theta)||_2^2 / d theta        (squared L2 norm of the output)
                   Omega_t = (1/N) sum_k |g(x_k)|                         (per sample, then averaged)
                   Omega  <- Omega + Omega_t ;  theta* <- theta           (importance accumulated over tasks)
    loss:          task loss + lambda * sum_i Omega_i (theta_i - theta*_i)^2

Per sample, not per batch: eq. 4 averages the magnitude of each data point's gradient, and the magnitude of
a batch's summed gradient is smaller wherever the samples' gradients disagree in sign (Avalanche's
``MASPlugin`` takes it per batch, with the mean of the squared norms over the batch). F is the network's
output before the softmax (the task's head on task-incremental streams). ``form="accumulated"`` (default) is
the paper's: one penalty at the latest weights with the summed importance (the authors' code adds the new
Omega to the old); ``form="per-task"`` keeps one penalty per task at that task's weights, as EWC does.
``decay`` < 1 (accumulated form only) weighs older importance down, Omega <- decay * Omega + Omega_t (1: the
paper's sum). Defaults: lambda = 1 (the paper's object-recognition experiments), Omega over all of a task's
training inputs. The EWC arguments ``clbench list`` shows beside these (fisher_samples, fisher,
anchor_initial, gamma) are refused.
The penalty maths (forms, anchors, the quadratic form) is EWC's, reused: only the importance differs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from clbench.batched import batched_form
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Task
from clbench.fisher.estimators import StrategyPredict
from clbench.strategies.ewc import EWCDiag, EWCDiagAdapter

MAS_FORMS = ("accumulated", "per-task")


def mas_importance(strategy, task: Task, samples: int | None = None, batch_size: int = 256) -> torch.Tensor:
    """Omega (P,) of ``task``: mean over its first ``samples`` training inputs (all: None) of the per-sample
    |d ||f(x)||_2^2 / d theta|, f = ``strategy.predict``, in the order of the trainable parameters.

    Models whose trainable parameters all sit in Linear layers, each fed one vector per sample and called once
    per forward, use the outer-product structure of a per-sample gradient, |g_n a_n^T| = |g_n| |a_n|^T: one
    backward pass per batch. Any other model goes through torch.func, one gradient per sample.
    """
    model = strategy.model
    n = len(task.train_x) if samples is None else min(int(samples), len(task.train_x))
    was_training = model.training
    model.eval()
    try:
        fast = _linear_importance(strategy, task, n, batch_size)
        return fast if fast is not None else _func_importance(strategy, task, n)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _linear_importance(strategy, task: Task, n: int, batch_size: int) -> torch.Tensor | None:
    params = [p for p in strategy.model.parameters() if p.requires_grad]
    layers = [m for m in strategy.model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    owned = {id(m.weight) for m in layers} | {id(m.bias) for m in layers if m.bias is not None}
    if not all(id(p) in owned for p in params):
        return None
    total = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    inputs: dict[nn.Module, list[torch.Tensor]] = {}
    outputs: dict[nn.Module, list[torch.Tensor]] = {}

    def keep(module, args, out):
        inputs.setdefault(module, []).append(args[0].detach())
        out.retain_grad()
        outputs.setdefault(module, []).append(out)

    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        for start in range(0, n, batch_size):
            inputs.clear()
            outputs.clear()
            x = task.inputs(task.train_x[start:min(start + batch_size, n)])
            strategy.predict(x, task).float().pow(2).sum().backward()
            for m in layers:
                if len(inputs.get(m, [])) != 1 or inputs[m][0].dim() != 2 or outputs[m][0].grad is None:
                    return None  # a layer called twice, on sequences, or unused: the per-sample route
                g, a = outputs[m][0].grad.float().abs(), inputs[m][0].float().abs()
                total[id(m.weight)] += g.T @ a
                if m.bias is not None and m.bias.requires_grad:
                    total[id(m.bias)] += g.sum(0)
    finally:
        for h in handles:
            h.remove()
    return torch.cat([total[id(p)].reshape(-1) for p in params]) / n


def _func_importance(strategy, task: Task, n: int, chunk_entries: int = 2**25) -> torch.Tensor:
    wrapper = StrategyPredict(strategy, task)
    names = [f"model.{k}" for k, p in strategy.model.named_parameters() if p.requires_grad]
    params = {k: p.detach() for k, p in wrapper.named_parameters() if k in names}
    P = sum(p.numel() for p in params.values())

    def squared_norm(p, x):
        return functional_call(wrapper, p, (x.unsqueeze(0),)).float().pow(2).sum()

    def magnitude(p, x):
        g = grad(squared_norm)(p, x)
        return torch.cat([g[k].reshape(-1) for k in names]).abs()

    total = torch.zeros(P, device=task.train_x.device)
    step = max(1, chunk_entries // P)
    for start in range(0, n, step):
        x = task.inputs(task.train_x[start:min(start + step, n)])
        total += vmap(magnitude, in_dims=(None, 0), randomness="different")(params, x).sum(0)
    return total / n


@register_strategy("mas")
class MAS(EWCDiag):
    """Memory aware synapses: lambda * sum Omega (theta - theta*)^2 with Omega the mean per-sample |d||f(x)||^2/dtheta| (Aljundi et al. 2018)."""

    # lambda trades stability for plasticity over orders of magnitude (Omega's scale follows the output's): log scale
    search_space = {"strength": ("log", 1e-2, 1e3)}

    def __init__(self, strength: float = 1.0, samples: int | None = None, form: str = "accumulated",
                 decay: float = 1.0, **train) -> None:
        ewc_only = sorted(set(train) & {"fisher_samples", "fisher", "anchor_initial", "gamma"})
        if ewc_only:
            raise ClbenchError(f"mas: {', '.join(ewc_only)} belong to EWC's Fisher, which MAS does not use; MAS's "
                               "importance needs no labels: set how many inputs it averages over with samples=N")
        if form not in MAS_FORMS:
            raise ClbenchError(f"mas: form must be accumulated (Aljundi et al. 2018) or per-task, got {form!r}")
        if form == "per-task" and float(decay) != 1.0:
            raise ClbenchError(f"mas: decay={decay} applies to form=accumulated only; drop decay or set "
                               "form=accumulated")
        if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
            raise ClbenchError(f"mas: samples must be a positive whole number (or left out for all of a task's "
                               f"training inputs), e.g. samples=1000; got {samples!r}")
        super().__init__(strength, form="online" if form == "accumulated" else "per-task", decay=decay, **train)
        self.mas_form, self.samples = form, samples

    def task_fisher(self, task: Task) -> torch.Tensor:
        """MAS's importance Omega of ``task`` at the current weights (in place of EWC's Fisher)."""
        return mas_importance(self, task, self.samples)

    def penalty(self) -> torch.Tensor | float:
        if not self.penalties:
            return 0.0
        return self.strength * sum(self.quadratic_form(omega, anchor) for omega, anchor in self.penalties)

    def extra_results(self) -> dict[str, Any]:
        return {"mas_form": self.mas_form, "memory_samples": 0}


# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------

@batched_form(MAS)
class MASAdapter(EWCDiagAdapter):
    """EWC-diag's batched penalty (the per-task penalties folded into one quadratic, or the accumulated pair)
    at MAS's weight lambda rather than lambda / 2. Omega is each member's own: after a task every member runs
    its after_task (mas_importance) on its own weights, and refresh stacks the result."""

    state_in_members = True  # refresh stacks everything from the members (see Adapter)

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.form,)

    def penalty(self) -> torch.Tensor | None:
        return self.pull(1.0)

    def after_task(self, i: int) -> bool:
        return False
