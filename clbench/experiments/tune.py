"""Hyper-parameter selection for one strategy under a suite's protocol (Optuna).

Objective: the suite metric of the whole continual run (e.g. final ACC), averaged
over the suite's stream configs (or the subset ``[tuning] streams`` names) and tuning seeds, measured on the validation
split (never a test set; see clbench.experiments.suite), maximised or minimised as
clbench.core.metrics.direction says. Every strategy gets the same number of counted
trials. Trials live in an Optuna storage (SQLite file by default) that any number of
processes share: a killed search resumes (finished trials are kept, a dead process's
running trial is recognised by its stale heartbeat and its setting redone), and a
trial that failed because of the environment is retried rather than counted (see
clbench.experiments.trials). Trials run through the sweep executors (this process,
local processes, or Ray tasks across machines). With ``batch`` on (the default), several trials are asked
at once (TPE's constant liar keeps them apart) and their runs train together as one batched model
(clbench.experiments.batching); with ``batch="off"``, ``jobs`` trials at a time, one run each.
Guide: docs/tuning.md.

TPE sampler: Bergstra et al., "Algorithms for hyper-parameter optimization", NeurIPS 2011.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import optuna

from clbench.core.errors import ClbenchError
from clbench.core.io import atomic_write
from clbench.experiments import trials
from clbench.experiments.suite import Suite, cells, check_space, protocol, tuning_split

TRIALS_AT_ONCE = 8  # batch="auto": trials asked and trained together per worker process


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


EDGE = 0.05  # a chosen number within this share of its range's width (log width for "log") from an end


def at_edge(chosen: dict[str, Any], space: dict[str, tuple]) -> dict[str, str]:
    """The chosen arguments that lie at an end of their searched range: ``{arg: "lower" | "upper"}``. The best
    setting at an edge means the range cut the search short: widen it (the suite's [[strategy]] space)."""
    out = {}
    for arg, dim in space.items():
        if dim[0] not in ("log", "float", "int") or arg not in chosen:
            continue
        scale = math.log if dim[0] == "log" else float
        low, high, value = scale(dim[1]), scale(dim[2]), scale(chosen[arg])
        share = (value - low) / (high - low)
        if share <= EDGE or share >= 1 - EDGE:
            out[arg] = "lower" if share <= EDGE else "upper"
    return out


def study_name(suite: Suite, strategy: str, fixed: dict[str, Any], space: dict[str, tuple]) -> str:
    """One study per (suite protocol, strategy, fixed arguments, search space); a minimised metric's study has
    its own name, apart from any maximised study of that metric an older store holds."""
    from clbench.core.metrics import direction

    key: list[Any] = [fixed, space]
    if direction(protocol(suite.spec)["metric"]) == "minimize":
        key.append("minimize")
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{suite.name}-v{suite.version}-{suite.protocol_hash}-{strategy}-{digest}"


def tune(suite: Suite, strategy: str, store_dir: str | os.PathLike, storage: str | None = None,
         executor: str = "processes", jobs: int | str = 1, address: str | None = None, device: str | None = None,
         max_new_trials: int | None = None, progress: bool = True, heartbeat_interval: int = trials.HEARTBEAT_S,
         grace_period: int = trials.GRACE_S, batch: str | int = "auto") -> dict[str, Any]:
    """Search ``strategy``'s space with the suite's budget; returns and writes ``<store>/tuning/<study>.json``.

    The result: chosen settings, validation score, budget (trials counted), the space and every counted trial.
    ``max_new_trials`` stops after that many new trials (the search resumes on the next call). Any number of
    processes, here or on other machines, may tune the same strategy on one ``storage`` at once: together they
    run the budget once (see clbench.experiments.trials). A trial that fails because of the environment or the
    code is not counted: the search stops with a ClbenchError and retries that setting on the next call.
    ``batch``: ``"auto"`` asks TRIALS_AT_ONCE trials at a time (``jobs`` if more) and shares them out among
    the jobs, each training its share's runs together as one batched model (a strategy without a batched
    form: each run alone), ``N`` asks N at a time, ``"off"`` asks ``jobs`` and runs each alone. A trial's
    value means the same either way; which points TPE proposes depends on how many trials it asks before it
    hears back. ``jobs="auto"``: see clbench.experiments.batching.resolve_jobs.
    """
    from tqdm.auto import tqdm

    from clbench.core.engine import resolve_device
    from clbench.core.io import check_writable_folder
    from clbench.core.metrics import direction
    from clbench.core.registry import check_arguments, lookup
    from clbench.experiments import sweep
    from clbench.experiments.batching import parse_batch, resolve_jobs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    batch = parse_batch(batch)
    jobs = resolve_jobs(jobs, strategy, batch, executor, device or suite.spec.get("device", "cpu"), say=progress)
    if batch == "auto":  # 8 at a time, batched or not, shared out among the jobs (one batched model each)
        at_once = max(TRIALS_AT_ONCE, jobs)
    else:
        at_once = jobs if batch == "off" else batch
    if max_new_trials is not None and max_new_trials < 1:
        raise ClbenchError(f"--max-new-trials must be at least 1, got {max_new_trials}")
    proto = protocol(suite.spec)
    budget = int(proto["tuning"]["trials"])
    fixed = dict(suite.strategy_entry(strategy).get("args", {}))
    space = search_space(suite, strategy)
    check_arguments("strategy", strategy, lookup("strategy", strategy),
                    {**proto["training"], **fixed, **{key: None for key in space}})  # the space: names only
    for cfg in suite.streams():
        check_arguments("stream", cfg["stream"], lookup("stream", cfg["stream"]), cfg["stream_args"])
    device = device or suite.spec.get("device", "cpu")
    resolve_device(device)  # a device this machine lacks fails now, not in every trial
    store_dir = Path(store_dir)
    check_writable_folder(store_dir, "the store folder")
    check_writable_folder(store_dir / "tuning", "the store's tuning folder")
    url = storage or f"sqlite:///{(store_dir / 'tuning.db').resolve()}"
    name = study_name(suite, strategy, fixed, space)
    goal = direction(proto["metric"])
    summary: dict[str, Any] = {"study": name, "storage": trials.redact(url), "strategy": strategy,
                               "fixed_args": fixed, "space": {k: list(v) for k, v in space.items()},
                               "budget_trials": budget, "tuning_seeds": proto["tuning"]["seeds"],
                               "validation": proto["validation"], "metric": proto["metric"], "direction": goal,
                               "suite": suite.tag}
    if not space or budget == 0:
        summary.update(chosen={}, validation_score=None, trials_counted=0, trials=[],
                       note="nothing to tune" if not space else "the suite's tuning budget is 0 trials")
        return _write(store_dir, name, summary)

    rdb = trials.open_storage(url, heartbeat_interval, grace_period)
    study = trials.open_study(rdb, name, goal, int(proto["tuning"]["sampler_seed"]))
    split = tuning_split(suite)
    commit = sweep.git_commit()
    new, errors = 0, []
    bar = tqdm(total=budget, disable=None if progress else True, unit="trial", desc=f"tune {strategy}")
    while not errors:
        trials.fail_stale(study, grace_period)
        now = study.get_trials(deepcopy=False)
        counted = sum(map(trials.counts, now))
        bar.update(counted - bar.n)
        if counted >= budget or (max_new_trials is not None and new >= max_new_trials):
            break
        room = budget - counted - sum(t.state == optuna.trial.TrialState.RUNNING for t in now)
        if room <= 0:  # the rest of the budget runs in other processes: wait for it (or for it to go stale)
            time.sleep(min(2.0, heartbeat_interval))
            continue
        n = min(at_once, room, at_once if max_new_trials is None else max_new_trials - new)
        asked = trials.ask(study, rdb, n, budget)
        with trials.heartbeats(study, rdb, asked, heartbeat_interval):
            errors = _run_batch(study, asked, suite, strategy, fixed, space, proto, split, device, commit,
                                executor, jobs, address, batch)
        new += len(asked)
    bar.close()
    if errors:
        raise ClbenchError(f"{len(errors)} tuning trial(s) of {strategy} failed because of the environment or the "
                           f"code, not their settings ({'; '.join(sorted(set(errors)))[:500]}); they do not count "
                           "toward the budget and are retried on the next run: fix the cause, then rerun")
    done = [t for t in study.get_trials(deepcopy=False) if trials.counts(t)]
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        reasons = "; ".join(sorted({trials.failure(t) or "?" for t in done}))[:500]
        raise ClbenchError(f"every tuning trial of {strategy} diverged so far ({reasons}); narrow its search "
                           "space (e.g. a smaller lr range) in the suite's [[strategy]] space")
    sign = 1 if goal == "maximize" else -1
    best = max(complete, key=lambda t: (sign * t.value, -t.number))
    # chosen floats rounded to 4 significant digits: readable leaderboard rows, and well inside what the
    # validation score can resolve
    chosen = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in best.params.items()}
    edge = at_edge(best.params, space)
    if edge:
        summary["at_edge"] = edge
    summary.update(chosen=chosen, validation_score=best.value, trials_counted=len(done),
                   finished=len(done) >= budget,
                   trials=[{"number": t.number, "params": t.params, "value": t.value, "state": t.state.name,
                            **({"failed": trials.failure(t)} if trials.failure(t) else {})}
                           for t in sorted(done, key=lambda t: t.number)])
    return _write(store_dir, name, summary)


