"""GDumb: a greedy class-balanced sampler, and a learner trained from scratch on the memory alone.

Prabhu, Torr & Dokania, "GDumb: A Simple Approach that Questions Our Progress in Continual Learning",
ECCV 2020 (Sec. 3)::

    for every sample (x, y) of the stream:
        if memory has room:                   add it
        elif y is not the largest class:      replace a random sample of the largest class by it
    before every evaluation:  re-initialise the model and train it on the memory only
                              (cross-entropy over the classes in memory; at test, the logits of classes
                              not in memory are masked)

The sampler is clbench.core.class_buffer's (one draw per sample from the global torch generator; samples of a
task are offered in a random order). The learner's schedule is the authors' code's (drimpossible/GDumb,
src/opts.py and main.py; 128 passes in scripts/replicate.sh for the MNIST MLP-400 with 500 samples): SGD with
momentum 0.9 and weight decay 1e-6, batch 16, one warm-up epoch at max_lr / 10, then cosine annealing with
warm restarts (T_0 = 1, T_mult = 2) from max_lr = 0.05 down to min_lr = 0.0005, gradient norm clipped at
10. CutMix (their CIFAR setting) is left out. The stream's learner is not trained at all (``epochs`` is 0 by
default: the model would be thrown away after each task anyway). Re-initialising restores the weights the
model had when the run began. All three scenarios (task-incremental: each sample's loss over its task's head).
Default memory 500 (the authors' MNIST MLP-400 setting); a suite fixes its own.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from clbench.core.class_buffer import ClassBalancedBuffer, as_units
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Stream, Task


def sgdr_rate(epoch: int, max_lr: float, min_lr: float) -> float:
    """The learning rate of ``epoch`` (0-based): max_lr / 10 for the warm-up epoch, then cosine annealing with
    warm restarts of 1, 2, 4, ... epochs (Loshchilov & Hutter 2017, T_0 = 1, T_mult = 2)."""
    if epoch == 0:
        return max_lr * 0.1
    e, period = epoch - 1, 1
    while e >= period:
        e, period = e - period, period * 2
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * e / period)) / 2


@register_strategy("gdumb")
class GDumb(Strategy):
    """GDumb: greedy class-balanced memory; after each task the model is re-trained from scratch on it alone (Prabhu et al. 2020)."""

    # the stream's own training is skipped: the model is refitted from the memory after each task
    train_defaults = {"epochs": 0}
    # memory_size is fixed by the suite; the refit schedule is the authors': nothing to search
    search_space = {}

    def __init__(self, memory_size: int = 500, fit_epochs: int = 128, fit_batch_size: int = 16, max_lr: float = 0.05,
                 min_lr: float = 0.0005, momentum: float = 0.9, weight_decay: float = 1e-6, clip: float = 10.0,
                 **train) -> None:
        super().__init__(**train)
        for key, value in (("fit_epochs", fit_epochs), ("fit_batch_size", fit_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "fit_epochs" else 1):
                raise ClbenchError(f"gdumb: {key} must be a whole number >= {0 if key == 'fit_epochs' else 1}; "
                                   f"got {value!r}")
        for key, value in (("max_lr", max_lr), ("min_lr", min_lr), ("clip", clip)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ClbenchError(f"gdumb: {key} must be a positive number; got {value!r}")
        self.memory = ClassBalancedBuffer(memory_size)
        self.fit_epochs, self.fit_batch_size = fit_epochs, fit_batch_size
        self.max_lr, self.min_lr, self.momentum = float(max_lr), float(min_lr), float(momentum)
        self.weight_decay, self.clip = float(weight_decay), float(clip)
        self.heads: dict[int, torch.Tensor] = {}
        self.seen_mask: torch.Tensor | None = None

    def setup(self, model: torch.nn.Module, stream: Stream) -> torch.nn.Module:
        model = super().setup(model, stream)
        if stream.loss != "ce":
            raise ClbenchError(f"gdumb's sampler balances classes; {stream.name!r} is a regression (mse) stream")
        self.initial = copy.deepcopy(model.state_dict())
        return model

    def after_task(self, task: Task) -> None:
        """Offer the task's samples to the sampler, then re-initialise and fit the model on the memory."""
        self.heads[task.id] = task.head
        order = torch.randperm(len(task.train_x)).to(task.train_x.device)
        for start in range(0, len(order), 4096):
            idx = order[start:start + 4096]
            self.memory.add_greedy(task.inputs(task.train_x[idx]), as_units(task, task.train_y[idx]), task.id)
        self.model.load_state_dict(self.initial)
        self.fit()

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """Plain training, run only when ``epochs`` > 0 is given: it trains the model the refit then replaces."""
        out = self.model(x)
        return self.task_loss(out if task.head is None else out.index_select(1, task.head), y)

    def allowed(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Per sample, the output units its loss and prediction range over: its task's head (task-incremental)
        or every class in memory."""
        n_out = self.stream.num_outputs
        seen = torch.zeros(n_out, dtype=torch.bool, device=task_ids.device)
        seen[self.memory.classes()] = True
        rows = {}
        for t in task_ids.unique().tolist():
            head = self.heads.get(t)
            rows[t] = seen if head is None else torch.zeros(n_out, dtype=torch.bool, device=seen.device).index_fill(
                0, head, True)
        table = torch.stack([rows.get(t, seen) for t in range(max(rows) + 1)])
        return table[task_ids]

    def fit(self) -> None:
        """Train the (re-initialised) model on the memory alone with the authors' schedule."""
        x, y, task_ids = self.memory.data()
        mask = self.allowed(task_ids)
        self.seen_mask = mask.any(0)
        params = self.trainable_parameters()
        optimizer = torch.optim.SGD(params, lr=self.max_lr, momentum=self.momentum, weight_decay=self.weight_decay)
        self.model.train()
        for epoch in range(self.fit_epochs):
            for group in optimizer.param_groups:
                group["lr"] = sgdr_rate(epoch, self.max_lr, self.min_lr)
            order = torch.randperm(len(x)).to(x.device)
            for start in range(0, len(x), self.fit_batch_size):
                idx = order[start:start + self.fit_batch_size]
                logits = self.model(x[idx]).float().masked_fill(~mask[idx], float("-inf"))
                loss = F.cross_entropy(logits, y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.clip)
                optimizer.step()

    def predict(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        out = self.model(x)
        if task.head is not None:
            return out.index_select(1, task.head)
        return out if self.seen_mask is None else out.masked_fill(~self.seen_mask, float("-inf"))

    def extra_results(self) -> dict[str, Any]:
        return {"memory_size": self.memory.capacity, "memory_samples": len(self.memory),
                "memory_per_class": {str(c): n for c, n in sorted(self.memory.counts().items())}}
