"""A stream as plain torch datasets or as an Avalanche benchmark."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import TensorDataset

from clbench.core.errors import ClbenchError

if TYPE_CHECKING:  # type hints only: clbench.core.types calls into this module (Stream.to_torch)
    from clbench.core.types import Stream, Task


def _materialise(task: Task, split: str, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = getattr(task, f"{split}_x"), getattr(task, f"{split}_y")
    inputs = torch.cat([task.inputs(x[i:i + batch]) for i in range(0, len(x), batch)]) if len(x) else x.float()
    return inputs, y


def to_torch(stream: Stream) -> list[dict[str, TensorDataset]]:
    """Per task ``{"train": ds, "test": ds}``; items are (input, target, task_id) with the transform applied.

    task_id is the task's index in the stream whatever the scenario (unlike ``to_avalanche``'s task labels).
    """
    out = []
    for task in stream.tasks:
        splits = {}
        for split in ("train", "test"):
            x, y = _materialise(task, split)
            splits[split] = TensorDataset(x, y, torch.full((len(y),), task.id, dtype=torch.long))
        out.append(splits)
    return out


def task_label(stream: Stream, task: Task) -> int:
    """Avalanche's task label of ``task``: its id in task-incremental streams, else 0."""
    return task.id if stream.scenario == "task" else 0


def to_avalanche(stream: Stream):
    """An Avalanche benchmark with one experience per task (targets and task labels set).

    Task labels follow Avalanche's own benchmarks: a task-incremental stream gives
    experience t the task label t (the scenario provides the task id); domain- and
    class-incremental streams give task label 0 to every experience (as Avalanche's
    ``PermutedMNIST`` and ``SplitMNIST`` do), so task-aware Avalanche strategies and
    metrics see no task id there. Classification streams only: class-incremental
    streams keep global class ids; task-incremental ones use labels local to each
    task's head (read them with a multi-head model, or offset them yourself).
    """
    try:
        from avalanche.benchmarks import dataset_benchmark
        from avalanche.benchmarks.utils import (
            _make_taskaware_tensor_classification_dataset,
        )
    except ImportError as e:
        raise ClbenchError(f"to_avalanche needs avalanche-lib ({e}); install it with "
                           "`pip install 'clbench[avalanche]'`") from None
    if stream.loss != "ce":
        raise ClbenchError(f"stream {stream.name!r} is a regression stream; Avalanche benchmarks here are "
                           "classification only: use a classification readout or to_torch()")
    splits: dict[str, list] = {"train": [], "test": []}
    for task in stream.tasks:
        for split in ("train", "test"):
            x, y = _materialise(task, split)
            splits[split].append(_make_taskaware_tensor_classification_dataset(
                x, y, targets=y.tolist(), task_labels=task_label(stream, task)))
    return dataset_benchmark(splits["train"], splits["test"])
