import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The commands' thread count follows the machine's load (clbench.core.threads); tests compare records across
# commands, so they fix it (tests/test_threads.py covers the load-following choice).
os.environ.setdefault("CLBENCH_THREADS", str(min(2, os.cpu_count() or 1)))


@pytest.fixture
def cli():
    """Run the real CLI in a subprocess: returns (exit code, stdout, stderr)."""
    import subprocess

    def run(*args: str, cwd: Path = ROOT, timeout: float | None = None):  # no wall-clock limit by default
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        p = subprocess.run([sys.executable, "-m", "clbench", *args], capture_output=True, text=True, cwd=cwd,
                           env=env, timeout=timeout)
        return p.returncode, p.stdout, p.stderr

    return run


@pytest.fixture
def real_fashion_mnist() -> Path:
    """The folder of the real Fashion-MNIST files. Skips, saying how to get them, where they are absent;
    fails instead under CLBENCH_REQUIRE_REAL_DATA=1 (set by .ci/run, which installs them)."""
    from clbench.data import datasets as data

    found = data.locate("fashion-mnist")
    if found is None:
        message = ("real Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist` (Debian) or, "
                   "online, `clbench data download fashion-mnist`")
        if os.environ.get("CLBENCH_REQUIRE_REAL_DATA") == "1":
            pytest.fail(f"{message} (CLBENCH_REQUIRE_REAL_DATA=1 requires it)")
        pytest.skip(message)
    return found[0]
