"""Joint training: the upper bound, training on every task seen so far."""
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Task


@register_strategy("joint")
class Joint(Strategy):
    """Upper bound: at task i, train on tasks 1..i together (one batch of each per step)."""

    def train_tasks(self, task: Task, seen: list[Task]) -> list[Task]:
        return seen
