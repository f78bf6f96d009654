"""Reservoir sampling on the device, written once for every memory method and both loops.

Vitter (1985), "Random sampling with a reservoir": the n-th sample seen (0-based) goes to a uniformly drawn
slot in [0, n] and is kept if that slot is below the buffer size, so every sample seen so far is kept with
equal probability size / n_seen. A batch is added in one vectorised step; when two samples of one batch draw
the same slot the later one wins, exactly as when they are added one by one (deterministic for any thread
count, unlike index assignment with repeated indices).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from clbench.core.errors import ClbenchError

if TYPE_CHECKING:
    from clbench.core.strategy import Strategy
    from clbench.core.types import Task


def reservoir_slots(seen: int, n: int, size: int, device: torch.device | str) -> torch.Tensor:
    """Slots (n,) for the next ``n`` samples after ``seen`` were offered; ``>= size`` means "not kept".

    Draws ``n`` numbers from the global torch generator (one ``torch.rand`` call), so a run's random stream is
    the same whichever loop adds the samples.
    """
    index = torch.arange(seen, seen + n, device=device)
    return torch.where(index < size, index, (torch.rand(n, device=device) * (index + 1)).long())


def last_writers(slots: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Who writes where when ``slots`` (..., n) are written in order, the later sample winning a shared slot.

    Returns index tensors ``(*leading, slot, sample)``: for every slot written, the leading indices (e.g. the
    member of a batched run), the slot and the sample that ends up there.
    """
    lead, n = slots.shape[:-1], slots.shape[-1]
    flat = slots.reshape(-1, n)
    rows = flat.shape[0]
    last = torch.full((rows, size), -1, dtype=torch.long, device=slots.device)
    row, sample = (flat < size).nonzero(as_tuple=True)
    last.view(-1).scatter_reduce_(0, row * size + flat[row, sample], sample, reduce="amax")
    row, slot = (last >= 0).nonzero(as_tuple=True)
    sample = last[row, slot]
    leading = torch.unravel_index(row, lead) if lead else ()
    return (*leading, slot, sample)


def check_sizes(strategy: str, **values: Any) -> None:
    """Each of ``values`` (memory sizes, batch sizes) is None or a positive whole number, else one ClbenchError."""
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ClbenchError(f"{strategy}: {key} must be a positive whole number, e.g. {key}=500; got {value!r}")


def by_task(task_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``(task id, boolean mask)`` for each task present in a replayed batch, in increasing id.

    Samples of different tasks may read different heads or gates, so a replayed batch is scored task by task.
    """
    return [(task_id, task_ids == task_id) for task_id in task_ids.unique().tolist()]


def replayed_loss(strategy: "Strategy", batch: dict[str, torch.Tensor], tasks: dict[int, "Task"],
                  total: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``total`` plus the stream's loss on a replayed batch (fields ``x``, ``y``, ``task``), averaged over its
    samples, each sample scored through its own task (head, gate) with ``strategy.predict``."""
    k = len(batch["task"])
    for task_id, mask in by_task(batch["task"]):
        total = total + strategy.task_loss(strategy.predict(batch["x"][mask], tasks[task_id]), batch["y"][mask]) * (
            mask.sum() / k)
    return total


class ReservoirBuffer:
    """A reservoir of ``size`` samples on the device: named tensors of one leading length (inputs, targets, task
    ids, DER's logits ...), allocated on the first :meth:`add`.

    Every random number comes from the global torch generator, so same seed + same thread count gives the same
    contents bit for bit.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0  # samples offered so far
        self.data: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The filled part of one field."""
        return self.data[name][: len(self)]

    def add(self, **fields: torch.Tensor | int) -> None:
        """Offer a batch by reservoir sampling; an ``int`` field (e.g. a task id) applies to every sample."""
        n = next(len(v) for v in fields.values() if isinstance(v, torch.Tensor))
        if n == 0:
            return
        first = next(v for v in fields.values() if isinstance(v, torch.Tensor))
        if not self.data:
            for name, v in fields.items():
                shape, dtype = (v.shape[1:], v.dtype) if isinstance(v, torch.Tensor) else ((), torch.long)
                self.data[name] = torch.empty((self.size, *shape), dtype=dtype, device=first.device)
        elif set(fields) != set(self.data):
            raise ValueError(f"buffer fields are {sorted(self.data)}, got {sorted(fields)}")
        slot, source = last_writers(reservoir_slots(self.seen, n, self.size, first.device), self.size)
        for name, v in fields.items():
            self.data[name][slot] = v[source] if isinstance(v, torch.Tensor) else v
        self.seen += n

    def sample(self, k: int, replace: bool = True) -> dict[str, torch.Tensor]:
        """``min(k, len)`` samples drawn uniformly (with replacement: ``k`` samples) from the filled part."""
        filled = len(self)
        device = next(iter(self.data.values())).device
        if replace:
            pick = torch.randint(0, filled, (k,), device=device)
        else:
            pick = torch.randperm(filled, device=device)[:k]
        return {name: v[pick] for name, v in self.data.items()}
