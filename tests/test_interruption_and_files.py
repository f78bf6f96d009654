"""Interruption, divergence and files: Ctrl-C keeps every finished run, diverged runs are never stored as
complete, caches follow file contents, small files cannot make clbench allocate gigabytes, writes are
atomic and rescued, and bad input ends in one line."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import clbench
from clbench.core.errors import ClbenchError

ROOT = Path(__file__).resolve().parents[1]


def _sweep_until_first_records(store: Path, *args: str) -> tuple[int, str]:
    """Start `clbench sweep` (teacher-student, finetune, slow enough to interrupt), send SIGINT once its first
    record is on disk, and return its exit code and stderr."""
    cmd = [sys.executable, "-m", "clbench", "sweep", "--stream", "teacher-student", "--stream-arg", "input_dim=300",
           "--strategy", "finetune", "--strategy-arg", "epochs=40", "--strategy-arg", "batch_size=64",
           "--store", str(store), "--quiet", *args]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        while not list(store.glob("*.json")) and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)  # a hang guard, not a timing assertion
    finally:
        p.kill()
    return p.returncode, err


@pytest.mark.parametrize("args, cells", [(("--jobs", "2", "--batch", "off"), 24), (("--batch", "auto"), 40)],
                         ids=["jobs-2", "default-batched"])
def test_ctrl_c_stops_a_sweep_and_keeps_every_finished_run(tmp_path, args, cells):
    store = tmp_path / "store"
    code, err = _sweep_until_first_records(store, "--seeds", ",".join(map(str, range(cells))), *args)
    assert code == 130, err
    records = sorted(store.glob("*.json"))
    stored = int(err.split("stored ")[1].split(" of ")[0])
    assert 0 < len(records) == stored < cells  # stopped before the queue was done, nothing finished lost
    assert "rerun the same command" in err and "in flight" in err
    for path in records:  # each a complete record
        assert json.loads(path.read_text())["metrics"]["acc"] is not None
    assert not [p for p in store.iterdir() if ".tmp-" in p.name]
