"""Joint training: the upper bound, training on every task seen so far.

Each step draws one batch of every task seen and descends the mean of their losses: the loss of a batch
stratified over the tasks, whose step size does not grow with the number of tasks (a sum would multiply the
learning rate by i at task i, and made SGD at lr 0.1 unstable on ten permuted tasks).
"""
from clbench.batched import Adapter, batched_form
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Task


@register_strategy("joint")
class Joint(Strategy):
    """Upper bound: at task i, train on tasks 1..i together (one batch of each per step, the mean of their losses)."""

    def train_tasks(self, task: Task, seen: list[Task]) -> list[Task]:
        return seen


batched_form(Joint)(Adapter)  # batched form: plain training, nothing to stack
