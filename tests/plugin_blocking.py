"""A test plugin: finetune, except that cells with ``index >= wait_from`` first wait for the file ``gate``.

tests/test_sweep.py kills a sweep while one of its cells waits here, so the test never depends on a run
being "slow enough" to be caught alive.
"""
import time
from pathlib import Path

from clbench import Strategy, register_strategy


@register_strategy("test-wait-for-file")
class WaitForFile(Strategy):
    """Finetune that waits for ``gate`` to exist before its first task when ``index >= wait_from``."""

    def __init__(self, index: int = 0, wait_from: int = 3, gate: str = "", **train):
        super().__init__(**train)
        self.index, self.wait_from, self.gate = int(index), int(wait_from), gate

    def before_task(self, task):
        while self.index >= self.wait_from and not Path(self.gate).exists():
            time.sleep(0.05)
