"""A-GEM: keep the loss on an episodic memory of earlier tasks from rising, by projecting the gradient.

Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient Lifelong Learning with A-GEM", ICLR 2019 (Algorithm 1)::

    M = {}
    for each task t:
        for each batch (x, y) of task t:
            g = grad loss(x, y)
            if M is not empty:
                (x_ref, y_ref) ~ M                                 a random batch of replay_batch_size samples
                g_ref = grad loss(x_ref, y_ref)
                if g^T g_ref < 0:  g = g - (g^T g_ref / g_ref^T g_ref) g_ref
            theta = theta - lr * g
        M = M + {memory_per_task samples of task t}

The memory is per task, as in the paper: its code (github facebookresearch/agem) keeps 25 samples per class of
each task (250 a task on 10-class MNIST tasks; 13 per class on split CIFAR) and draws the reference batch,
256 samples without replacement, from the memories of finished tasks only. Defaults: ``memory_per_task=250``
and ``replay_batch_size=256`` from that code. ``buffer_size`` instead sets a total, split evenly over the
stream's tasks (``memory_per_task = buffer_size // tasks``), for comparisons at equal memory with replay and
DER. A finished task's memory is a uniform sample of its training set (reservoir sampling over it); the
paper's code keeps the last samples of each class seen in its single pass. Samples are stored as model
inputs (task transform applied, no augmentation) with targets and task ids, on the device; a reference
sample is scored through its own task's head.

The projection runs in ``after_backward`` on the flattened gradient of all trainable parameters;
``g_ref`` comes from ``torch.autograd.grad``, so ``.grad`` holds g until it is overwritten.
"""
from __future__ import annotations

import torch
from torch import nn

from clbench.batched import Adapter, batched_form
from clbench.core.buffer import ReservoirBuffer, check_sizes, replayed_loss
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy, count_parameters
from clbench.core.types import Stream, Task


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's update direction for gradients ``g`` and reference gradients ``g_ref`` (rows of shape (..., P)):
    ``g`` itself where ``g^T g_ref >= 0``, else ``g - (g^T g_ref / g_ref^T g_ref) g_ref``."""
    dot = (g * g_ref).sum(-1, keepdim=True)
    return torch.where(dot < 0, g - dot / (g_ref * g_ref).sum(-1, keepdim=True) * g_ref, g)


@register_strategy("a-gem")
class AGEM(Strategy):
    """Averaged gradient episodic memory: project g when it conflicts with the memory's gradient (Chaudhry 2019)."""
    # the memory is a budget fixed by the suite and the reference batch (256, the paper's) a cost, not a knob:
    # A-GEM has no hyper-parameter of its own to search (the training settings are searched as for any strategy)
    search_space = {}

    def __init__(self, memory_per_task: int | None = None, buffer_size: int | None = None,
                 replay_batch_size: int = 256, **train) -> None:
        super().__init__(**train)
        check_sizes("a-gem", memory_per_task=memory_per_task, buffer_size=buffer_size,
                    replay_batch_size=replay_batch_size)
        if memory_per_task is not None and buffer_size is not None:
            raise ClbenchError("a-gem: give memory_per_task or buffer_size (a total split over the tasks), not both")
        self.buffer_size = buffer_size
        self.memory_per_task = 250 if memory_per_task is None and buffer_size is None else memory_per_task
        self.replay_batch_size = replay_batch_size
        self.memory: ReservoirBuffer | None = None
        self.tasks: dict[int, Task] = {}
        self.projected = 0  # steps whose gradient was projected (a device tensor once training runs)

    def setup(self, model: nn.Module, stream: Stream) -> nn.Module:
        model = super().setup(model, stream)
        if self.buffer_size is not None:
            if self.buffer_size < len(stream):
                raise ClbenchError(f"a-gem: buffer_size={self.buffer_size} leaves no memory for each of the "
                                   f"{len(stream)} tasks; give buffer_size >= {len(stream)}")
            self.memory_per_task = self.buffer_size // len(stream)
        self.memory = ReservoirBuffer(self.memory_per_task * len(stream))  # never full: every task keeps its share
        return model

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        chosen = ReservoirBuffer(self.memory_per_task)
        for start in range(0, len(task.train_x), 4096):
            chosen.add(x=task.inputs(task.train_x[start:start + 4096]), y=task.train_y[start:start + 4096],
                       task=task.id)
        self.memory.add(x=chosen["x"], y=chosen["y"], task=chosen["task"])
        self.tasks[task.id] = task

    def after_backward(self) -> None:
        if not len(self.memory):
            return
        params = self.trainable_parameters()
        with torch.enable_grad():
            ref = replayed_loss(self, self.memory.sample(self.replay_batch_size, replace=False), self.tasks)
            g_ref = torch.autograd.grad(ref, params, allow_unused=True)
        flat = lambda grads: torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1)  # noqa: E731
                                        for p, gr in zip(params, grads)])
        g, r = flat([p.grad for p in params]), flat(g_ref)
        self.projected = self.projected + (g @ r < 0)
        for p, new in zip(params, project(g, r).split([p.numel() for p in params])):
            p.grad = new.view_as(p)

    def extra_results(self) -> dict:
        return {"memory_per_task": self.memory_per_task, "memory_samples": len(self.memory) if self.memory else 0,
                "steps_projected": int(self.projected)}

