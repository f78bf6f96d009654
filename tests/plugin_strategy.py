"""A user's own strategy, outside the package: registers by importing this file."""

from clbench import Strategy, register_strategy


@register_strategy("test-shrink")
class Shrink(Strategy):
    """Weight decay towards zero: penalty strength * ||theta||^2 (a test plugin)."""

    # a decay strength matters over orders of magnitude: log scale (what `clbench tune` searches)
    search_space = {"strength": ("log", 1e-4, 1.0)}

    def __init__(self, strength: float = 0.5, **train):
        super().__init__(**train)
        self.strength = float(strength)
        self.tasks_seen = 0

    def after_task(self, task):
        self.tasks_seen += 1

    def penalty(self):
        return self.strength * sum(p.pow(2).sum() for p in self.model.parameters())

    def extra_results(self):
        return {"tasks_seen": self.tasks_seen}
