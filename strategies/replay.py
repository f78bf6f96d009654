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

from clbench.batched import Adapter, batched_form
from clbench.core.buffer import ReservoirBuffer, check_sizes, last_writers, replayed_loss, reservoir_slots
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
class ReplayAdapter(Adapter):
    """Reservoir buffers stacked (B, size, ...); each member draws its picks and slots from its own RNG stream."""

    order_matters = True

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.buffer_size, strategy.replay_batch_size)

    def refresh(self) -> None:
        if not hasattr(self, "x"):
            self.x = self.y = self.task_ids = None
            self.filled = self.seen = 0
            self.size = self.g.members[0].strategy.buffer_size

    def extra_loss(self, x, y, t, loss, outputs, sharing):
        g, B, dev = self.g, self.g.B, self.g.dev
        picks = slots = None
        n, k = x.shape[1], 0
        if self.filled:
            k = min(g.members[0].strategy.replay_batch_size or n, self.filled)
        with torch.no_grad():
            p_list, s_list, drawn = [], [], {}
            for b in range(B):
                key = g.rng_key(b)
                if key not in drawn:  # members whose random streams are equal draw alike: draw once
                    with g.rng(b):
                        picks = torch.randint(0, self.filled, (k,), device=dev) if k else None
                        slots = reservoir_slots(self.seen, n, self.size, dev)
                    drawn[key] = (picks, slots, g.rng_states[b])
                picks, slots, g.rng_states[b] = drawn[key]
                p_list.append(picks)
                s_list.append(slots)
            slots = torch.stack(s_list)
            picks = torch.stack(p_list) if k else None
        if k:
            rows = g.member_index
            bx, by, bt = self.x[rows, picks], self.y[rows, picks], self.task_ids[rows, picks]
            for j in torch.unique(bt).tolist():
                per_sample = g.per_sample_loss(g.predict(bx, j), by)
                loss = loss + (per_sample * (bt == j)).sum(1) / k
        self._add(x.detach(), y, t, slots, sharing)
        return loss

    @torch.no_grad()
    def _add(self, x, y, t, slots, sharing) -> None:
        B, dev = self.g.B, self.g.dev
        if self.x is None:
            self.x = torch.empty((B, self.size, *x.shape[2:]), dtype=x.dtype, device=dev)
            self.y = torch.empty((B, self.size, *y.shape[2:]), dtype=y.dtype, device=dev)
            self.task_ids = torch.empty((B, self.size), dtype=torch.long, device=dev)
        # every member's kept samples in one write; a slot drawn twice keeps the later sample, as in the engine
        member, slot, sample = last_writers(slots, self.size)
        source = member if sharing is None else sharing.index[member]
        self.x[member, slot], self.y[member, slot], self.task_ids[member, slot] = x[source, sample], y[member, sample], t
        self.seen += x.shape[1]
        self.filled = min(self.seen, self.size)

    def finish(self) -> None:
        """Tell the members what their extra_results report."""
        for m in self.g.members:
            m.strategy.buffer.seen = self.seen

    def bytes_per_member(self, strategy, stream, model):
        task = stream.tasks[0]
        return strategy.buffer_size * int(task.inputs(task.train_x[:1]).numel() + 2) * 4
