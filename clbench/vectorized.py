"""Several seeds of one run trained in lockstep as one batched model (torch.func).

``run_seeds(stream, seeds)`` stacks one model per seed (each initialised as the
engine would with that seed) with ``torch.func.stack_module_state`` and trains
them with ``vmap(functional_call)``: every step is one batched forward and
backward for all seeds, each seed with its own batch order (the engine's, from
its seed). Plain sequential training (``finetune``) only; the matrices equal
the engine's separate runs up to float rounding. Small models gain the most:
one large matmul instead of many small ones.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from clbench import metrics
from clbench.engine import _scores, make_optimizer, resolve_device
from clbench.errors import ClbenchError
from clbench.models import build_model
from clbench.types import Stream


def run_seeds(stream: Stream, seeds: list[int], *, model_name: str | None = None,
              model_args: dict[str, Any] | None = None, epochs: int | None = None, lr: float | None = None,
              batch_size: int | None = None, optimizer: str | None = None, device: str = "auto"
              ) -> list[dict[str, Any]]:
    """Finetune on ``stream`` for every seed at once; returns per seed ``{"seed", "R", "metrics", "wall_time_s"}``."""
    if not seeds:
        raise ClbenchError("run_seeds needs at least one seed")
    dev = resolve_device(device)
    d = stream.defaults
    epochs = d.epochs if epochs is None else epochs
    lr = d.lr if lr is None else lr
    bs = d.batch_size if batch_size is None else batch_size
    name = model_name or d.model
    args = dict(d.model_args) if model_name is None else {}
    args.update(model_args or {})
    models = []
    for seed in seeds:  # the engine's initialisation for each seed
        torch.manual_seed(seed)
        models.append(build_model(name, stream.input_shape, stream.num_outputs, **args).to(dev))
    if any(len(list(m.buffers())) for m in models):
        raise ClbenchError("vectorised seeds need models without buffers (no BatchNorm); run them one by one")
    params, _ = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    forward = torch.vmap(lambda p, x: functional_call(base, p, (x,)))
    shared = torch.vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))
    generators = [torch.Generator(device=dev).manual_seed(seed) for seed in seeds]
    tasks = [t.to(dev) for t in stream.tasks]
    S, T = len(seeds), len(tasks)
    start = time.perf_counter()

    @torch.no_grad()
    def evaluate() -> np.ndarray:
        row = []
        for task in tasks:
            total = torch.zeros(S, device=dev, dtype=torch.float64)
            for i in range(0, len(task.test_x), 2048):
                out = shared(params, task.inputs(task.test_x[i:i + 2048]))
                out = out if task.head is None else out.index_select(2, task.head)
                y = task.test_y[i:i + 2048]
                total += ((out.argmax(2) == y).sum(1) if stream.loss == "ce"
                          else ((out - y) ** 2).mean(2).sum(1))
            row.append(total / len(task.test_x))
        return torch.stack(row, 1).cpu().numpy()  # (S, T)

    raw = np.full((S, T + 1, T), np.nan)
    raw[:, 0] = evaluate()
    for i, task in enumerate(tasks):
        opt = make_optimizer(optimizer or d.optimizer, list(params.values()), lr)
        n = len(task.train_x)
        for _ in range(epochs):
            orders = torch.stack([torch.randperm(n, device=dev, generator=g) for g in generators])
            for step in range(math.ceil(n / bs)):
                idx = orders[:, step * bs:(step + 1) * bs]
                x = task.inputs(task.train_x[idx.reshape(-1)], train=True)
                x = x.view(S, idx.shape[1], *x.shape[1:])
                y = task.train_y[idx]
                out = forward(params, x)
                out = out if task.head is None else out.index_select(2, task.head)
                if stream.loss == "ce":
                    loss = F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none").view(S, -1).mean(1)
                else:
                    loss = ((out - y) ** 2).flatten(1).mean(1)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()  # seeds do not interact: each gets its own mean-loss gradient
                opt.step()
        raw[:, i + 1] = evaluate()
    wall = (time.perf_counter() - start) / S
    out = []
    for k, seed in enumerate(seeds):
        R = _scores(raw[k], stream.loss)
        out.append({"seed": seed, "R": R.tolist(), "metrics": metrics.summary(R), "wall_time_s": wall})
    return out
