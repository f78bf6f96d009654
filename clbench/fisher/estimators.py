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

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from clbench.core.errors import ClbenchError
from clbench.core.types import Task

FISHER_KINDS = ("true", "empirical")


class StrategyPredict(nn.Module):
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
    wrapper = StrategyPredict(strategy, task)
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


@contextlib.contextmanager
def _capture(strategy, layers: list[nn.Module]):
    """The model in eval mode with forward hooks keeping each layer's input and its output (with the
    output's gradient retained); hooks, gradients and the training mode are restored on exit."""
    inputs: dict[nn.Module, torch.Tensor] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}

    def keep(module, args, out):
        inputs[module] = args[0].detach()
        out.retain_grad()
        outputs[module] = out

    handles = [m.register_forward_hook(keep) for m in layers]
    was_training = strategy.model.training
    strategy.model.eval()
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()
        strategy.model.zero_grad(set_to_none=True)
        strategy.model.train(was_training)


def diagonal(strategy, task: Task, samples: int, kind: str = "true") -> torch.Tensor:
    """Diagonal of the Fisher, a vector of length P (in the order of the trainable parameters).

    Models whose trainable parameters all belong to Linear layers fed one vector per sample use
    the per-sample outer-product structure (grad W_n = g_n a_n^T, so its square is
    (g_n^2)(a_n^2)^T): one batched backward pass per output unit instead of per-sample
    Jacobians. Any other model goes through torch.func. Both give the same numbers.
    """
    n = min(samples, len(task.train_x))
    fast = _linear_diagonal(strategy, task, n, kind)
    if fast is not None:
        return fast
    return sum((rows**2).sum(0) for rows in fisher_rows(strategy, task, samples, kind)) / n


