"""Fisher information of a model on a task, one code path for every EWC variant.

The Fisher is F = (1/n) sum_k r_k r_k^T over "rows" r_k (gradients), computed
per sample with torch.func:

- true Fisher (default), regression (Gaussian likelihood, unit variance):
  rows are the output Jacobian, F = E_x[J^T J];
- true Fisher, classification: rows sqrt(p_c) grad log p_c for every class c,
  the exact expectation over labels drawn from the model, F = E_x[J^T (diag p - p p^T) J];
- empirical Fisher: one row per sample, the gradient of its loss at its true label.

The diagonal Fisher is the mean of the squared rows; the exact full Fisher
keeps the rows (or their Gram matrix F when that is smaller), so
``diagonal(...)`` equals the diagonal of ``full(...)`` exactly.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from clbench.errors import ClbenchError
from clbench.types import Task

FISHER_KINDS = ("true", "empirical")


class _Predict(nn.Module):
    """Wraps strategy.predict so torch.func can swap the model's parameters."""

    def __init__(self, strategy, task: Task) -> None:
        super().__init__()
        self.model, self.strategy, self.task = strategy.model, strategy, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.strategy.predict(x, self.task)


def fisher_rows(strategy, task: Task, samples: int, kind: str = "true", chunk_entries: int = 2**25
                ) -> Iterator[torch.Tensor]:
    """Yield chunks of Fisher rows, each (rows, P), over the first ``samples`` training samples of ``task``."""
    if kind not in FISHER_KINDS:
        raise ClbenchError(f"fisher must be one of {', '.join(FISHER_KINDS)}, got {kind!r}")
    loss_kind = strategy.stream.loss
    wrapper = _Predict(strategy, task)
    names = [f"model.{n}" for n, p in strategy.model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in wrapper.named_parameters() if n in names}
    P = sum(p.numel() for p in params.values())

    def outputs(p, x):
        return functional_call(wrapper, p, (x.unsqueeze(0),)).squeeze(0).float()

    def true_rows(p, x):
        jac = jacrev(lambda q: outputs(q, x))(p) if loss_kind == "mse" else jacrev(
            lambda q: torch.log_softmax(outputs(q, x), -1))(p)
        flat = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], 1)
        if loss_kind == "ce":
            prob = torch.softmax(outputs(p, x), -1).detach()
            flat = flat * prob.sqrt().unsqueeze(1)
        return flat

    def empirical_row(p, x, y):
        def loss(q):
            out = outputs(q, x)
            if loss_kind == "ce":
                return -torch.log_softmax(out, -1)[y]
            return 0.5 * ((out - y) ** 2).sum()
        g = grad(loss)(p)
        return torch.cat([g[n].reshape(1, -1) for n in names], 1)

    n = min(samples, len(task.train_x))
    out_dim = 1 if kind == "empirical" else int(strategy.predict(task.inputs(task.train_x[:1]), task).shape[1])
    step = max(1, chunk_entries // (out_dim * P))
    was_training = strategy.model.training
    strategy.model.eval()
    for start in range(0, n, step):
        x = task.inputs(task.train_x[start:min(start + step, n)])
        if kind == "true":
            rows = vmap(true_rows, in_dims=(None, 0), randomness="different")(params, x)
        else:
            y = task.train_y[start:min(start + step, n)]
            rows = vmap(empirical_row, in_dims=(None, 0, 0), randomness="different")(params, x, y)
        yield rows.reshape(-1, P).detach()
    strategy.model.train(was_training)


def diagonal(strategy, task: Task, samples: int, kind: str = "true") -> torch.Tensor:
    """Diagonal of the Fisher, a vector of length P."""
    n = min(samples, len(task.train_x))
    return sum((rows**2).sum(0) for rows in fisher_rows(strategy, task, samples, kind)) / n


def full(strategy, task: Task, samples: int, kind: str = "true", max_entries: int = 2 * 10**8
         ) -> tuple[str, torch.Tensor]:
    """Exact full Fisher as ``("rows", M)`` with F = M^T M, or ``("matrix", F)``, whichever is smaller.

    Raises a ClbenchError when either form would exceed ``max_entries`` numbers.
    """
    n = min(samples, len(task.train_x))
    P = sum(p.numel() for p in strategy.model.parameters() if p.requires_grad)
    out_dim = 1 if kind == "empirical" else int(strategy.predict(task.inputs(task.train_x[:1]), task).shape[1])
    K = n * out_dim
    if min(K, P) * P > max_entries:
        raise ClbenchError(
            f"the exact full Fisher of this model needs {min(K, P) * P:.3g} numbers ({P} parameters, "
            f"{K} gradient rows), over the limit max_entries={max_entries:.3g}. Use fewer fisher_samples, "
            f"a smaller model, raise max_entries if memory allows, or the Kronecker-factored (K-FAC) "
            f"full Fisher, which scales to deep networks"
        )
    rows = torch.cat(list(fisher_rows(strategy, task, samples, kind))) / n**0.5
    if K <= P:
        return "rows", rows
    return "matrix", rows.T @ rows
