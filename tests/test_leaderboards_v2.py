"""Sanity of the committed v2 leaderboards, read from the committed records: the phenomena each suite exists
to rank must be visible, so a broken protocol cannot be committed (Buzzega et al. 2020; Hsu et al. 2018;
Hiratani 2024)."""
import json

import numpy as np
import pytest

from clbench.experiments import suite as suites
from clbench.experiments.store import Store
from clbench.reporting.leaderboard import runs_table

MEMORY = ("replay", "a-gem", "der", "der++", "er-ace", "icarl", "bic", "gdumb")


def runs(name):
    suite = suites.load(name)
    folder = suite.results_dir
    assert folder.is_dir() and any(folder.glob("*.json")), f"no committed records of {name} v{suite.version} in {folder}"
    table = runs_table(Store(folder, create=False))
    assert set(table["protocol_hash"]) == {suite.protocol_hash}
    return table


def per_seed(table, strategy, metric):
    rows = table[table["strategy"] == strategy]
    assert len(rows), f"no records of {strategy}"
    return rows.groupby("seed")[metric].mean()


def interval(values):
    v = np.asarray(values, dtype=float)
    half = 2.776 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.inf  # t(0.975, 4 df)
    return v.mean() - half, v.mean() + half


def test_permuted_v2_finetune_forgets_and_joint_is_above_it():
    table = runs("permuted-fashion-mnist")
    assert per_seed(table, "finetune", "forgetting").mean() >= 0.2
    joint, finetune = interval(per_seed(table, "joint", "acc")), interval(per_seed(table, "finetune", "acc"))
    assert joint[0] > finetune[1]  # non-overlapping 95% intervals


def test_class_incremental_v2_finetune_predicts_the_last_task_and_memory_methods_beat_it():
    table = runs("split-fashion-mnist-class")
    finetune = per_seed(table, "finetune", "acc").mean()
    assert 0.15 <= finetune <= 0.25  # about 1/5: only the last task's two classes are predicted
    for strategy in sorted(set(table["strategy"]) & set(MEMORY)):
        assert per_seed(table, strategy, "acc").mean() > finetune + 0.15, strategy


def test_similarity_v2_retention_and_ewc_gain_follow_hiratani():
    table = runs("similarity-permuted-fashion-mnist")
    point = table["stream_args"].map(json.loads)
    table = table.assign(rho_a=point.map(lambda a: a["rho_a"]), rho_b=point.map(lambda a: a["rho_b"]),
                         readout=point.map(lambda a: a.get("readout", "classification")))
    for readout, part in table.groupby("readout"):
        finetune = part[part["strategy"] == "finetune"].groupby(["rho_a", "rho_b"])["retention"].mean()
        assert finetune.idxmin() == (part["rho_a"].max(), part["rho_b"].min()), readout
        ewc = part[part["strategy"] == "ewc-full"].groupby(["rho_a", "rho_b"])["retention"].mean()
        gain = (ewc - finetune).dropna()
        assert gain.idxmax() == (part["rho_a"].max(), part["rho_b"].min()), readout


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
