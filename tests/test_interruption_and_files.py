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


def test_a_stale_decoded_cache_is_never_used_for_a_rewritten_file(tmp_path, monkeypatch):
    from fake_data import idx_bytes, write_idx_dataset

    from clbench.data import datasets as data

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    root = write_idx_dataset(tmp_path / "raw", train=50, test=20, gz=False)
    first = data.load("mnist", root=root)
    labels = root / "t10k-labels-idx1-ubyte"
    stat = labels.stat()
    new = (first["test_y"].numpy() + 1) % 10  # same size, other contents
    labels.write_bytes(idx_bytes(new.astype(np.uint8)))
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p / rsync -t leave it
    assert labels.stat().st_size == stat.st_size and labels.stat().st_mtime_ns == stat.st_mtime_ns
    second = data.load("mnist", root=root)
    assert second["test_y"].tolist() == new.tolist()
    assert second["source"]["files"] != first["source"]["files"]  # provenance and tensors agree


def test_a_gzipped_idx_file_declaring_a_huge_array_is_refused_from_its_header(tmp_path):
    from clbench.data import datasets as data

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (60000 * 100, 28, 28))
    with gzip.open(path, "wb") as f:  # a few kB on disk, 4.7 GB decompressed
        f.write(header)
        for _ in range(20):
            f.write(bytes(1 << 20))
    read = []
    real_open = gzip.open

    class Counting:
        def __init__(self, *a):
            self.f = real_open(*a)

        def read(self, n=-1):
            out = self.f.read(n)
            read.append(len(out))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    gzip.open = Counting
    try:
        with pytest.raises(ClbenchError, match=r"declares an array of shape \(6000000, 28, 28\).*at most \(60000, 28, 28\)"):
            data.read_idx(path, "mnist", (60000, 28, 28))
    finally:
        gzip.open = real_open
    assert sum(read) == len(header)  # nothing decompressed beyond the header


def test_an_l2p_checkpoint_whose_metadata_names_a_large_vit_is_refused_before_building_it(tmp_path, monkeypatch):
    import timm

    from clbench.strategies.l2p import load_backbone

    path = tmp_path / "tiny.pth"
    state = {"patch_embed.proj.weight": torch.zeros(2, 1, 4, 4), "cls_token": torch.zeros(1, 1, 2)}
    torch.save({"state_dict": state, "clbench": {"backbone": "vit_base_patch16_224",
                                                  "backbone_args": {"img_size": 224}}}, path)
    assert path.stat().st_size < 4000
    built = []
    real = timm.create_model

    def create(*a, **kw):
        model = real(*a, **kw)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(ClbenchError, match="does not match the backbone 'vit_base_patch16_224'"):
        load_backbone(None, None, str(path), False)
    assert built == ["meta"]  # shapes compared on a model without memory; no real ViT-B was allocated
