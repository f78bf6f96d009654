"""ER-ACE: experience replay with an asymmetric cross-entropy that spares the old classes' logits.

Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky, "New Insights on Reducing Abrupt Representation
Change in Online Continual Learning", ICLR 2022 (Section 4, ER-ACE)::

    for each batch (x, y):
        seen = seen + classes(y)
        allowed = classes(y) + (classes not seen yet)         the incoming batch's softmax leaves out the
        loss = CE(f(x) with logits outside allowed masked, y)  classes seen before and absent from the batch
        if M is not empty:
            (x', y') ~ M                                       replay_batch_size samples
            loss += CE(f(x'), y')                              over all classes
        theta = theta - lr * grad loss
        M = reservoir(M, (x, y))

The mask is the authors' (github pclucas14/AML, ``methods/er_ace.py``, kept in Mammoth's ``models/er_ace.py``):
``mask[:, present] = 1; mask[:, seen_so_far.max():] = 1``, i.e. the classes present in the batch plus the
classes numbered from the largest seen one up. Here the second part is the set of classes not seen yet, which
is the same when classes arrive in increasing order (clbench's default class order) except that the authors
also keep the largest seen class when the batch lacks it; the set form stays right for a shuffled class order.
As in the authors' code (which forces ER-ACE to be task-free) the mask and the replay start with the first
batch. Buffer batches are drawn without replacement; ``replay_batch_size`` defaults to the incoming batch size
(the authors' ``buffer_batch_size`` equals their batch size, 10). The authors, and Mammoth by default
(``use_custom_classifier``), also swap the network's last layer for a cosine classifier (scale 10); clbench
keeps the suite's model, so ER-ACE compares with replay on the same network. A classification method: a
regression stream is refused. In the task-incremental scenario the mask acts inside the task's head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clbench.batched import ReservoirAdapter, batched_form
from clbench.core.buffer import ReservoirBuffer, check_sizes, replayed_loss
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Stream, Task


def asymmetric_logits(logits: torch.Tensor, units: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``logits`` (..., batch, outputs) with the units outside (``units`` (..., batch) present in the batch) +
    (units not ``seen`` (..., outputs)) set to the dtype's lowest value; their gradient is zero. Leading
    dimensions are optional: the batched form passes every member's logits, batch units and seen units at once."""
    allowed = (~seen).scatter(-1, units, True)
    return logits.masked_fill(~allowed.unsqueeze(-2), torch.finfo(logits.dtype).min)


@register_strategy("er-ace")
class ERACE(Strategy):
    """Experience replay with asymmetric cross-entropy (Caccia et al. 2022)."""
    # ER-ACE has no weight of its own: the buffer is a memory budget fixed by the suite and the replay batch
    # size follows the incoming one; only the training settings are searched
    search_space = {}

    def __init__(self, buffer_size: int = 500, replay_batch_size: int | None = None, **train) -> None:
        super().__init__(**train)
        check_sizes("er-ace", buffer_size=buffer_size, replay_batch_size=replay_batch_size)
        if buffer_size is None:
            raise ClbenchError("er-ace: buffer_size must be a positive whole number, e.g. buffer_size=500")
        self.buffer_size = buffer_size
        self.replay_batch_size = replay_batch_size
        self.buffer = ReservoirBuffer(buffer_size)
        self.tasks: dict[int, Task] = {}
        self.seen: torch.Tensor | None = None  # (outputs,) bool: output units that were a target so far

    def setup(self, model: nn.Module, stream: Stream) -> nn.Module:
        if stream.loss != "ce":
            raise ClbenchError(f"er-ace masks class logits and needs a classification stream; {stream.name!r} is a "
                               "regression (MSE) stream: use replay or der there")
        return super().setup(model, stream)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        logits = self.forward(x, task)
        units = y if task.head is None else task.head[y]  # the output units of the batch's classes
        if self.seen is None:
            self.seen = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        self.seen[units] = True
        masked = asymmetric_logits(logits, units, self.seen)
        loss = F.cross_entropy(masked if task.head is None else masked.index_select(1, task.head), y) + self.penalty()
        if len(self.buffer):
            batch = self.buffer.sample(self.replay_batch_size or len(x), replace=False)
            loss = replayed_loss(self, batch, self.tasks, loss)
        self.tasks[task.id] = task
        self.buffer.add(x=x.detach(), y=y, task=task.id)
        return loss

    def extra_results(self) -> dict:
        return {"buffer_size": self.buffer_size, "memory_samples": len(self.buffer), "samples_seen": self.buffer.seen}

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(ERACE)
class ERACEAdapter(ReservoirAdapter):
    """Every member's seen units (B, outputs) and reservoir buffer (B, size, ...) stacked; the incoming loss from
    asymmetric_logits on all members at once, the replay term over all classes, each member drawing its buffer
    batch (without replacement) and slots from its own RNG stream."""

    @staticmethod
    def refuse(stream: Stream, strategy: Strategy) -> str | None:
        return None if stream.loss == "ce" else "er-ace masks class logits and needs a classification stream"

    def start(self) -> None:
        self.seen = None

    def incoming_loss(self, outputs, y, t):
        head = self.g.data[t]["head"]
        units = y if head is None else head.gather(1, y)  # the output units of the batch's classes
        if self.seen is None:
            self.seen = torch.zeros(outputs.shape[0], outputs.shape[2], dtype=torch.bool, device=outputs.device)
        self.seen.scatter_(1, units, True)
        masked = asymmetric_logits(outputs, units, self.seen)
        return self.g.per_sample_loss(self.g.head(masked, t), y).mean(1)

    def extra_loss(self, x, y, t, loss, outputs, sharing):
        g, buffer, n = self.g, self.buffer, x.shape[1]
        k = (g.members[0].strategy.replay_batch_size or n) if buffer.filled else 0
        with torch.no_grad():
            drawn = g.draw(lambda: (buffer.picks(k) if k else None, buffer.slots(n)))
        if k:
            b = buffer.take(torch.stack([picks for picks, _ in drawn]))
            loss = loss + g.replayed_loss(b["x"], b["y"], b["task"])
        buffer.offer(torch.stack([slots for _, slots in drawn]), x, y, t, sharing)
        return loss

    def finish(self) -> None:
        """Tell the members what their extra_results report, and what they have seen."""
        super().finish()
        for b, m in enumerate(self.g.members):
            if self.seen is not None:
                m.strategy.seen = self.seen[b].clone()
