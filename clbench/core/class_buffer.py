"""Class-balanced memory on the device, written once for every class-balanced memory method.

A :class:`ClassBalancedBuffer` holds at most ``capacity`` samples (model inputs, their class and their task
id) in tensors on the device, and for every class the ordered list of slots holding its samples (the order
is a priority: iCaRL and BiC keep the first ``m`` exemplars of a class when memory shrinks). Two ways in:

- :meth:`add_greedy`: GDumb's greedy class-balanced sampler (Prabhu, Torr & Dokania, ECCV 2020);
- :meth:`put` after :meth:`keep_first`: exemplar sets chosen elsewhere, e.g. by :func:`herding` (Rebuffi et
  al., iCaRL, CVPR 2017), with the memory split evenly over the classes seen.

Only the small bookkeeping (which slot holds which class) lives on the host; randomness comes from the global
torch generator, one draw per batch, so the same seed and thread count give the same memory.
"""
from __future__ import annotations

import dataclasses

import torch

from clbench.core.errors import ClbenchError
from clbench.core.types import Task


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` exemplars chosen by iCaRL's herding (Rebuffi et al. 2017, Algorithm 4).

    ``features`` (n, d) are L2-normalised; mu is their mean. Step k adds the sample, not chosen yet, that
    brings the mean of the k chosen features closest to mu:
    p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||. The order of the result is that priority.
    """
    n = len(features)
    m = min(int(m), n)
    feats = features if features.is_floating_point() else features.float()
    mu = feats.mean(0)
    squares = feats.pow(2).sum(1)
    chosen = torch.zeros(n, dtype=torch.bool, device=feats.device)
    total = torch.zeros_like(mu)
    picks = []
    for k in range(1, m + 1):
        # ||mu - (total + f) / k||^2 = ||c||^2 - 2 f.c / k + ||f||^2 / k^2 with c = mu - total / k: one
        # matrix-vector product a step and no (n, d) temporary (a fresh one per step fragments the heap)
        score = (squares / k - 2 * (feats @ (mu - total / k))).masked_fill(chosen, float("inf"))
        i = score.argmin()
        picks.append(i)
        chosen[i] = True
        total = total + feats[i]
    return torch.stack(picks) if picks else torch.zeros(0, dtype=torch.long, device=feats.device)


class ClassBalancedBuffer:
    """At most ``capacity`` samples on the device with, per class, its slots in priority order."""

    def __init__(self, capacity: int, name: str = "memory_size") -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ClbenchError(f"{name} must be a positive whole number of samples, e.g. {name}=500; got {capacity!r}")
        self.capacity = capacity
        self.x = self.y = self.task_ids = None
        self.slots: dict[int, list[int]] = {}
        self.free = list(range(capacity))
        self.seen: dict[int, int] = {}  # samples of each class offered to add_greedy

    def __len__(self) -> int:
        return self.capacity - len(self.free)

    def counts(self) -> dict[int, int]:
        """Samples held per class."""
        return {c: len(s) for c, s in self.slots.items() if s}

    def classes(self) -> list[int]:
        return sorted(self.counts())

    def _allocate(self, x: torch.Tensor) -> None:
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype, device=x.device)
            self.y = torch.zeros(self.capacity, dtype=torch.long, device=x.device)
            self.task_ids = torch.zeros(self.capacity, dtype=torch.long, device=x.device)

    def add_greedy(self, x: torch.Tensor, y: torch.Tensor, task_id: int) -> None:
        """GDumb's sampler, sample by sample in order: add while there is room; when full, a sample whose class
        is not the largest in memory replaces a random sample of the largest class (the first of them in
        class order on a tie); a sample of the largest class is not kept.

        Every class that lost samples then holds at least as many as the largest class minus one. The
        decisions run on the host over the labels; the device sees one write, the later sample winning a
        slot written twice (as when adding one by one).
        """
        self._allocate(x)
        labels = y.tolist()
        u = torch.rand(len(labels)).tolist()  # one draw per offered sample: which member of the largest class goes
        written: dict[int, int] = {}
        for i, (c, r) in enumerate(zip(labels, u)):
            self.seen[c] = self.seen.get(c, 0) + 1
            members = self.slots.setdefault(c, [])
            if self.free:
                slot = self.free.pop(0)
            else:
                largest = max(self.slots, key=lambda k: (len(self.slots[k]), -k))
                if len(members) >= len(self.slots[largest]):
                    continue
                victims = self.slots[largest]
                slot = victims.pop(min(int(r * len(victims)), len(victims) - 1))
            members.append(slot)
            written[slot] = i
        if written:
            slot = torch.tensor(list(written), dtype=torch.long, device=x.device)
            source = torch.tensor(list(written.values()), dtype=torch.long, device=x.device)
            self.x[slot], self.y[slot], self.task_ids[slot] = x[source], y[source].long(), task_id

    def keep_first(self, m: int) -> None:
        """Shrink every class to its first ``m`` samples (iCaRL's ReduceExemplarSet)."""
        for c, slots in self.slots.items():
            self.free += slots[m:]
            del slots[m:]
        self.free.sort()

    def put(self, c: int, x: torch.Tensor, task_id: int) -> None:
        """Store the rows of ``x`` (in priority order) as class ``c``'s exemplars after those it has."""
        if len(x) > len(self.free):
            raise ClbenchError(f"class-balanced memory: {len(x)} exemplars of class {c} do not fit in the "
                               f"{len(self.free)} free slots; shrink the other classes first (keep_first)")
        self._allocate(x)
        take, self.free = self.free[:len(x)], self.free[len(x):]
        slot = torch.tensor(take, dtype=torch.long, device=x.device)
        self.x[slot], self.y[slot], self.task_ids[slot] = x, c, task_id
        self.slots.setdefault(c, []).extend(take)

    def slots_of(self, classes: list[int] | None = None) -> torch.Tensor:
        """Slots of ``classes`` (default all), class by class in increasing class order, each in priority order."""
        keep = [s for c in sorted(self.slots) if classes is None or c in classes for s in self.slots[c]]
        device = self.x.device if self.x is not None else "cpu"
        return torch.tensor(keep, dtype=torch.long, device=device)

    def data(self, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, task ids) of the samples held (of ``classes``), in the order of :meth:`slots_of`."""
        if self.x is None:
            raise ClbenchError("class-balanced memory is empty; add samples first")
        slot = self.slots_of(classes)
        return self.x[slot], self.y[slot], self.task_ids[slot]


def task_units(task: Task) -> list[int]:
    """The output units of ``task``'s classes: its head (task-incremental) or its class list."""
    if task.head is not None:
        return [int(u) for u in task.head.tolist()]
    if task.classes is not None:
        return [int(c) for c in task.classes]
    return sorted(int(c) for c in task.train_y.unique().tolist())


def as_units(task: Task, y: torch.Tensor) -> torch.Tensor:
    """Targets of ``task`` as output units (task-incremental targets are positions in the head)."""
    return y.long() if task.head is None else task.head[y.long()]


def with_samples(task: Task, x: torch.Tensor, units: torch.Tensor) -> Task:
    """A training-only copy of ``task`` whose training set is ``x`` (model inputs) with targets ``units``
    (output units, so no head), keeping the task's augmentation; for training on new data plus memory."""
    return dataclasses.replace(task, train_x=x, train_y=units, transform=None, head=None)
