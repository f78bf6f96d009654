"""Joint training: the upper bound, training on every task seen so far."""
from clbench.batched import Adapter, batched_form
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Task


@register_strategy("joint")
class Joint(Strategy):
    """Upper bound: at task i, train on tasks 1..i together (one batch of each per step)."""

    def train_tasks(self, task: Task, seen: list[Task]) -> list[Task]:
        return seen


batched_form(Joint)(Adapter)  # batched form: plain training, nothing to stack
