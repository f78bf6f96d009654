import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def cli():
    """Run the real CLI in a subprocess: returns (exit code, stdout, stderr)."""
    import subprocess

    def run(*args: str, cwd: Path = ROOT, timeout: float = 600):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        p = subprocess.run([sys.executable, "-m", "clbench", *args], capture_output=True, text=True, cwd=cwd,
                           env=env, timeout=timeout)
        return p.returncode, p.stdout, p.stderr

    return run