def _run_batch(study: Any, asked: list, suite: Suite, strategy: str, fixed: dict[str, Any],
               space: dict[str, tuple], proto: dict[str, Any], split: dict[str, Any], device: str,
               commit: str | None, executor: str, jobs: int, address: str | None, batch: str | int) -> list[str]:
    """Run and tell the trials ``asked``; returns the errors of those that failed for other reasons than
    their setting (told FAIL and queued again). An interruption tells the unfinished ones the same way."""
    from clbench.core.engine import TrainingDiverged
    from clbench.core.metrics import FINAL_ROW
    from clbench.experiments import sweep
    from clbench.experiments.batching import sweep_outcomes

    # a trial evaluates what its metric reads: for final ACC, R's last row (and row 0), without the rows
    # between or the suite's continual evaluation (neither changes training, so the value is the same)
    final_only = proto["metric"] in FINAL_ROW
    told: set[int] = set()
    try:
        plan: dict[str, list] = {}  # cell id -> the trials it scores (two trials may share a setting)
        cells_by_id: dict[str, dict[str, Any]] = {}
        for trial in asked:
            params = _suggest(trial, space)
            for cell in cells(suite, strategy, {**fixed, **params}, proto["tuning"]["seeds"], split,
                              streams=suite.tuning_streams()):
                if final_only:
                    cell.pop("continual", None)
                    cell["final_only"] = True
                plan.setdefault(sweep.cell_id(cell), []).append(trial)
                cells_by_id[sweep.cell_id(cell)] = cell
        todo = list(cells_by_id.values())
        if executor == "ray":
            outcomes = sweep.on_ray(todo, device, commit, address, 1.0, None, None, "off" if batch == "off" else "auto")
        elif batch != "off":
            outcomes = sweep_outcomes(todo, device, commit, jobs, "auto")
        elif jobs > 1:
            outcomes = sweep.in_processes(todo, device, commit, jobs, None)
        else:
            outcomes = sweep._serial(todo, device, commit, None)
        scores: dict[int, list[float]] = {t.number: [] for t in asked}
        diverged: dict[int, str] = {}
        errors: dict[int, str] = {}
        for cell, record, error in outcomes:
            for trial in plan[sweep.cell_id(cell)]:
                if isinstance(error, TrainingDiverged):
                    diverged.setdefault(trial.number, f"TrainingDiverged: {error}")
                elif error is not None:
                    errors.setdefault(trial.number, f"{type(error).__name__}: {error}")
                else:
                    value = record["metrics"].get(proto["metric"])
                    scores[trial.number].append(float("nan") if value is None else float(value))
        for trial in asked:
            values = scores[trial.number]
            if trial.number in errors:
                _discard(study, trial, errors[trial.number])
            elif trial.number in diverged or not values or not all(math.isfinite(v) for v in values):
                trial.set_user_attr(trials.DIVERGED, diverged.get(trial.number, "the metric is undefined (not a "
                                                                                "finite number)"))
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, sum(values) / len(values))
            told.add(trial.number)
        return list(errors.values())
    except BaseException as e:  # an interruption (or a bug): the unfinished trials do not count, and are redone
        for trial in asked:
            if trial.number not in told:
                _discard(study, trial, f"interrupted ({type(e).__name__})")
        raise


def _discard(study: Any, trial: Any, why: str) -> None:
    """Tell ``trial`` FAIL (it does not count) and queue its setting again."""
    trial.set_user_attr(trials.ERROR, why)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    trials._requeue(study, trial)


def portable(url: str) -> str:
    """A SQLite URL whose file lies under the working folder, relative to it: what a committed summary shows
    (a clone elsewhere opens the same file from its own root); any other URL as it is."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and Path(url[len(prefix):]).is_absolute():
        try:
            return prefix + Path(url[len(prefix):]).relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return url
    return url


def _write(store_dir: Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    from clbench.core.io import inside

    path = inside(store_dir / "tuning", f"{name}.json")
    written = {**summary, "storage": portable(summary["storage"])}
    atomic_write(path, json.dumps(written, indent=1, sort_keys=True, default=str))
    summary["path"] = str(path)
    return summary
