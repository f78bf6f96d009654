"""A test plugin whose runs fail for reasons outside its settings while a fault file exists.

$CLBENCH_TEST_FAULT names the file; its text says which fault: "interrupt" (Ctrl-C in the first run that sees
it; the file is removed) or anything else (an OSError, as for missing data files).
"""
import os

from clbench import Strategy, register_strategy


@register_strategy("test-flaky")
class Flaky(Strategy):
    """Weight decay towards zero (penalty strength * ||theta||^2) that fails while a fault file exists."""

    search_space = {"strength": ("log", 1e-4, 1.0)}

    def __init__(self, strength: float = 0.5, **train):
        super().__init__(**train)
        self.strength = float(strength)
        fault = os.environ.get("CLBENCH_TEST_FAULT", "")
        if fault and os.path.exists(fault):
            with open(fault) as f:
                kind = f.read().strip()
            if kind == "interrupt":
                os.unlink(fault)
                raise KeyboardInterrupt
            raise OSError(f"the data files are missing ({fault} exists)")

    def penalty(self):
        return self.strength * sum(p.pow(2).sum() for p in self.model.parameters())
