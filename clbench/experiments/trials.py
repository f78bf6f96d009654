"""The Optuna side of tuning: a storage that many processes (on one machine or many) open and share, which
trials count toward a strategy's budget, who owns a running trial, and a sampler that samples the same points
whether a search ran in one go or was stopped and resumed.

- A trial **counts** when it finished with a value (COMPLETE) or failed because of its sampled setting: the
  training diverged (clbench.TrainingDiverged) or the metric is undefined; those are told PRUNED, which TPE
  ranks below every finished trial. A trial that failed because of the environment or the code (missing
  data, a bad device, an exception in a plugin) or was interrupted is told FAIL, does not count, and its
  setting is queued again, so the next run retries it.
- A running trial is **owned** by the process that asked for it (user attribute ``worker``, host:pid) and
  only that process tells its result. The owner records a heartbeat every ``heartbeat_interval`` seconds
  (Optuna's RDBStorage heartbeat table); a trial whose heartbeat is older than ``grace_period`` belongs to a
  process that died: any process then fails it (optuna.storages.fail_stale_trials) and queues its setting.
- The sampler is TPE (Bergstra et al., "Algorithms for hyper-parameter optimization", NeurIPS 2011) with a
  random state drawn per trial from (sampler seed, the trial's place among the trials that count or run),
  so a resumed search continues exactly where an uninterrupted one would be.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from clbench.core.errors import ClbenchError

HEARTBEAT_S = 10  #: a running trial's owner records a heartbeat this often (seconds)
GRACE_S = 60  #: a running trial whose last heartbeat is older than this (seconds) is stale: its owner died
DIVERGED = "diverged"  #: user attribute of a trial that failed because of its setting (it counts)
ERROR = "error"  #: user attribute of a trial that failed for another reason (it does not count)
# Trials written before the two attributes above kept every failure under "failed"; these messages were
# failures of the setting (they count), any other one an error of the environment (it does not).
_LEGACY_DIVERGED = ("TrainingDiverged", "the metric is undefined")


def redact(url: str) -> str:
    """A storage URL with its password (if any) replaced by ``***``: what summaries and messages show."""
    try:
        import sqlalchemy.engine

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: nothing to hide that a URL parser would find
        head, at, tail = url.rpartition("@")
        return f"{head.rpartition(':')[0]}:***@{tail}" if at and ":" in head.split("//")[-1] else url


def counts(trial: FrozenTrial) -> bool:
    """Whether ``trial`` counts toward the budget (see the module docstring)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    legacy = trial.user_attrs.get("failed")
    return trial.state == TrialState.FAIL and isinstance(legacy, str) and legacy.startswith(_LEGACY_DIVERGED)


def failure(trial: FrozenTrial) -> str | None:
    """Why a counted trial has no value (its divergence), or None."""
    return trial.user_attrs.get(DIVERGED) or (trial.user_attrs.get("failed") if trial.state == TrialState.FAIL
                                              else None)


def _requeue(study: optuna.Study, trial: Any) -> None:
    """Queue ``trial``'s setting again (a stale or failed trial is retried with the same parameters)."""
    params = trial.params or trial.user_attrs.get("retry_params") or {}
    if params:
        study.enqueue_trial(params, user_attrs={"retry_of": trial.user_attrs.get("retry_of", trial.number),
                                                "retry_params": params})


def open_storage(url: str, heartbeat_interval: int = HEARTBEAT_S, grace_period: int = GRACE_S) -> Any:
    """An Optuna RDBStorage at ``url`` with heartbeats on; a bad URL is one ClbenchError.

    Several processes opening a fresh storage at once race on creating its tables; the losers retry.
    """
    import sqlalchemy.engine
    import sqlalchemy.exc

    shown = redact(url)
    fix = "give an SQLAlchemy URL such as sqlite:///path/tuning.db or postgresql://user:password@host/db"
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError) as e:
        raise ClbenchError(f"--storage {shown!r} is not a database URL ({e}); {fix}") from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            raise ClbenchError(f"--storage {shown!r} names no database file; processes cannot share an in-memory "
                               f"database: {fix}")
        if os.path.isdir(path):
            raise ClbenchError(f"--storage {shown!r}: {path} is a folder; name a database file inside it")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ClbenchError(f"--storage {shown!r}: the folder {folder} does not exist; create it first")
        engine_kwargs["connect_args"] = {"timeout": 60}  # wait for other writers instead of "database is locked"
    last: BaseException | None = None
    for attempt in range(8):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                  heartbeat_stale_trial_callback=_requeue)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, RuntimeError) as e:
            last = e  # another process is creating the schema (or holds the lock): try again shortly
            time.sleep(0.1 * (attempt + 1) + random.random() * 0.2)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, TypeError) as e:
            raise ClbenchError(f"cannot open the Optuna storage {shown} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else e}); {fix}") from None
    reason = str(last).splitlines()[0] if str(last) else type(last).__name__
    raise ClbenchError(f"cannot open the Optuna storage {shown} ({reason}); check that the database is reachable "
                       "and was made by this Optuna version")


