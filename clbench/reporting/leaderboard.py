"""Leaderboard CSVs from a results store: one row per (stream config, strategy config),
mean and 95% confidence half-width over seeds. Schema: leaderboards/README.md.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from clbench.core import metrics
from clbench.core.errors import ClbenchError
from clbench.core.io import atomic_write
from clbench.experiments.store import Store

METRICS = ["acc", "bwt", "fwt", "forgetting", "forgetting_last", "transfer", "retention", "min_acc", "wc_acc",
           "stability_gap"]
OPTIONAL = ("transfer", "retention", "min_acc", "wc_acc", "stability_gap")  # columns only when some record has them
CONTINUAL = ("min_acc", "wc_acc", "stability_gap")  # the metrics of continual evaluation (clbench.core.continual)
COSTS = ["wall_time_s", "peak_memory_mb"]
TIME_COLUMNS = ["wall_time_s_mean", "wall_time_s_ci95", "peak_memory_mb_mean", "peak_memory_mb_ci95"]
SUITE_COLUMNS = ["suite", "suite_version", "protocol_hash", "tuned", "tuning_trials", "validation_score"]
KEYS = ["stream", "stream_args", "strategy", "strategy_args", "model", "model_args"]
# two-sided 95% Student-t quantiles for 1..30 degrees of freedom; 1.96 beyond
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def ci95(values: pd.Series) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t); NaN for fewer than 2 values."""
    v = values.dropna().to_numpy(dtype=float)
    if len(v) < 2:
        return float("nan")
    t = T95[len(v) - 2] if len(v) - 1 <= len(T95) else 1.96
    return float(t * v.std(ddof=1) / math.sqrt(len(v)))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def runs_table(store: Store) -> pd.DataFrame:
    """One row per stored run."""
    rows = []
    for r in store.records():
        cell = r["cell"]
        if "forgetting_last" not in r["metrics"] and r["metrics"] and r.get("R"):  # records older than it
            r["metrics"]["forgetting_last"] = metrics.forgetting_last(r["R"])
        rows.append({
            "stream": cell["stream"], "stream_args": _canonical(cell["stream_args"]),
            "strategy": cell["strategy"], "strategy_args": _canonical(cell["strategy_args"]),
            "model": cell.get("model") or "default", "model_args": _canonical(cell.get("model_args") or {}),
            "seed": cell["seed"], "diverged": _diverged(r),
            **{m: (r["metrics"].get(m) if r["metrics"].get(m) is not None else np.nan) for m in METRICS},
            "wall_time_s": r["wall_time_s"], "peak_memory_mb": r["peak_memory_mb"],
            "parameter_count": r["parameter_count"], "clbench_version": r["versions"]["clbench"],
            "git_commit": r.get("git_commit") or "unknown", "device": r["config"]["device"],
            "dataset": (r["config"].get("provenance") or {}).get("dataset", "unknown"),
            **_suite_columns(cell),
        })
    table = pd.DataFrame(rows)
    if "protocol_hash" in table and table["protocol_hash"].nunique(dropna=False) > 1:
        found = sorted(f"{n} v{v} ({h})" for n, v, h in
                       table[["suite", "suite_version", "protocol_hash"]].drop_duplicates().astype(str).itertuples(index=False))
        raise ClbenchError(f"{store.root} mixes records of different suite protocols: {', '.join(found)}; a leaderboard "
                           "compares one protocol only: keep each suite version's records in its own store")
    return table


def _diverged(record: dict[str, Any]) -> bool:
    """A record of a run that did not finish sanely: marked incomplete, or its final score is missing or not
    finite (stores written before clbench checked weights and scores keep such runs as records)."""
    acc = record["metrics"].get("acc")
    return record.get("complete") is False or not isinstance(acc, (int, float)) or not math.isfinite(acc)


def _suite_columns(cell: dict[str, Any]) -> dict[str, Any]:
    """Suite provenance of a run made by ``clbench benchmark`` (none for a free-form sweep)."""
    suite = cell.get("suite")
    if not suite:
        return {}
    tuning = cell.get("tuning") or {}
    return {"suite": suite["name"], "suite_version": suite["version"], "protocol_hash": suite["protocol_hash"],
            "tuned": ",".join(tuning.get("searched", [])) or "-", "tuning_trials": tuning.get("trials", 0),
            "validation_score": "-" if tuning.get("validation_score") is None else f"{tuning['validation_score']:.6g}"}


def build(store: Store) -> pd.DataFrame:
    """The leaderboard: stable column order, sorted by the config keys."""
    runs = runs_table(store)
    if runs.empty:
        return runs
    rows = []
    for key, everything in runs.groupby(KEYS, sort=True):
        row = dict(zip(KEYS, key))
        group = everything[~everything["diverged"]]  # every mean over the same seeds: those that ran sanely
        for m in METRICS + COSTS:
            row[f"{m}_mean"] = float(group[m].mean()) if group[m].notna().any() else np.nan
            row[f"{m}_ci95"] = ci95(group[m])
        row["parameter_count"] = int(everything["parameter_count"].max())
        row["n_seeds"] = int(group["seed"].nunique())
        row["diverged_seeds"] = int(everything.loc[everything["diverged"], "seed"].nunique())
        for col in ("clbench_version", "git_commit", "device", "dataset"):
            row[col] = ";".join(sorted(set(group[col].astype(str))))
        for col in SUITE_COLUMNS:
            if col in group:
                row[col] = ";".join(sorted(set(group[col].astype(str))))
        rows.append(row)
    table = pd.DataFrame(rows)
    present = table[[f"{m}_mean" for m in OPTIONAL]].notna().any()
    drop = [c for m in OPTIONAL if not present[f"{m}_mean"] for c in (f"{m}_mean", f"{m}_ci95")]
    if not table["diverged_seeds"].any():
        drop.append("diverged_seeds")  # the column flags rows with diverged seeds, so it is there only then
    return table.drop(columns=drop)


def write(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the CSV with fixed float formatting, atomically."""
    atomic_write(path, table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
