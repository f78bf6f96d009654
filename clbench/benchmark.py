"""``clbench benchmark``: one strategy through a suite's protocol, ranked among the suite's committed rows.

1. Tune the strategy's search space with the suite's budget on the validation split (clbench.experiments.tune),
   unless its settings are given.
2. Final rows: the chosen settings on the test sets over every suite seed (a resumable sweep, clbench.experiments.sweep).
3. Rank it among the committed records of the suite (``leaderboards/results/<suite>``) and any others in the
   store, mark the rows not distinguishable from the best (clbench.reporting.report), write a CSV and a chart.

Before any work, the store and the committed records are checked to hold this suite's protocol only, and
settings given with ``--set`` are checked not to change the protocol: the suite's [training] settings and a
strategy's fixed ``args`` are the protocol (a row trained for more epochs is not comparable under the suite's
name), so overriding them is an error; changing them means a new suite (or a new version of it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from clbench.core.errors import ClbenchError
from clbench.core.metrics import higher_is_better
from clbench.experiments.suite import Suite, cells, final_split, protocol


def final_rows(suite: Suite, strategy: str, store_dir: str | os.PathLike, settings: dict[str, Any] | None = None,
               executor: str = "processes", jobs: int | str = 1, address: str | None = None, device: str | None = None,
               storage: str | None = None, progress: bool = True, batch: str | int = "auto") -> dict[str, Any]:
    """Tune (unless ``settings``) and run the final test rows of one strategy (its seeds batched unless
    ``batch="off"``); returns the tuning summary. ``jobs="auto"``: see clbench.experiments.batching.resolve_jobs."""
    from clbench.experiments import tune
    from clbench.experiments.batching import parse_batch, resolve_jobs
    from clbench.experiments.store import Store
    from clbench.experiments.sweep import run_sweep

    fixed = dict(suite.strategy_entry(strategy).get("args", {}))
    jobs = resolve_jobs(jobs, strategy, parse_batch(batch), executor, device or suite.spec.get("device", "cpu"),
                        say=progress)
    if settings:
        summary = {"chosen": dict(settings), "validation_score": None, "trials_counted": 0, "space": {},
                   "note": "settings given on the command line; not tuned"}
    else:
        summary = tune.tune(suite, strategy, store_dir, storage=storage, executor=executor, jobs=jobs,
                            address=address, device=device, progress=progress, batch=batch)
    tuning = {"trials": summary["trials_counted"], "validation_score": summary["validation_score"],
              "searched": sorted(summary["space"]), "given": sorted(settings or {})}
    if "study" in summary:
        tuning["study"] = summary["study"]
    todo = cells(suite, strategy, {**fixed, **summary["chosen"]}, protocol(suite.spec)["seeds"], final_split(suite),
                 extra={"tuning": tuning})
    run_sweep(todo, Store(store_dir), device=device or suite.spec.get("device", "cpu"), jobs=jobs, progress=progress,
              executor=executor, address=address, batch=batch)
    return summary


def check_settings(suite: Suite, strategy: str, settings: dict[str, Any]) -> None:
    """Refuse ``--set`` settings that the suite's protocol fixes: its [training] settings and the strategy's
    ``args`` (a key in the search space may be given: that is choosing instead of tuning)."""
    from clbench.experiments.tune import search_space

    space = search_space(suite, strategy)
    fixed = {**protocol(suite.spec)["training"], **suite.strategy_entry(strategy).get("args", {})}
    clash = sorted(k for k in settings if k in fixed and k not in space)
    if clash:
        given = ", ".join(f"{k}={settings[k]!r} (the suite has {fixed[k]!r})" for k in clash)
        raise ClbenchError(f"--set {given}: suite {suite.name} v{suite.version} fixes "
                           f"{'it' if len(clash) == 1 else 'them'} as part of its protocol, so a row with another "
                           "value would not be comparable with the suite's rows; drop the --set, or copy the suite "
                           "file under a new name (or version) with the setting you want")


def _protocol_runs(suite: Suite, where: Path) -> pd.DataFrame | None:
    """The runs in ``where`` (None if it holds none); a ClbenchError if any was made under another protocol."""
    from clbench.experiments.store import Store
    from clbench.reporting.leaderboard import runs_table

    if not where.is_dir() or not any(where.glob("*.json")):
        return None
    runs = runs_table(Store(where, create=False))
    hashes = set(runs.get("protocol_hash", pd.Series(["none"])).astype(str))
    if hashes != {suite.protocol_hash}:
        raise ClbenchError(f"the records in {where} were made under protocol {', '.join(sorted(hashes))}, but "
                           f"suite {suite.name} v{suite.version} ({suite.path}) now has protocol "
                           f"{suite.protocol_hash}; a leaderboard never mixes protocols: rerun them with "
                           "`clbench benchmark --suite ...` into another --store (and bump the suite's version "
                           "when you change it)")
    return runs


def check_store(suite: Suite, store_dir: str | os.PathLike) -> None:
    """Before any work: the store and the suite's committed records hold this suite's protocol only."""
    for where in dict.fromkeys([Path(store_dir).resolve(), suite.results_dir.resolve()]):
        _protocol_runs(suite, where)


def suite_runs(suite: Suite, store_dir: str | os.PathLike) -> pd.DataFrame:
    """Runs of ``store_dir`` and of the suite's committed results (the store's win on duplicates); a store made
    under another protocol is an error."""
    frames = []
    for where in dict.fromkeys([Path(store_dir).resolve(), suite.results_dir.resolve()]):
        runs = _protocol_runs(suite, where)
        if runs is not None:
            frames.append(runs)
    if not frames:
        raise ClbenchError(f"no records of suite {suite.name} in {store_dir} or {suite.results_dir}")
    runs = pd.concat(frames, ignore_index=True)
    return runs.drop_duplicates(["stream", "stream_args", "strategy", "strategy_args", "seed"], keep="first")


def benchmark(suite: Suite, strategies: list[str], store_dir: str | os.PathLike,
              settings: dict[str, Any] | None = None, executor: str = "processes", jobs: int | str = 1,
              address: str | None = None, device: str | None = None, storage: str | None = None,
              progress: bool = True, batch: str | int = "auto") -> dict[str, Any]:
    """Tune and run every strategy in ``strategies``, then rank; writes ``<store>/leaderboard.{csv,png}``."""
    from clbench.reporting import report

    if settings and len(strategies) != 1:
        raise ClbenchError("--set gives the settings of one strategy; benchmark one --strategy at a time with it")
    if settings:
        check_settings(suite, strategies[0], settings)
    check_store(suite, store_dir)
    summaries = {s: final_rows(suite, s, store_dir, settings, executor, jobs, address, device, storage, progress,
                               batch) for s in strategies}
    metric = protocol(suite.spec)["metric"]
    runs = suite_runs(suite, store_dir)
    table = report.ranked(runs, metric, higher_is_better=higher_is_better(metric))
    grid = report.grid_comparison(runs, strategies[0], metric) if len(strategies) == 1 else ""
    store_dir = Path(store_dir)
    csv, png = store_dir / "leaderboard.csv", store_dir / "leaderboard.png"
    table.to_csv(csv, index=False, float_format="%.6g", lineterminator="\n")
    report.chart(table, str(png), metric, highlight=strategies[0] if len(strategies) == 1 else None,
                 title=f"{suite.name} v{suite.version} ({suite.protocol_hash})")
    return {"table": table, "tuning": summaries, "csv": str(csv), "png": str(png), "metric": metric, "grid": grid}
