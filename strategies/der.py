"""Dark Experience Replay (DER) and DER++: replay the logits a sample had when it entered the buffer.

Buzzega, Boschini, Porrello, Abati & Calderara, "Dark Experience for General Continual Learning: a Strong,
Simple Baseline", NeurIPS 2020 (Algorithms 1 and 2)::

    M = {}
    for each batch (x, y):
        (x', z') ~ M                                           a random buffer batch, with its stored logits
        z = h(x)                                               all output units, before this step's update
        loss = loss(y, f(x)) + alpha * MSE(h(x'), z')
        DER++:  (x'', y'') ~ M, a second batch drawn independently;  loss += beta * loss(y'', f(x''))
        theta = theta - lr * grad loss
        M = reservoir(M, (x, y, z))

The paper writes ||z' - h(x')||^2; its code (Mammoth, ``models/der.py``) takes ``F.mse_loss``, the mean over
samples and units, and the published alpha values are on that scale: so is this one. Buffer batches are drawn
without replacement, ``replay_batch_size`` of them (default: the incoming batch size, Mammoth's
``minibatch_size``). Defaults alpha = 1.0 (DER) and alpha = 1.0, beta = 0.5 (DER++) are Mammoth's best_args
(``utils/best_args.py``) for a 500-sample buffer on both MNIST protocols (perm-mnist and seq-mnist); for
seq-cifar10 it lists DER alpha 0.3 and DER++ alpha 0.2, beta 0.5. The buffer holds model inputs as the
model saw them (after the transform and any augmentation: Mammoth stores unaugmented inputs and augments
them again on replay), targets, task ids and the float32 logits of all output units. Every scenario and
both losses work: on a regression stream the "logits" are the outputs and DER++'s term is the stream's MSE.
"""
from __future__ import annotations

import torch

from clbench.batched import ReservoirAdapter, batched_form, member_numbers
from clbench.core.buffer import ReservoirBuffer, by_task, check_sizes, replayed_loss
from clbench.core.errors import ClbenchError, check_weight
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Task


@register_strategy("der")
class DER(Strategy):
    """Dark experience replay: match the logits stored at insertion on a buffer batch (Buzzega et al. 2020)."""
    # alpha weighs a loss ratio: log scale over the range Mammoth's best_args span (0.1 to 1); buffer_size is a
    # memory budget fixed by the suite, not tuned
    search_space = {"alpha": ("log", 0.03, 3.0)}

    def __init__(self, alpha: float = 1.0, buffer_size: int = 500, replay_batch_size: int | None = None,
                 **train) -> None:
        super().__init__(**train)
        check_sizes(self.name, buffer_size=buffer_size, replay_batch_size=replay_batch_size)
        if buffer_size is None:
            raise ClbenchError(f"{self.name}: buffer_size must be a positive whole number, e.g. buffer_size=500")
        self.alpha = check_weight(f"{self.name}: alpha", alpha)
        self.buffer_size = buffer_size
        self.replay_batch_size = replay_batch_size
        self.buffer = ReservoirBuffer(self.buffer_size)
        self.tasks: dict[int, Task] = {}

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        z = self.forward(x, task)
        loss = self.task_loss(z if task.head is None else z.index_select(1, task.head), y) + self.penalty()
        if len(self.buffer):
            loss = loss + self.replay_term(self.replay_batch_size or len(x))
        self.tasks[task.id] = task
        self.buffer.add(x=x.detach(), y=y, logits=z.detach().float(), task=task.id)
        return loss

    def replay_term(self, k: int) -> torch.Tensor:
        """alpha * MSE between the outputs on a buffer batch and the logits stored with it."""
        b = self.buffer.sample(k, replace=False)
        squared = sum(((self.forward(b["x"][mask], self.tasks[i]) - b["logits"][mask]) ** 2).sum()
                      for i, mask in by_task(b["task"]))
        return self.alpha * squared / b["logits"].numel()

    def extra_results(self) -> dict:
        return {"buffer_size": self.buffer_size, "memory_samples": len(self.buffer), "samples_seen": self.buffer.seen}


@register_strategy("der++")
class DERPlusPlus(DER):
    """DER plus the stream's loss on the labels of a second, independent buffer batch (Buzzega et al. 2020)."""
    # alpha and beta weigh loss ratios: log scale; buffer_size is fixed by the suite
    search_space = {"alpha": ("log", 0.03, 3.0), "beta": ("log", 0.03, 3.0)}

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, buffer_size: int = 500,
                 replay_batch_size: int | None = None, **train) -> None:
        super().__init__(alpha=alpha, buffer_size=buffer_size, replay_batch_size=replay_batch_size, **train)
        self.beta = check_weight("der++: beta", beta)

    def replay_term(self, k: int) -> torch.Tensor:
        logits_term = super().replay_term(k)
        return logits_term + self.beta * replayed_loss(self, self.buffer.sample(k, replace=False), self.tasks)

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(DER, DERPlusPlus)
class DERAdapter(ReservoirAdapter):
    """Reservoir buffers of inputs, targets, task ids and logits stacked (B, size, ...); each member draws its
    buffer batches (without replacement) and slots from its own RNG stream in the engine's order: DER one batch,
    DER++ a second, then the slots. Per-member alpha (and beta)."""

    def start(self) -> None:
        g = self.g
        self.plus = isinstance(g.members[0].strategy, DERPlusPlus)
        self.alpha = member_numbers(g.members, "alpha", g.dev)
        self.beta = member_numbers(g.members, "beta", g.dev) if self.plus else None

    def extra_loss(self, x, y, t, loss, outputs, sharing):
        g, buffer, n = self.g, self.buffer, x.shape[1]
        k = (g.members[0].strategy.replay_batch_size or n) if buffer.filled else 0
        draws = 2 if self.plus else 1
        with torch.no_grad():
            drawn = g.draw(lambda: ([buffer.picks(k) for _ in range(draws)] if k else [], buffer.slots(n)))
        if k:
            first = buffer.take(torch.stack([picks[0] for picks, _ in drawn]))
            logits = first["logits"]  # alpha * MSE over samples and units, as DER.replay_term
            loss = loss + self.alpha * (g.net.forward(first["x"]) - logits).pow(2).flatten(1).sum(1) / logits[0].numel()
            if self.plus:
                second = buffer.take(torch.stack([picks[1] for picks, _ in drawn]))
                loss = loss + self.beta * g.replayed_loss(second["x"], second["y"], second["task"])
        buffer.offer(torch.stack([slots for _, slots in drawn]), x, y, t, sharing, logits=outputs.detach().float())
        return loss

    def stored_floats(self, stream) -> int:
        return stream.num_outputs  # the logits at insertion
