"""Hyper-parameter selection for one strategy under a suite's protocol (Optuna).

Objective: the suite metric of the whole continual run (e.g. final ACC), averaged
over the suite's stream configs and tuning seeds, measured on the validation
split (never a test set; see clbench.experiments.suite). Every strategy gets the same number
of trials. Trials live in an Optuna storage (SQLite file by default), so a
killed search resumes: finished trials are kept, a trial that was running when
the process died is marked failed and its parameters are queued again.
Trials run through the sweep executors (this process, local processes, or Ray
tasks across machines), one batch of ``jobs`` trials at a time.

TPE sampler: Bergstra et al., "Algorithms for hyper-parameter optimization", NeurIPS 2011.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from clbench.core.errors import ClbenchError
from clbench.experiments.suite import Suite, cells, check_space, protocol, tuning_split


def search_space(suite: Suite, strategy: str) -> dict[str, tuple]:
    """The suite's common space plus the strategy's own (the suite's [[strategy]] ``space`` replaces the latter)."""
    from clbench.core.registry import lookup

    entry = suite.strategy_entry(strategy)
    own = entry["space"] if "space" in entry else getattr(lookup("strategy", strategy), "search_space", {})
    space = {**check_space(protocol(suite.spec)["tuning"]["space"], f"suite {suite.name} [tuning]"),
             **check_space(own, f"search space of {strategy}")}
    fixed = entry.get("args", {})
    return {k: v for k, v in space.items() if k not in fixed}


def _suggest(trial: Any, space: dict[str, tuple]) -> dict[str, Any]:
    params = {}
    for arg, dim in sorted(space.items()):
        if dim[0] == "log":
            params[arg] = trial.suggest_float(arg, dim[1], dim[2], log=True)
        elif dim[0] == "float":
            params[arg] = trial.suggest_float(arg, dim[1], dim[2])
        elif dim[0] == "int":
            params[arg] = trial.suggest_int(arg, int(dim[1]), int(dim[2]))
        else:
            params[arg] = trial.suggest_categorical(arg, list(dim[1]))
    return params


def study_name(suite: Suite, strategy: str, fixed: dict[str, Any], space: dict[str, tuple]) -> str:
    """One study per (suite protocol, strategy, fixed arguments, search space)."""
    digest = hashlib.sha1(json.dumps([fixed, space], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{suite.name}-v{suite.version}-{suite.protocol_hash}-{strategy}-{digest}"


def tune(suite: Suite, strategy: str, store_dir: str | os.PathLike, storage: str | None = None,
         executor: str = "processes", jobs: int = 1, address: str | None = None, device: str | None = None,
         max_new_trials: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Search ``strategy``'s space with the suite's budget; returns and writes ``<store>/tuning/<study>.json``.

    The result: chosen settings, validation score, budget (trials counted), the space and every trial.
    ``max_new_trials`` stops after that many new trials (the search resumes on the next call).
    """
    try:
        import optuna
    except ImportError:
        raise ClbenchError("tuning needs Optuna; install it with: pip install optuna") from None
    from tqdm.auto import tqdm

    from clbench.core.registry import check_arguments, lookup
    from clbench.experiments import sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    proto = protocol(suite.spec)
    budget = int(proto["tuning"]["trials"])
    fixed = dict(suite.strategy_entry(strategy).get("args", {}))
    space = search_space(suite, strategy)
    check_arguments("strategy", strategy, lookup("strategy", strategy),
                    {**proto["training"], **fixed, **{key: None for key in space}})  # the space: names only
    for cfg in suite.streams():
        check_arguments("stream", cfg["stream"], lookup("stream", cfg["stream"]), cfg["stream_args"])
    store_dir = Path(store_dir)
    (store_dir / "tuning").mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(store_dir / 'tuning.db').resolve()}"
    name = study_name(suite, strategy, fixed, space)
    summary: dict[str, Any] = {"study": name, "storage": storage, "strategy": strategy, "fixed_args": fixed,
                               "space": {k: list(v) for k, v in space.items()}, "budget_trials": budget,
                               "tuning_seeds": proto["tuning"]["seeds"], "validation": proto["validation"],
                               "metric": proto["metric"], "suite": suite.tag}
    if not space or budget == 0:
        summary.update(chosen={}, validation_score=None, trials_counted=0, trials=[],
                       note="nothing to tune" if not space else "the suite's tuning budget is 0 trials")
        return _write(store_dir, name, summary)

    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.enqueue_trial(stale.params, skip_if_exists=False)  # a killed process left it running: redo it
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    counted = lambda: [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE  # noqa: E731
                       or (t.state == optuna.trial.TrialState.FAIL and "failed" in t.user_attrs)]
    study.sampler = optuna.samplers.TPESampler(seed=int(proto["tuning"]["sampler_seed"]) + len(study.trials))
    device = device or suite.spec.get("device", "cpu")
    split = tuning_split(suite)
    commit = sweep.git_commit()
    new = 0
    todo_total = budget - len(counted())
    if max_new_trials is not None:
        todo_total = min(todo_total, max_new_trials)
    bar = tqdm(total=max(todo_total, 0), disable=None if progress else True, unit="trial", desc=f"tune {strategy}")
    while len(counted()) < budget and (max_new_trials is None or new < max_new_trials):
        n = min(jobs, budget - len(counted()), (max_new_trials - new) if max_new_trials is not None else jobs)
        trials = [study.ask() for _ in range(n)]
        plan = {}
        for trial in trials:
            params = _suggest(trial, space)
            for cell in cells(suite, strategy, {**fixed, **params}, proto["tuning"]["seeds"], split):
                plan[sweep.cell_id(cell)] = (trial, cell)
        todo = [cell for _, cell in plan.values()]
        if executor == "ray":
            outcomes = sweep._ray(todo, device, commit, address, 1.0, None, None)
        elif jobs > 1:
            outcomes = sweep._processes(todo, device, commit, jobs, None)
        else:
            outcomes = sweep._serial(todo, device, commit, None)
        scores: dict[int, list[float]] = {t.number: [] for t in trials}
        errors: dict[int, str] = {}
        for cell, record, error in outcomes:
            trial = plan[sweep.cell_id(cell)][0]
            if error is not None:
                errors.setdefault(trial.number, f"{type(error).__name__}: {error}")
            else:
                value = record["metrics"].get(proto["metric"])
                scores[trial.number].append(float("nan") if value is None else float(value))
        for trial in trials:
            values = scores[trial.number]
            if trial.number in errors or not values or any(v != v for v in values):
                trial.set_user_attr("failed", errors.get(trial.number, "the metric is undefined (NaN)"))
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, sum(values) / len(values))
            new += 1
            bar.update(1)
    bar.close()
    done = counted()
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        reasons = "; ".join(sorted({t.user_attrs.get("failed", "?") for t in done}))[:500]
        raise ClbenchError(f"every tuning trial of {strategy} failed so far ({reasons}); narrow its search space "
                           "(e.g. a smaller lr range) in the suite's [[strategy]] space")
    best = max(complete, key=lambda t: (t.value, -t.number))
    # chosen floats rounded to 4 significant digits: readable leaderboard rows, and well inside what the
    # validation score can resolve
    chosen = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in best.params.items()}
    summary.update(chosen=chosen, validation_score=best.value, trials_counted=len(done),
                   finished=len(done) >= budget,
                   trials=[{"number": t.number, "params": t.params, "value": t.value, "state": t.state.name,
                            **({"failed": t.user_attrs["failed"]} if "failed" in t.user_attrs else {})}
                           for t in sorted(done, key=lambda t: t.number)])
    return _write(store_dir, name, summary)


def _write(store_dir: Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    path = store_dir / "tuning" / f"{name}.json"
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    summary["path"] = str(path)
    return summary
