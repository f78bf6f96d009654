"""Sweeps: a real process killed midway resumes with only the missing cells; leaderboards and plots."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clbench import ClbenchError
from clbench.experiments import sweep
from clbench.experiments.store import Store
from clbench.reporting import leaderboard

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "tests" / "plugin_blocking.py")


def _clbench(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "clbench", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_killed_sweep_resumes_with_only_the_missing_cells(tmp_path):
    """Cells 0-2 finish, cell 3 waits for a file that does not exist yet: the sweep is surely alive when
    killed, however fast or slow the machine."""
    store, gate = tmp_path / "store", tmp_path / "gate"
    args = ["--plugin", PLUGIN, "sweep", "--stream", "teacher-student", "--stream-arg", "input_dim=300",
            "--strategy", "test-wait-for-file", "--strategy-arg", "index=0,1,2,3,4,5",
            "--strategy-arg", f"gate={gate}", "--strategy-arg", "epochs=20", "--quiet", "--store", str(store)]
    proc = _clbench(*args)
    while len(list(store.glob("*.json"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)  # cell 3 is waiting for the gate: nothing more can be written
    assert proc.poll() is None, proc.communicate()[1]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name for p in store.glob("*.json")}
    assert len(before) == 3
    for p in store.glob("*.json"):
        assert json.loads(p.read_text())["cell"]["strategy_args"]["index"] < 3  # every record on disk is complete

    gate.touch()
    proc = _clbench(*args)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "6 cells, ran 3, skipped 3" in out
    records = list(Store(store).records())
    assert len(records) == 6 and len({r["id"] for r in records}) == 6
    assert not list(store.glob("*.tmp*"))
    # a third run has nothing to do
    proc = _clbench(*args)
    out, _ = proc.communicate()
    assert "ran 0, skipped 6" in out


def test_expand_and_stable_ids(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text('seeds = [0, 1]\n[[stream]]\nname = "teacher-student"\nargs = { rho_a = [0.0, 1.0], '
                         'input_dim = 300 }\n[[strategy]]\nname = "l2"\nargs = { strength = [0.1, 1.0] }\n'
                         '[[strategy]]\nname = "finetune"\n')
    cells = sweep.expand(sweep.load_spec(spec_file))
    assert len(cells) == 2 * 2 * 2 + 2 * 2
    ids = [sweep.cell_id(c) for c in cells]
    assert len(set(ids)) == len(ids)
    assert ids == [sweep.cell_id(c) for c in sweep.expand(sweep.load_spec(spec_file))]
    with pytest.raises(ClbenchError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("seeds = [")
        sweep.load_spec(tmp_path / "bad.toml")


def test_failed_cells_are_reported_and_the_rest_kept(tmp_path):
    spec = sweep.inline_spec(["teacher-student"], {"input_dim": 300}, ["finetune"], {"lr": (0.0025, 50.0)}, [0])
    store = Store(tmp_path / "s")
    with pytest.raises(ClbenchError, match="1 of 2 runs failed"):
        sweep.run_sweep(sweep.expand(spec), store, progress=False)
    assert len(store.ids()) == 1


def test_leaderboard_rows_and_confidence_intervals(tmp_path):
    spec = sweep.inline_spec(["teacher-student"], {"input_dim": 300, "rho_a": (0.0, 1.0)}, ["finetune"], {},
                             [0, 1, 2])
    store = Store(tmp_path / "s")
    sweep.run_sweep(sweep.expand(spec), store, progress=False)
    table = leaderboard.build(store)
    assert len(table) == 2 and (table["n_seeds"] == 3).all()
    runs = leaderboard.runs_table(store)
    one = runs[runs["stream_args"].str.contains('"rho_a": 1.0')]["retention"]
    row = table[table["stream_args"].str.contains('"rho_a": 1.0')].iloc[0]
    assert row["retention_mean"] == pytest.approx(one.mean())
    assert row["retention_ci95"] == pytest.approx(4.303 * one.std(ddof=1) / 3**0.5)
    assert list(table.columns[:6]) == leaderboard.KEYS


@pytest.mark.parametrize("name", ["teacher_student", "permuted_fashion_mnist", "stability-gap"])
def test_committed_leaderboards_regenerate_byte_for_byte(tmp_path, name):
    committed = ROOT / "leaderboards" / f"{name}.csv"
    results = ROOT / "leaderboards" / "results" / name
    assert committed.is_file() and results.is_dir()
    out = tmp_path / "regen.csv"
    leaderboard.write(leaderboard.build(Store(results)), out)
    old, new = pd.read_csv(committed), pd.read_csv(out)
    keep = [c for c in old.columns if c not in leaderboard.TIME_COLUMNS]
    assert list(old.columns) == list(new.columns)
    assert old[keep].to_csv(index=False) == new[keep].to_csv(index=False)
    assert committed.read_bytes() == out.read_bytes()  # the stored times are reused, so all bytes match


def test_plots_are_readable_pngs(tmp_path, cli):
    from PIL import Image

    store = tmp_path / "s"
    code, _, err = cli("sweep", "--stream", "teacher-student", "--stream-arg", "rho_a=0,1", "--stream-arg",
                       "rho_b=0,1", "--stream-arg", "input_dim=300", "--strategy", "finetune,l2", "--store",
                       str(store), "--quiet")
    assert code == 0, err
    code, _, err = cli("leaderboard", "--store", str(store), "--output", str(tmp_path / "lb.csv"))
    assert code == 0, err
    code, _, err = cli("run", "--stream-arg", "tasks=3", "--stream-arg", "input_dim=300", "--quiet", "--output",
                       str(tmp_path / "r.json"))
    assert code == 0, err
    for args in (["matrix", str(tmp_path / "r.json")], ["similarity", "--store", str(store)],
                 ["leaderboard", str(tmp_path / "lb.csv")]):
        png = tmp_path / f"{args[0]}.png"
        code, _, err = cli("plot", *args, "--output", str(png))
        assert code == 0, err
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
            assert len(np.unique(np.asarray(image.convert("L")))) > 20  # not blank
    code, _, err = cli("plot", "leaderboard", str(tmp_path / "lb.csv"), "--metric", "nope", "--output", "x.png")
    assert code == 2 and "no column nope_mean" in err


def test_synthetic_streams_are_built_once_per_process_and_file_streams_each_time(tmp_path):
    from fake_data import write_idx_dataset

    def cell(stream, args, strategy="finetune"):
        return {"stream": stream, "stream_args": args, "strategy": strategy, "strategy_args": {}, "seed": 0}

    ts = {"rho_a": 0.3, "rho_b": 0.7, "input_dim": 50}
    first = sweep.cell_stream(cell("teacher-student", ts))
    assert sweep.cell_stream(cell("teacher-student", ts, "l2")) is first  # another strategy, the same stream
    assert sweep.cell_stream(cell("teacher-student", {**ts, "rho_b": 0.8})) is not first
    root = str(write_idx_dataset(tmp_path / "m", train=100, test=50))
    images = cell("permuted-mnist", {"tasks": 2, "root": root})
    assert sweep.cell_stream(images) is not sweep.cell_stream(images)  # files may change between runs
