"""Experience replay with a reservoir buffer.

Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019
(reservoir sampling: Vitter 1985)::

    each step:  loss = loss(current batch) + loss(a batch drawn from the buffer)
                add the current batch to the buffer by reservoir sampling (every sample seen
                so far is kept with equal probability buffer_size / n_seen; when two samples of a
                batch draw the same slot the later one wins, as in one-by-one sampling)

The buffer holds model inputs (after the task transform), targets and task ids, on the device.
"""
from __future__ import annotations

import torch

from clbench.batched import ReservoirAdapter, batched_form
from clbench.core.buffer import ReservoirBuffer, check_sizes, replayed_loss
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Task


@register_strategy("replay")
class Replay(Strategy):
    """Experience replay from a reservoir buffer of buffer_size samples (Chaudhry et al. 2019)."""
    # buffer_size is a memory budget fixed by the suite, not a knob to tune; nothing else to search
    search_space = {}

    def __init__(self, buffer_size: int = 500, replay_batch_size: int | None = None, **train) -> None:
        super().__init__(**train)
        check_sizes("replay", buffer_size=buffer_size, replay_batch_size=replay_batch_size)
        if buffer_size is None:
            raise ClbenchError("replay: buffer_size must be a positive whole number, e.g. buffer_size=500; got None")
        self.buffer_size = buffer_size
        self.replay_batch_size = replay_batch_size
        self.buffer = ReservoirBuffer(buffer_size)
        self.tasks: dict[int, Task] = {}

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        loss = super().training_loss(x, y, task)
        if len(self.buffer):
            k = min(self.replay_batch_size or len(x), len(self.buffer))
            loss = replayed_loss(self, self.buffer.sample(k), self.tasks, loss)  # each sample through its own task
        self.tasks[task.id] = task
        self.buffer.add(x=x.detach(), y=y, task=task.id)
        return loss

    def extra_results(self) -> dict:
        return {"buffer_size": self.buffer_size, "memory_samples": len(self.buffer), "samples_seen": self.buffer.seen}

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(Replay)
class ReplayAdapter(ReservoirAdapter):
    """Reservoir buffers stacked (B, size, ...); each member draws its picks and slots from its own RNG stream."""

    def extra_loss(self, x, y, t, loss, outputs, sharing):
        g, buffer, n = self.g, self.buffer, x.shape[1]
        k = min(g.members[0].strategy.replay_batch_size or n, buffer.filled)
        with torch.no_grad():  # the engine's order: picks (when the buffer holds samples), then slots
            drawn = g.draw(lambda: (torch.randint(0, buffer.filled, (k,), device=g.dev) if k else None,
                                    buffer.slots(n)))
        if k:
            b = buffer.take(torch.stack([picks for picks, _ in drawn]))
            loss = loss + g.replayed_loss(b["x"], b["y"], b["task"])
        buffer.offer(torch.stack([slots for _, slots in drawn]), x, y, t, sharing)
        return loss
