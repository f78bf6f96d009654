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


def _ts(**kw):
    return clbench.make_stream("teacher-student", input_dim=60, latent_dim=6, output_dim=3, **kw)


def test_an_explosion_on_the_last_step_makes_the_run_diverged_not_complete(tmp_path, capsys):
    from clbench.cli.main import main

    out = tmp_path / "r.json"
    code = main(["run", "--stream", "teacher-student", "--strategy", "finetune", "--strategy-arg", "lr=1e9",
                 "--strategy-arg", "epochs=1", "--quiet", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "diverged" in err and "lower the learning rate" in err
    assert not out.exists()
    partial = json.loads((tmp_path / "r.partial.json").read_text())
    assert partial["complete"] is False and all(v is not None for v in partial["R"][0])


class _PoisonLastStep(clbench.make_strategy("finetune").__class__):
    """Finetune whose very last optimizer step leaves a NaN weight (the loss before it was finite)."""

    def setup(self, model, stream):
        model = super().setup(model, stream)
        self.steps_left = len(stream.tasks) * self.settings()["epochs"]  # full batch: one step an epoch
        return model

    def after_step(self):
        self.steps_left -= 1
        if self.steps_left == 0:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")


def test_non_finite_weights_after_the_last_step_are_caught():
    with pytest.raises(clbench.TrainingDiverged, match="task 2: a weight became NaN") as e:
        clbench.run(_ts(), _PoisonLastStep(epochs=3), device="cpu", progress=False)
    assert e.value.partial.complete is False
    assert np.isfinite(np.array(e.value.partial.R[1], dtype=float)).all()  # the rows before it are kept


def test_batched_members_diverge_independently():
    from clbench.batched.run import Member, run_batched

    members = [Member(_ts(seed=s), clbench.make_strategy("finetune", lr=lr, epochs=2), s)
               for s, lr in ((0, 1e9), (1, 0.05), (2, 1e9))]
    results = run_batched(members, device="cpu")
    assert isinstance(results[0], clbench.TrainingDiverged) and isinstance(results[2], clbench.TrainingDiverged)
    alone = clbench.run(_ts(seed=1), clbench.make_strategy("finetune", lr=0.05, epochs=2), device="cpu",
                        seed=1, progress=False)
    np.testing.assert_allclose(results[1].R, alone.R, atol=1e-5)


def test_a_leaderboard_averages_and_counts_the_same_seeds_and_flags_diverged_ones(tmp_path):
    from clbench.experiments import sweep
    from clbench.experiments.store import Store
    from clbench.reporting import leaderboard

    store = Store(tmp_path / "s")
    cells = sweep.expand(sweep.inline_spec(["teacher-student"], {"input_dim": 60, "latent_dim": 6}, ["finetune"],
                                           {"epochs": 2}, [0, 1, 2]))
    sweep.run_sweep(cells, store, progress=False)
    records = sorted(store.records(), key=lambda r: r["cell"]["seed"])
    old = records[2]  # as a store written before divergence was checked keeps it
    old["metrics"]["acc"] = None
    store.write(old["id"], old)
    row = leaderboard.build(store).iloc[0]
    assert row["n_seeds"] == 2 and row["diverged_seeds"] == 1
    assert row["acc_mean"] == pytest.approx(np.mean([r["metrics"]["acc"] for r in records[:2]]))
    assert row["bwt_mean"] == pytest.approx(np.mean([r["metrics"]["bwt"] for r in records[:2]]))
