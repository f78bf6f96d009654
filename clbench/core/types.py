"""Core data types: Task and Stream.

A :class:`Task` holds one task's train and test tensors (kept compact; a
per-task input transform runs on the device), a :class:`Stream` is the ordered
list of tasks plus what a learner needs to know about them (scenario, loss,
input shape, number of outputs, recommended training settings, provenance).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from clbench.core.errors import ClbenchError

Scenario = Literal["task", "domain", "class"]
SCENARIOS: tuple[str, ...] = ("task", "domain", "class")
LossKind = Literal["ce", "mse"]


@dataclass
class Task:
    """One task of a stream.

    ``train_x``/``test_x`` may be compact (e.g. uint8 images); ``transform``
    maps a batch of them, already on the device, to float model inputs (e.g.
    scaling plus a pixel permutation); ``augment`` runs after it on training
    batches only. ``head`` lists the model output units
    this task reads (task-incremental multi-head); targets are then indices
    into ``head``. ``None`` means all outputs.
    """

    id: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    head: torch.Tensor | None = None
    classes: list[int] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if len(x) != len(y):
                raise ClbenchError(
                    f"task {self.id}: {split}_x has {len(x)} samples but {split}_y has {len(y)}; "
                    "inputs and targets must have the same length"
                )

    def inputs(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Model inputs for a batch of stored inputs: the task transform, then (training only) augmentation."""
        x = self.transform(x) if self.transform is not None else x.float()
        return self.augment(x) if train and self.augment is not None else x

    def to(self, device: torch.device | str) -> "Task":
        """A copy with all tensors (data, head, tensors inside the transform) on ``device``."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        for key in ("transform", "augment"):
            if hasattr(moved[key], "to"):
                moved[key] = moved[key].to(device)
        return Task(**moved)


@dataclass
class TrainDefaults:
    """Training settings a stream recommends; a strategy's own arguments override them."""

    model: str = "mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    optimizer: str = "sgd"


@dataclass
class Stream:
    """An ordered sequence of tasks and what a learner needs to know about it."""

    name: str
    tasks: list[Task]
    scenario: Scenario
    loss: LossKind
    input_shape: tuple[int, ...]
    num_outputs: int
    defaults: TrainDefaults = field(default_factory=TrainDefaults)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ClbenchError(f"scenario must be one of {', '.join(SCENARIOS)}, got {self.scenario!r}")
        if self.loss not in ("ce", "mse"):
            raise ClbenchError(f"loss must be 'ce' or 'mse', got {self.loss!r}")
        if not self.tasks:
            raise ClbenchError(f"stream {self.name!r} has no tasks; ask for at least one")
        for k, task in enumerate(self.tasks, 1):
            for split in ("train", "test"):
                if len(getattr(task, f"{split}_x")) == 0:
                    raise ClbenchError(
                        f"stream {self.name!r}: task {k} has no {split} samples, so it cannot be "
                        f"{'trained' if split == 'train' else 'scored'}; ask for more {split}_samples (or leave it "
                        "out to use all)")

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def to_torch(self) -> list[dict[str, torch.utils.data.Dataset]]:
        """Plain torch datasets, one ``{"train": ..., "test": ...}`` per task.

        Each item is ``(input, target, task_id)`` with the task transform
        applied, so the datasets work in any training loop.
        """
        from clbench.data.export import to_torch

        return to_torch(self)

    def to_avalanche(self):
        """This stream as an Avalanche benchmark (needs ``avalanche-lib``)."""
        from clbench.data.export import to_avalanche

        return to_avalanche(self)
