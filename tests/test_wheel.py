"""An installed wheel (not the editable checkout), run outside the checkout, finds its suites and runs one."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = """\
name = "wheel-tiny"
version = 1
description = "tiny teacher-student suite"
seeds = [0, 1, 2, 3, 4]
[training]
epochs = 5
lr = 0.05
[validation]
protocol = "holdout"
share = 0.2
[tuning]
trials = 2
[[stream]]
name = "teacher-student"
args = { tasks = 2, mode = "sampled", latent_dim = 8, input_dim = 40, samples = 200 }
[[strategy]]
name = "finetune"
"""


@pytest.mark.slow
def test_installed_wheel_lists_loads_and_runs_suites(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)], check=True,
                   capture_output=True)
    wheel = next(dist.glob("clbench-*.whl"))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the test environment's third-party packages, without its editable clbench (a .pth here is not processed)
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def clbench(*args: str) -> str:
        out = subprocess.run([python, "-m", "clbench", *args], capture_output=True, text=True, cwd=outside, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    where = subprocess.run([python, "-c", "import clbench; print(clbench.__file__)"], capture_output=True, text=True,
                           cwd=outside, env=env, check=True).stdout
    assert str(ROOT) not in where and "site-packages" in where
    listed = clbench("list")
    for name in ("permuted-fashion-mnist", "split-fashion-mnist-class", "similarity-permuted-fashion-mnist",
                 "split-cifar10", "split-cifar100"):
        assert name in listed
    (outside / "wheel-tiny.toml").write_text(SUITE)
    out = clbench("benchmark", "--suite", "wheel-tiny.toml", "--strategy", "finetune", "--store", "store", "--quiet")
    assert "finetune" in out and (outside / "store" / "leaderboard.csv").exists()
