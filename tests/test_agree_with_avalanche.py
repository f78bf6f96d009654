"""perf/agree_with_avalanche.py on a tiny stream: clbench and Avalanche give the same R."""
import importlib.util
import sys

import numpy as np
import pytest
from conftest import ROOT
from fake_data import write_idx_dataset

from clbench import make_stream


@pytest.fixture(scope="module")
def agree():
    spec = importlib.util.spec_from_file_location("agree", ROOT / "perf" / "agree_with_avalanche.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["agree"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["agree"]


def test_finetune_and_online_ewc_agree_with_avalanche(agree, tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    stream = make_stream("permuted-mnist", tasks=2, root=str(write_idx_dataset(tmp_path / "m", train=300, test=100)))
    rows = {r.label: r for r in agree.comparisons(n_train=300, strength=50.0, decay=0.5)}
    chosen = [rows["finetune"], rows["EWC online"], rows["EWC per-task, Avalanche as shipped"]]
    agree.compare(stream, chosen, seed=1, lr=0.05, batch_size=32, model_args={"widths": (16,)})
    finetune, online, shipped = (r.results for r in chosen)
    # the EWC penalty matters here: online EWC's R is far from finetune's
    assert np.abs(online["R_clbench"] - finetune["R_clbench"]).max() > 0.05
    # same batches, same initial weights, mapped settings: the same predictions (float rounding aside)
    assert finetune["max_abs_diff"] <= 0.01 and online["max_abs_diff"] <= 0.01
    # Avalanche's own EWC importance (squared mean-batch gradients) is much smaller: R departs
    assert shipped["max_abs_diff"] > 0.02


def test_avalanche_si_on_cpu_trains_like_naive_and_the_patched_one_agrees(agree, tmp_path, monkeypatch):
    """The departure the script names: Avalanche's SI keeps views of the live CPU weights (penalty 0)."""
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    stream = make_stream("permuted-mnist", tasks=2, root=str(write_idx_dataset(tmp_path / "m", train=300, test=100)))
    rows = {r.label: r for r in agree.comparisons(n_train=300)}  # SI: c = 1000, xi = 100
    chosen = [rows["finetune"], rows["SI"], rows["SI, Avalanche as shipped"]]
    agree.compare(stream, chosen, seed=1, lr=0.05, batch_size=16, model_args={"widths": (32,)})
    finetune, si, shipped = (r.results for r in chosen)
    assert np.abs(si["R_clbench"] - finetune["R_clbench"]).max() > 0.02  # SI's penalty matters here
    assert si["max_importance"] < 1e-3  # under Avalanche's clip
    assert si["max_abs_diff"] <= 0.01
    np.testing.assert_array_equal(shipped["R_avalanche"], finetune["R_avalanche"])


@pytest.fixture(scope="module")
def peers(agree):
    spec = importlib.util.spec_from_file_location("agree_with_peers", ROOT / "perf" / "agree_with_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["agree_with_peers"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["agree_with_peers"]


def test_mas_agrees_with_avalanche_exactly_and_its_departures_show(peers, tmp_path, monkeypatch):
    """MAS is deterministic given the batches: the latest-importance form equals Avalanche's MASPlugin with
    alpha=0 (per-sample importance), while the paper's sum departs from Avalanche's running average."""
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    # three tasks: the sum and Avalanche's average first differ in the penalty of task 3 (both are O_1 in task 2)
    stream = make_stream("permuted-mnist", tasks=3, root=str(write_idx_dataset(tmp_path / "m", train=300, test=100)))
    rows = peers.mas_comparisons(strength=10.0)
    peers.compare(stream, rows, seed=1, lr=0.05, batch_size=32, model_args={"widths": (16,)})
    latest, summed = rows[0].results, rows[1].results
    assert latest["max_abs_diff"] <= 1e-6  # the same predictions: R identical to float rounding
    assert summed["max_abs_diff"] > latest["max_abs_diff"]
