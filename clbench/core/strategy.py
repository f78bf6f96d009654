"""The Strategy base class: the hooks the engine calls.

The engine calls, in order::

    model = strategy.setup(model, stream)          # once
    for task in stream:
        strategy.before_task(task)
        for each step:  loss = mean(strategy.training_loss(x, y, t) for t in strategy.train_tasks(task, seen))
                        loss.backward(); strategy.after_backward()   # may edit the gradients
                        optimizer step; strategy.after_step()
        strategy.after_task(task)                  # Fisher, anchors, freezing ...
        evaluate every task with strategy.predict(x, t)

A new strategy overrides only what it changes: usually ``penalty`` and
``after_task`` (regularisers) or ``forward`` (gating, task-specific modules).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clbench.core.errors import ClbenchError
from clbench.core.types import SCENARIOS, Stream, Task

OPTIMIZERS = ("sgd", "adam", "adamw")


def check_training_settings(epochs: Any = None, lr: Any = None, batch_size: Any = None,
                            optimizer: Any = None) -> dict[str, Any]:
    """The four training settings checked (``None``: not set); a bad one is a ClbenchError naming it and the fix."""
    def whole(key: str, value: Any, low: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            example = 5 if key == "epochs" else 128
            raise ClbenchError(f"{key} must be a whole number >= {low}, e.g. {key}={example}; got {value!r}")
        return value

    out = {"epochs": whole("epochs", epochs, 0), "batch_size": whole("batch_size", batch_size, 1)}
    number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
    if lr is not None and (not number or not math.isfinite(lr) or lr <= 0):
        raise ClbenchError(f"lr must be a positive number, e.g. lr=0.01; got {lr!r}")
    out["lr"] = None if lr is None else float(lr)
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ClbenchError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    out["optimizer"] = optimizer
    return out


class Strategy:
    """Plain sequential training (the base every strategy extends).

    Training settings (epochs, lr, batch_size, optimizer) not given take the
    strategy's own ``train_defaults``, then the stream's recommendation.
    """

    name: ClassVar[str] = ""
    scenarios: ClassVar[tuple[str, ...]] = SCENARIOS
    uses_task_id_at_test: ClassVar[bool] = False
    #: Training settings this strategy needs whatever the stream recommends, e.g. ``{"optimizer": "adam",
    #: "lr": 1e-3}``; an explicit argument still wins. Shown by ``clbench list``.
    train_defaults: ClassVar[dict[str, Any]] = {}
    # Hyper-parameters `clbench tune` searches: {argument: ("log"|"float", low, high) | ("int", low, high)
    #  | ("choice", [values])}. Declare what matters for this strategy, with a comment saying why.
    search_space: ClassVar[dict[str, tuple]] = {}

    def __init__(
        self,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        optimizer: str | None = None,
        shuffle: bool = True,
    ) -> None:
        checked = check_training_settings(epochs, lr, batch_size, optimizer)
        self.epochs, self.lr, self.batch_size, self.optimizer = (checked[k] for k in ("epochs", "lr", "batch_size",
                                                                                         "optimizer"))
        self.shuffle = shuffle  # False: batches in the stored order every epoch (Hiratani's pm scripts)
        self.model: nn.Module | None = None
        self.stream: Stream | None = None

    # --- hooks -------------------------------------------------------------
    def setup(self, model: nn.Module, stream: Stream) -> nn.Module:
        """Called once before the first task; may wrap or modify the model."""
        if stream.scenario not in self.scenarios:
            raise ClbenchError(
                f"strategy {self.name!r} supports the {'/'.join(self.scenarios)}-incremental scenario(s), "
                f"but stream {stream.name!r} is {stream.scenario}-incremental; pick another strategy or scenario"
            )
        self.model, self.stream = model, stream
        return model

    def before_task(self, task: Task) -> None:
        """Called before training on ``task``."""

    def train_tasks(self, task: Task, seen: list[Task]) -> list[Task]:
        """The tasks whose training data the current task trains on (one batch of each per step, the step's loss
        the mean of theirs)."""
        return [task]

    def forward(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        """Model outputs for inputs ``x`` of ``task`` (before the task's head is selected)."""
        return self.model(x)

    def penalty(self) -> torch.Tensor | float:
        """Regularisation term added to the task loss."""
        return 0.0

    def after_backward(self) -> None:
        """Called after ``loss.backward()``, before the optimizer step: may edit the gradients (A-GEM's projection)."""

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. path integrals of SI)."""

    def after_task(self, task: Task) -> None:
        """Called after training on ``task``, before evaluation."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates for the next task."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_results(self) -> dict[str, Any]:
        """Anything the strategy wants stored in the result (e.g. parameter growth)."""
        return {}

    # --- helpers shared by all strategies -----------------------------------
    def predict(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        """Outputs restricted to the task's head (task-incremental) or all outputs."""
        out = self.forward(x, task)
        return out if task.head is None else out.index_select(1, task.head)

    def task_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The stream's loss: cross-entropy, or MSE averaged over samples and outputs."""
        if self.stream.loss == "ce":
            return F.cross_entropy(outputs, targets)
        return F.mse_loss(outputs, targets)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """Task loss on a batch plus the penalty."""
        return self.task_loss(self.predict(x, task), y) + self.penalty()

    def settings(self) -> dict[str, Any]:
        """Training settings in force: the given ones, else this strategy's ``train_defaults``, else the stream's."""
        d = self.stream.defaults
        given = {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "optimizer": self.optimizer}
        own = check_training_settings(**self.train_defaults)
        settings = {k: v if v is not None else own[k] if own[k] is not None else getattr(d, k) for k, v in given.items()}
        return {**settings, "shuffle": bool(self.shuffle)}


def parameter_vector(model: nn.Module) -> torch.Tensor:
    """All trainable parameters of ``model`` flattened into one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
