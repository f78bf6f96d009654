"""What a strategy's batched form implements, and the registry that finds it.

A strategy's batched form is an :class:`Adapter` subclass at the bottom of the strategy's own file, registered
with ``@batched_form(StrategyClass)``; the batched core imports no concrete strategy. The adapter stacks what
the hot loop needs from the members' own strategy objects (anchors, importances, gates, buffers) and
implements the penalty, gating, gradient edits or extra loss terms in batched form; once-a-task hooks run the
ordinary way on each member's own strategy object unless the adapter does them batched (``after_task``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from clbench.batched.stacked import Sharing
from clbench.core.strategy import Strategy
from clbench.core.types import Stream

if TYPE_CHECKING:
    from clbench.batched.group import Group


@dataclass
class Member:
    """One run of a batch: what ``clbench.run(stream, strategy, seed=seed, config=config)`` would take."""

    stream: Stream
    strategy: Strategy
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)


class Adapter:
    """Batched hot loop of one strategy class; the default is plain training (finetune, joint)."""

    order_matters = False  # True when the hot loop depends on the order of samples in a batch (replay)
    # True when, after a task's hooks, refresh() rebuilds every piece of batched state from the members' own
    # strategy objects: a batch may then drop its diverged members at a task boundary and go on smaller.
    # Read from each class itself, not inherited (a subclass that keeps state of its own must not pass).
    state_in_members = True

    def __init__(self, group: "Group") -> None:
        self.g = group

    @staticmethod
    def signature(strategy: Strategy) -> tuple:
        """Non-numeric settings that members of one batch must share."""
        return ()

    @staticmethod
    def refuse(stream: Stream, strategy: Strategy) -> str | None:
        """Why this strategy's settings on this stream have no batched form, or None."""
        return None

    def refresh(self) -> None:
        """Stack the members' state after their before_task / after_task hooks ran."""

    def before_after_task(self) -> None:
        """Write batched state back to the members before their after_task hooks run."""

    def after_task(self, i: int) -> bool:
        """Do every member's after_task for task index i in batched form; False: run the members' own."""
        return False

    def gates(self, j: int) -> list[torch.Tensor | None] | None:
        return None

    def penalty(self) -> torch.Tensor | None:
        """Per member (B,), once a step before the forward pass: a value autograd differentiates, or a detached
        one whose gradient is already in the weights' ``.grad`` (StackedNet.quadratic_pull)."""
        return None

    def incoming_loss(self, outputs: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
        """Per member (B,): the loss on the incoming batch of task t from all its output units (B, N, outputs);
        the stream's loss through task t's head by default (ER-ACE masks logits first)."""
        return self.g.per_sample_loss(self.g.head(outputs, t), y).mean(1)

    def extra_loss(self, x: torch.Tensor, y: torch.Tensor, t: int, loss: torch.Tensor, outputs: torch.Tensor,
                   sharing: Sharing | None) -> torch.Tensor:
        """loss plus any term on the batch (x, y) of task t; ``outputs`` are all output units (B, N, outputs)
        of the members for x (read with ``sharing``)."""
        return loss

    def after_backward(self) -> None:
        """Adjust gradients before the optimizer step (plasticity masks)."""

    def after_step(self) -> None:
        """Called after every optimizer step (SI path integrals)."""

    def bytes_per_member(self, strategy: Strategy, stream: Stream, model: nn.Module) -> int:
        return 0


def state_in_members(adapter: type[Adapter]) -> bool:
    """Whether ``adapter`` itself declares ``state_in_members = True`` (see Adapter)."""
    return vars(adapter).get("state_in_members", False)


def member_numbers(members: list[Member], attr: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([float(getattr(m.strategy, attr)) for m in members], device=device)


_ADAPTERS: dict[type, type[Adapter]] = {}


def batched_form(*strategy_classes: type[Strategy]) -> Callable[[type[Adapter]], type[Adapter]]:
    """Register an Adapter as the batched form of ``strategy_classes`` (exact classes: a subclass may change
    any hook, so it is batched only if it registers a form of its own)."""
    def register(adapter: type[Adapter]) -> type[Adapter]:
        for cls in strategy_classes:
            _ADAPTERS[cls] = adapter
        return adapter
    return register


def adapter_for(strategy: Strategy) -> type[Adapter] | None:
    """The batched form of ``strategy``'s exact class, or None."""
    return _ADAPTERS.get(type(strategy))


def has_batched_form(cls: type) -> bool:
    """Whether the strategy class ``cls`` registered a batched form (its runs may still refuse: see batchable)."""
    return cls in _ADAPTERS


def batchable(stream: Stream, strategy: Strategy) -> str | None:
    """None if this stream and strategy can run batched, else why not."""
    adapter = adapter_for(strategy)
    if adapter is None:
        return f"strategy {strategy.name or type(strategy).__name__!r} has no batched form"
    if any(t.augment is not None for t in stream.tasks):
        return "the stream augments training batches"
    if not getattr(strategy, "shuffle", True):
        return "shuffle=False (batches in stored order) has no batched form"
    return adapter.refuse(stream, strategy)
