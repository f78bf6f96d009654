"""Joint training: the upper bound, training on every task seen so far."""
from clbench.registry import register_strategy
from clbench.strategy import Strategy
from clbench.types import Task


@register_strategy("joint")
class Joint(Strategy):
    """Upper bound: at task i, train on tasks 1..i together (one batch of each per step)."""

    def train_tasks(self, task: Task, seen: list[Task]) -> list[Task]:
        return seen
