"""Every member's reservoir buffer at once: named fields stacked (B, size, ...), for the replay-based batched forms.

The reservoir rule is clbench.core.buffer's, called, not copied: each member draws its slots with
:func:`~clbench.core.buffer.reservoir_slots` in its own random stream (see ``Group.draw``), and
:func:`~clbench.core.buffer.last_writers` keeps the later sample of a slot drawn twice, as the engine does.
All members of a batch see the same number of samples, so they share ``seen`` and ``filled``.
"""
from __future__ import annotations

import torch

from clbench.batched.adapter import Adapter
from clbench.batched.stacked import Sharing
from clbench.core.buffer import last_writers, reservoir_slots


class StackedReservoir:
    """B reservoirs of ``size`` samples; fields (inputs, targets, task ids, logits ...) allocated on the first add."""

    def __init__(self, members: int, size: int, device: torch.device) -> None:
        self.B, self.size, self.dev = members, size, device
        self.seen = 0  # samples offered to each member so far
        self.data: dict[str, torch.Tensor] = {}
        self.member = torch.arange(members, device=device)[:, None]

    @property
    def filled(self) -> int:
        return min(self.seen, self.size)

    def slots(self, n: int) -> torch.Tensor:
        """The next ``n`` samples' slots, drawn from the global generator (call it in the member's stream)."""
        return reservoir_slots(self.seen, n, self.size, self.dev)

    def picks(self, k: int) -> torch.Tensor:
        """``min(k, filled)`` distinct slots, as ``ReservoirBuffer.sample(k, replace=False)`` draws them."""
        return torch.randperm(self.filled, device=self.dev)[:k]

    @torch.no_grad()
    def add(self, slots: torch.Tensor, fields: dict[str, torch.Tensor | int],
            rows: dict[str, torch.Tensor] | None = None) -> None:
        """Offer one batch to every member: ``slots`` (B, n) from :meth:`slots`; each field (B, n, ...), or an int
        for every sample, or (V, n, ...) read by member b at row ``rows[name][b]`` (inputs shared by members)."""
        rows = rows or {}
        if not self.data:
            for name, v in fields.items():
                shape, dtype = (v.shape[2:], v.dtype) if isinstance(v, torch.Tensor) else ((), torch.long)
                self.data[name] = torch.empty((self.B, self.size, *shape), dtype=dtype, device=self.dev)
        member, slot, sample = last_writers(slots, self.size)  # one write for all members; the later sample wins
        for name, v in fields.items():
            if isinstance(v, torch.Tensor):
                v = v[member if name not in rows else rows[name][member], sample]
            self.data[name][member, slot] = v
        self.seen += slots.shape[1]

    def offer(self, slots: torch.Tensor, x: torch.Tensor, y: torch.Tensor, task: int, sharing: Sharing | None,
              **more: torch.Tensor) -> None:
        """Add the incoming batch of the batched loop: inputs ``x`` as it gathered them (one row per member, or
        rows shared as ``sharing`` says), targets ``y`` (B, n, ...), the task index, and any ``more`` fields."""
        rows = None if sharing is None else {"x": sharing.index}
        self.add(slots, {"x": x.detach(), "y": y, "task": task, **more}, rows)

    def take(self, picks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every field at each member's own picks (B, k) -> (B, k, ...)."""
        return {name: v[self.member, picks] for name, v in self.data.items()}


class ReservoirAdapter(Adapter):
    """What the batched forms of reservoir-replay strategies share (replay, DER, DER++, ER-ACE): one
    StackedReservoir of ``strategy.buffer_size`` samples a member, the settings a batch must share, the
    members' sample counts written back, and the memory estimate."""

    order_matters = True

    @staticmethod
    def signature(strategy) -> tuple:
        return (strategy.buffer_size, strategy.replay_batch_size)

    def refresh(self) -> None:
        if not hasattr(self, "buffer"):
            self.buffer = StackedReservoir(self.g.B, self.g.members[0].strategy.buffer_size, self.g.dev)
            self.start()

    def start(self) -> None:
        """Stack whatever else the strategy keeps (called once, after the buffer is made)."""

    def finish(self) -> None:
        """Tell the members what their extra_results report."""
        for m in self.g.members:
            m.strategy.buffer.seen = self.buffer.seen

    def stored_floats(self, stream) -> int:
        """Numbers a sample stores besides its input, target and task id (DER: the logits)."""
        return 0

    def bytes_per_member(self, strategy, stream, model) -> int:
        task = stream.tasks[0]
        return strategy.buffer_size * int(task.inputs(task.train_x[:1]).numel() + 2 + self.stored_floats(stream)) * 4