# --- batched form (clbench.batched): every member of a lockstep batch at once -----------------------------


@batched_form(AGEM)
class AGEMAdapter(Adapter):
    """Every member's memory (filled by its own after_task) stacked (B, samples, ...); after each backward, every
    member's reference gradient from one autograd call on the stacked weights (member b's is its own slice), and
    the projection on the (B, P) rows of flattened gradients."""

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        return (strategy.memory_per_task, strategy.buffer_size, strategy.replay_batch_size)

    def refresh(self) -> None:
        g = self.g
        if not hasattr(self, "projected"):
            self.projected = torch.zeros(g.B, dtype=torch.long, device=g.dev)
        memories = [m.strategy.memory for m in g.members]
        self.filled = len(memories[0])
        if self.filled:
            index = [{task.id: j for j, task in enumerate(tasks)} for tasks in g.tasks]  # task id -> g.data index
            self.memory = {"x": torch.stack([m["x"] for m in memories]), "y": torch.stack([m["y"] for m in memories]),
                           "task": torch.tensor([[index[b][i] for i in m["task"].tolist()]
                                                 for b, m in enumerate(memories)], device=g.dev)}

    def after_backward(self) -> None:
        if not self.filled:
            return
        g, params = self.g, self.g.net.params
        k = g.members[0].strategy.replay_batch_size
        with torch.no_grad():
            picks = torch.stack(g.draw(lambda: torch.randperm(self.filled, device=g.dev)[:k]))
        ref = {name: v[g.member_index, picks] for name, v in self.memory.items()}
        with torch.enable_grad():
            g_ref = torch.autograd.grad(g.replayed_loss(ref["x"], ref["y"], ref["task"]).sum(), params)
        flat = lambda grads: torch.cat([gr.reshape(g.B, -1) for gr in grads], 1)  # noqa: E731
        grad, r = flat([p.grad for p in params]), flat(g_ref)
        self.projected += (grad * r).sum(1) < 0
        for p, new in zip(params, project(grad, r).split([p[0].numel() for p in params], 1)):
            p.grad = new.reshape(p.shape)

    def before_after_task(self) -> None:
        for b, m in enumerate(self.g.members):
            m.strategy.projected = self.projected[b].clone()

    finish = before_after_task

    def bytes_per_member(self, strategy, stream, model):
        task = stream.tasks[0]
        per_task = strategy.memory_per_task or strategy.buffer_size // len(stream)
        memory = per_task * len(stream) * int(task.inputs(task.train_x[:1]).numel() + 2) * 4
        return memory + 3 * count_parameters(model) * 4  # plus the flat g, g_ref and the projected g