def open_study(storage: Any, name: str, direction: str, seed: int) -> optuna.Study:
    """Create the study or load it (whichever process comes first creates it); refuse one made with another
    direction."""
    import sqlalchemy.exc

    for attempt in range(8):
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True,
                                        sampler=ResumableTPE(seed))
            break
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, KeyError):
            if attempt == 7:
                raise
            time.sleep(0.1 * (attempt + 1) + random.random() * 0.2)
    if study.direction.name.lower() != direction:
        raise ClbenchError(f"study {name} in the storage was made to {study.direction.name.lower()} its metric, "
                           f"but the metric is to {direction}; delete the study (optuna delete-study --study-name "
                           f"{name} --storage URL) and tune again")
    return study


class ResumableTPE(optuna.samplers.BaseSampler):
    """Optuna's TPESampler, with a fresh random state per trial drawn from (seed, the trial's place).

    The place of a trial is how many trials with a smaller number count or are running. A trial that failed
    for its environment, or was interrupted, takes no place, so a search stopped and resumed samples the same
    points as one that never stopped (an uninterrupted search reseeded by trial count would not).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._per_trial: dict[int, optuna.samplers.TPESampler] = {}

    def place(self, study: optuna.Study, number: int) -> int:
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if t.number < number and (counts(t) or t.state == TrialState.RUNNING))

    def _tpe(self, study: optuna.Study, trial: FrozenTrial) -> optuna.samplers.TPESampler:
        if trial.number not in self._per_trial:
            seed = (self.seed * 1_000_003 + self.place(study, trial.number)) % 2**32
            # constant liar: trials still running count as bad ones, so trials asked together spread out
            # (Optuna's batch mode); with one trial at a time nothing else runs and TPE is unchanged
            self._per_trial[trial.number] = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        return self._per_trial[trial.number]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._tpe(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._per_trial.pop(trial.number, None)


def worker() -> str:
    """Who owns a trial: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_stale(study: optuna.Study, grace_period: int = GRACE_S) -> None:
    """Fail the running trials whose owner died (no heartbeat for ``grace_period`` s) and queue their settings.

    Trials without an owner (asked by another program, or by an older clbench) are stale once they started
    ``grace_period`` s ago.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    cutoff = datetime.now() - timedelta(seconds=grace_period)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" not in trial.user_attrs and trial.datetime_start is not None and trial.datetime_start < cutoff:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another process failed (or finished) it first
            _requeue(study, trial)


def ask(study: optuna.Study, storage: Any, n: int, budget: int) -> list[optuna.Trial]:
    """Up to ``n`` new trials owned by this process, each within the budget: a trial whose smaller-numbered
    trials (counted, running or queued) already fill the budget is given up (another process got there first)."""
    asked = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for _ in range(n):
        with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for Study.optimize; ask() records them here
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        trial.set_user_attr("worker", worker())
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
        asked.append(trial)
    trials = study.get_trials(deepcopy=False)
    kept = []
    for trial in asked:
        before = sum(1 for t in trials if t.number < trial.number and (
            counts(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)))
        if before < budget:
            kept.append(trial)
            continue
        trial.set_user_attr(ERROR, "not run: other processes had filled the budget")
        study.tell(trial, state=TrialState.FAIL)
        if "retry_params" in trial.user_attrs:  # a queued retry: queue it again for whoever needs it
            _requeue(study, trial)
    return kept


@contextmanager
def heartbeats(study: optuna.Study, storage: Any, trials: list[optuna.Trial], interval: int) -> Iterator[None]:
    """Record a heartbeat of every trial in ``trials`` every ``interval`` seconds while the block runs."""
    study_id = storage.get_study_id_from_name(study.study_name)
    ids = [storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in trials]
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for trial_id in ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a busy database: the next beat tries again
                    pass

    thread = threading.Thread(target=beat, name="clbench-trial-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