def fisher_losses(out: torch.Tensor, y: torch.Tensor, kind: str, loss: str
                  ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Scalars whose per-sample output gradients g_n give the Fisher rows, each with a per-sample weight on
    g_n^2 (or None), for outputs (..., classes): empirical, the loss at the labels; true cross-entropy, log p_c
    weighted by p_c, one per class; true MSE (Gaussian), each output unit (the output Jacobian)."""
    if kind == "empirical":
        return [(-torch.log_softmax(out, -1).gather(-1, y[..., None]).sum() if loss == "ce"
                 else 0.5 * ((out - y) ** 2).sum(), None)]
    if loss == "ce":
        log_p = torch.log_softmax(out, -1)
        return [(log_p[..., c].sum(), log_p[..., c].detach().exp()) for c in range(out.shape[-1])]
    return [(out[..., k].sum(), None) for k in range(out.shape[-1])]


def _linear_diagonal(strategy, task: Task, n: int, kind: str, batch_size: int = 512) -> torch.Tensor | None:
    params = [p for p in strategy.model.parameters() if p.requires_grad]
    layers = [m for m in strategy.model.modules() if isinstance(m, nn.Linear)]
    owner = {id(m.weight): m for m in layers} | {id(m.bias): m for m in layers if m.bias is not None}
    if kind not in FISHER_KINDS or not all(id(p) in owner for p in params):
        return None
    layers = [m for m in layers if m.weight.requires_grad]
    diag = {id(p): torch.zeros_like(p) for p in params}
    with _capture(strategy, layers) as (inputs, outputs):
        for start in range(0, n, batch_size):
            x = task.inputs(task.train_x[start:min(start + batch_size, n)])
            out = strategy.predict(x, task).float()
            if any(inputs[m].dim() != 2 for m in layers):
                return None
            y = task.train_y[start:min(start + batch_size, n)]
            losses = fisher_losses(out, y, kind, strategy.stream.loss)
            for i, (loss, weight) in enumerate(losses):
                strategy.model.zero_grad(set_to_none=True)
                for m in layers:
                    outputs[m].grad = None  # retained output gradients accumulate otherwise
                loss.backward(retain_graph=i + 1 < len(losses))
                for m in layers:
                    g2, a2 = outputs[m].grad.float() ** 2, inputs[m].float() ** 2
                    if weight is not None:
                        g2 = g2 * weight[:, None]
                    diag[id(m.weight)] += g2.T @ a2
                    if m.bias is not None and m.bias.requires_grad:
                        diag[id(m.bias)] += g2.sum(0)
    return torch.cat([diag[id(p)].reshape(-1) for p in params]) / n


def full_fits(strategy, task: Task, samples: int, kind: str = "true", max_entries: int = 2 * 10**8) -> bool:
    """Whether the exact full Fisher fits in ``max_entries`` numbers."""
    K, P = _full_size(strategy, task, samples, kind)
    return min(K, P) * P <= max_entries


def _full_size(strategy, task: Task, samples: int, kind: str) -> tuple[int, int]:
    n = min(samples, len(task.train_x))
    P = sum(p.numel() for p in strategy.model.parameters() if p.requires_grad)
    out_dim = 1 if kind == "empirical" else int(strategy.predict(task.inputs(task.train_x[:1]), task).shape[1])
    return n * out_dim, P


def full(strategy, task: Task, samples: int, kind: str = "true", max_entries: int = 2 * 10**8
         ) -> tuple[str, torch.Tensor]:
    """Exact full Fisher as ``("rows", M)`` with F = M^T M, or ``("matrix", F)``, whichever is smaller.

    Raises a ClbenchError when either form would exceed ``max_entries`` numbers.
    """
    n = min(samples, len(task.train_x))
    K, P = _full_size(strategy, task, samples, kind)
    if min(K, P) * P > max_entries:
        raise ClbenchError(
            f"the exact full Fisher of this model needs {min(K, P) * P:.3g} numbers ({P} parameters, "
            f"{K} gradient rows), over the limit max_entries={max_entries:.3g}. Use fewer fisher_samples, "
            f"a smaller model, raise max_entries if memory allows, or fisher_form=kfac (Kronecker-factored, "
            f"scales to deep networks)"
        )
    rows = torch.cat(list(fisher_rows(strategy, task, samples, kind))) / n**0.5
    if K <= P:
        return "rows", rows
    return "matrix", rows.T @ rows


def kfac(strategy, task: Task, samples: int, kind: str = "true", batch_size: int = 256
         ) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """Kronecker-factored Fisher blocks (A, G) for every trainable Linear and Conv2d layer.

    Ritter, Botev & Barber, "Online Structured Laplace Approximations", NeurIPS 2018 (K-FAC of
    Martens & Grosse 2015; convolutions as in Grosse & Martens 2016): the layer's Fisher block
    is A (x) G with A = E[a a^T] over its inputs (a ones entry appended for the bias; conv
    patches averaged over positions) and G = E[g g^T] over the gradients of the log-likelihood
    with respect to its outputs (summed over conv positions). True Fisher: targets sampled from
    the model (a class from the softmax; y ~ N(f(x), I) for regression); empirical: the labels.
    """
    if kind not in FISHER_KINDS:
        raise ClbenchError(f"fisher must be one of {', '.join(FISHER_KINDS)}, got {kind!r}")
    layers = [m for m in strategy.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad]
    if not layers:
        raise ClbenchError("K-FAC found no trainable Linear or Conv2d layer in the model")
    sums = {m: [0.0, 0.0] for m in layers}
    n = min(samples, len(task.train_x))
    with _capture(strategy, layers) as (inputs, outputs):
        for start in range(0, n, batch_size):
            x = task.inputs(task.train_x[start:min(start + batch_size, n)])
            out = strategy.predict(x, task).float()
            if kind == "empirical":
                target = task.train_y[start:min(start + batch_size, n)]
            elif strategy.stream.loss == "ce":
                target = torch.distributions.Categorical(logits=out.detach()).sample()
            else:
                target = out.detach() + torch.randn_like(out)
            # summed (not averaged) loss: each sample's output gradient is its own log-likelihood gradient
            loss = (torch.nn.functional.cross_entropy(out, target, reduction="sum") if strategy.stream.loss == "ce"
                    else 0.5 * ((out - target) ** 2).sum())
            strategy.model.zero_grad(set_to_none=True)
            loss.backward()
            for m in layers:
                a, g = _layer_activations(m, inputs[m], outputs[m].grad)
                sums[m][0] = sums[m][0] + a.T @ a * (len(x) / len(a))
                sums[m][1] = sums[m][1] + g.T @ g
    return [(m, symmetric_part(sums[m][0]) / n, symmetric_part(sums[m][1]) / n) for m in layers]


def _layer_activations(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of layer inputs (with a ones column for the bias) and of output gradients."""
    if isinstance(m, nn.Conv2d):
        a = torch.nn.functional.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C*k*k, L)
        a = a.transpose(1, 2).reshape(-1, a.shape[1])
        g = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])  # (N*L, out): summed over positions in G
    else:
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    if m.bias is not None:
        a = torch.cat([a, torch.ones(len(a), 1, device=a.device, dtype=a.dtype)], 1)
    return a.float(), g.float()


def symmetric_part(M: torch.Tensor) -> torch.Tensor:
    """(M + M^T) / 2, exactly symmetric in floating point (x + y == y + x); an exactly symmetric M is returned
    unchanged bit for bit. A float32 ``X.T @ X`` is not always bit-symmetric (it depends on the BLAS)."""
    return (M + M.mT) / 2


class _KroneckerQuadratic(torch.autograd.Function):
    """q(dW) = tr(G dW A dW^T) with A, G replaced by their exactly symmetric parts (the quadratic form of a
    Fisher block only sees those). Its gradient 2 G dW A is then the product the value needs, so the backward
    pass costs no matmul (plain autograd would spend two more)."""

    @staticmethod
    def forward(ctx, dW: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        GdWA = (symmetric_part(G) @ dW) @ symmetric_part(A)
        ctx.save_for_backward(GdWA)
        return (dW * GdWA).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (GdWA,) = ctx.saved_tensors
        return 2 * grad * GdWA, None, None


def kfac_quadratic(m: nn.Module, A: torch.Tensor, G: torch.Tensor, d_weight: torch.Tensor,
                   d_bias: torch.Tensor | None) -> torch.Tensor:
    """vec(dW)^T (A (x) G) vec(dW) = tr(G dW A dW^T), with dW = [weight change, bias change]; A and G are used
    through their exactly symmetric parts, so any caller's factors (e.g. a float32 ``X.T @ X``) are safe."""
    dW = d_weight.reshape(d_weight.shape[0], -1)
    if d_bias is not None:
        dW = torch.cat([dW, d_bias.reshape(-1, 1)], 1)
    return _KroneckerQuadratic.apply(dW, A.detach(), G.detach())
