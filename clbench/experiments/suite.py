"""Suites: named, versioned benchmark protocols (``clbench/suites/*.toml``), and the data splits they use.

A suite fixes everything a fair comparison needs: streams and their arguments,
model, training settings, seeds, the validation split, the tuning budget and
each strategy's search space. Its *protocol hash* covers all of it except the
list of strategies (a new strategy joins a suite without changing it); every
record a suite writes carries the suite's name, version and hash, and a
leaderboard never mixes hashes.

Selection never sees a test set. Two protocols:

- ``holdout``: a seeded ``share`` of each task's training data is held out and
  used as that task's evaluation set during tuning (the test tensors are
  dropped from the tuning stream); final rows train on all the training data
  and report the test sets.
- ``first-tasks`` (Chaudhry et al., "Efficient lifelong learning with A-GEM",
  ICLR 2019): tune on the first ``tasks`` tasks of the stream, report on the
  remaining ones (which tuning never touches).

File format (every key is checked; an unknown one is an error naming a close match; integers are integers,
not ``true``; names are non-empty and a strategy is listed once; the suite's name, like every name that ends
up in a file name, has letters, digits, '-', '_' and '.' only)::

    name = "permuted-fashion-mnist"   # optional, default: the file name
    version = 1
    description = "..."
    seeds = [0, 1, 2, 3, 4]           # final rows, on the test sets
    device = "cpu"                    # not part of the protocol hash
    metric = "acc"                    # what tuning optimises and the leaderboard ranks by (forgetting: minimised)

    [training]                        # strategy training settings every strategy gets
    epochs = 1

    [validation]
    protocol = "holdout"              # or "first-tasks"
    share = 0.1                       # holdout
    seed = 0                          # holdout: which samples are held out
    tasks = 2                         # first-tasks: how many tasks tuning uses

    [tuning]
    trials = 8                        # Optuna trials per strategy (the same for every strategy)
    seeds = [100]                     # seeds of the tuning runs (disjoint from the final seeds)
    sampler_seed = 0
    space = { lr = ["log", 0.01, 0.2] }   # optional: searched for every strategy, on top of its own space
    streams = { rho_a = [0.0, 1.0] }  # optional: tune on the stream configs whose args take these values only

    [continual]                       # optional: continual evaluation of every run (clbench.core.continual)
    eval_every = 50                   # training steps between evaluations; metric may then be min_acc or wc_acc
    eval_samples = 1000               # test samples a task

    [[stream]]                        # one or more; a list-valued argument is a grid axis
    name = "permuted-fashion-mnist"
    args = { tasks = 5 }
    model = "mlp"                     # optional
    model_args = { widths = [400, 400] }

    [[strategy]]                      # the suite's own strategies (its committed leaderboard)
    name = "ewc-diag"
    args = { fisher_samples = 500 }   # fixed arguments
    space = { strength = ["log", 0.1, 1000.0] }   # optional: replaces the strategy's declared space
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import tomllib
import torch

from clbench.core.errors import ClbenchError, unknown_key
from clbench.core.types import Stream

SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"  # package data: an installed wheel has them too
# The committed records live in the repository's leaderboards/ folder (absent from an installed wheel).
RESULTS_DIR = Path(__file__).resolve().parents[2] / "leaderboards" / "results"
_TOP = {"name", "version", "description", "seeds", "device", "metric", "training", "validation", "tuning",
        "stream", "strategy", "continual"}
_TABLES = {
    "training": {"epochs", "lr", "batch_size", "optimizer"},
    "validation": {"protocol", "share", "seed", "tasks"},
    "tuning": {"trials", "seeds", "sampler_seed", "space", "streams"},
    "stream": {"name", "args", "model", "model_args"},
    "strategy": {"name", "args", "space"},
    "continual": {"eval_every", "eval_samples"},
}
PROTOCOLS = ("holdout", "first-tasks")
KINDS = ("log", "float", "int", "choice")


@dataclasses.dataclass
class Suite:
    """A loaded suite: its file, the parsed spec, and the protocol hash."""

    name: str
    version: int
    path: Path
    spec: dict[str, Any]
    protocol_hash: str

    @property
    def results_dir(self) -> Path:
        """Where the suite's committed records live: the repository's ``leaderboards/results/<name>`` for a
        built-in suite, ``leaderboards/results/<name>`` beside the suite's folder for a suite given by path
        (``<name>-v<version>`` from version 2 on)."""
        folder = self.path.resolve().parent
        # a new version is a new protocol: its records live apart (version 1's folder has no suffix)
        name = self.name if self.version == 1 else f"{self.name}-v{self.version}"
        return (RESULTS_DIR if folder == SUITES_DIR else folder.parent / "leaderboards" / "results") / name

    @property
    def tag(self) -> dict[str, Any]:
        """What every record of this suite carries."""
        return {"name": self.name, "version": self.version, "protocol_hash": self.protocol_hash,
                "metric": self.spec.get("metric", "acc")}

    def strategy_entry(self, name: str) -> dict[str, Any]:
        """The suite's ``[[strategy]]`` entry for ``name`` (empty if the suite does not list it)."""
        for entry in self.spec.get("strategy", []):
            if entry["name"] == name:
                return entry
        return {"name": name}

    def streams(self) -> list[dict[str, Any]]:
        """Stream configs (name, args, model, model_args), list-valued args expanded into a grid."""
        from clbench.experiments.sweep import axes

        return [{"stream": s["name"], "stream_args": args, "model": s.get("model"), "model_args": s.get("model_args", {})}
                for s in self.spec["stream"] for args in axes(s.get("args"))]

    def tuning_streams(self) -> list[dict[str, Any]]:
        """The stream configs tuning runs on: all of them, or those whose arguments take the values
        ``[tuning] streams`` lists (e.g. a grid's corners)."""
        return _pick(self.streams(), self.spec.get("tuning", {}).get("streams"))


def _pick(configs: list[dict[str, Any]], subset: dict[str, list] | None) -> list[dict[str, Any]]:
    if not subset:
        return configs
    return [c for c in configs if all(c["stream_args"].get(arg) in values for arg, values in subset.items())]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML's true is a bool, never a number


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_space(space: Any, where: str) -> dict[str, tuple]:
    """A search space ``{arg: (kind, ...)}`` as tuples, or a ClbenchError saying what is wrong."""
    if not isinstance(space, dict):
        raise ClbenchError(f"{where}: a search space is a table {{arg = [kind, ...]}}, got {space!r}")
    out = {}
    for arg, dim in space.items():
        dim = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
        kind = dim[0] if dim else None
        ok = (kind in ("log", "float", "int") and len(dim) == 3 and all(_is_number(v) for v in dim[1:])
              and dim[1] < dim[2] and (kind != "log" or dim[1] > 0)) or (
              kind == "choice" and len(dim) == 2 and isinstance(dim[1], (list, tuple)) and len(dim[1]) > 0)
        if not ok:
            raise ClbenchError(f"{where}: search space entry {arg} = {list(dim)!r} is invalid; write "
                               "[\"log\", low, high] (0 < low < high), [\"float\", low, high], [\"int\", low, high] "
                               "or [\"choice\", [values]]")
        out[arg] = (kind, list(dim[1])) if kind == "choice" else dim
    return out


def _check_entries(spec: dict[str, Any], where: str) -> None:
    """[[stream]] and [[strategy]]: lists of tables with a name, table-valued arguments, no duplicates."""
    for table in ("stream", "strategy"):
        entries = spec.get(table, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ClbenchError(f"{where}: {table} must be [[{table}]] tables (name = ..., args = {{...}}); got "
                               f"{entries!r}"[:300])
        seen: dict[str, int] = {}
        for k, entry in enumerate(entries, 1):
            for key in entry:
                if key not in _TABLES[table]:
                    raise unknown_key(key, _TABLES[table], f"{where} [[{table}]]")
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ClbenchError(f"{where}: [[{table}]] entry {k} needs a name, a non-empty string such as "
                                   f"name = \"{'teacher-student' if table == 'stream' else 'ewc-diag'}\"; got "
                                   f"{name!r}")
            for key in ("args", "model_args", "space"):
                if key in entry and not isinstance(entry[key], dict):
                    raise ClbenchError(f"{where}: [[{table}]] {name}: {key} must be a table such as "
                                       f"{{ strength = 1.0 }}; got {entry[key]!r}")
            for arg, value in entry.get("args", {}).items():
                if table == "stream" and isinstance(value, list) and not value:
                    raise ClbenchError(f"{where}: [[stream]] {name}: the axis {arg} = [] is empty; give it values")
            if "model" in entry and not isinstance(entry["model"], str):
                raise ClbenchError(f"{where}: [[stream]] {name}: model must be a model name (see `clbench list`); "
                                   f"got {entry['model']!r}")
            key = name if table == "strategy" else json.dumps(entry, sort_keys=True, default=str)
            if key in seen:
                what = f"strategy {name!r}" if table == "strategy" else f"an identical [[stream]] {name!r}"
                raise ClbenchError(f"{where}: {what} is listed twice (entries {seen[key]} and {k}); keep one "
                                   "(a strategy's settings are its args and space)")
            seen[key] = k


def _check(spec: dict[str, Any], where: str) -> None:
    from clbench.core.metrics import METRICS
    from clbench.core.strategy import check_training_settings

    for key in spec:
        if key not in _TOP:
            raise unknown_key(key, _TOP, where)
    for table in ("training", "validation", "tuning"):
        entry = spec.get(table, {})
        if not isinstance(entry, dict):
            raise ClbenchError(f"{where}: [{table}] must be a table")
        for key in entry:
            if key not in _TABLES[table]:
                raise unknown_key(key, _TABLES[table], f"{where} [{table}]")
    if "name" in spec:
        from clbench.core.registry import check_name

        check_name("suite", spec["name"])
    for key in ("description", "device"):
        if key in spec and not isinstance(spec[key], str):
            raise ClbenchError(f"{where}: {key} must be a string; got {spec[key]!r}")
    if not _is_int(spec.get("version")) or spec["version"] < 1:
        raise ClbenchError(f"{where}: needs version = N (a positive integer); bump it whenever the protocol changes")
    _check_entries(spec, where)
    if not spec.get("stream"):
        raise ClbenchError(f"{where}: needs at least one [[stream]] entry")
    seeds = spec.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(_is_int(s) for s in seeds)):
        raise ClbenchError(f"{where}: seeds must be a non-empty list of integers, e.g. seeds = [0, 1, 2, 3, 4]")
    try:
        check_training_settings(**spec.get("training", {}))
    except ClbenchError as e:
        raise ClbenchError(f"{where} [training]: {e}") from None
    val = spec.get("validation", {})
    protocol = val.get("protocol", "holdout")
    if protocol not in PROTOCOLS:
        raise ClbenchError(f"{where} [validation]: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    share = val.get("share", 0.1)
    if protocol == "holdout" and not (_is_number(share) and 0 < share < 1):
        raise ClbenchError(f"{where} [validation]: share must be a number between 0 and 1 (e.g. 0.1), got {share!r}")
    if not _is_int(val.get("seed", 0)):
        raise ClbenchError(f"{where} [validation]: seed must be an integer, got {val['seed']!r}")
    if protocol == "first-tasks" and not (_is_int(val.get("tasks")) and val["tasks"] >= 1):
        raise ClbenchError(f"{where} [validation]: protocol 'first-tasks' needs tasks = K (K >= 1 tasks to tune on)")
    tuning = spec.get("tuning", {})
    if not (_is_int(tuning.get("trials", 0)) and tuning.get("trials", 0) >= 0):
        raise ClbenchError(f"{where} [tuning]: trials must be a non-negative integer, got {tuning['trials']!r}")
    tseeds = tuning.get("seeds", [100])
    if not (isinstance(tseeds, list) and tseeds and all(_is_int(s) for s in tseeds)):
        raise ClbenchError(f"{where} [tuning]: seeds must be a non-empty list of integers, e.g. seeds = [100]")
    if not _is_int(tuning.get("sampler_seed", 0)):
        raise ClbenchError(f"{where} [tuning]: sampler_seed must be an integer, got {tuning['sampler_seed']!r}")
    check_space(tuning.get("space", {}), f"{where} [tuning]")
    if "streams" in tuning:
        _check_tuning_streams(spec, tuning["streams"], where)
    for entry in spec.get("strategy", []):
        if "space" in entry:
            check_space(entry["space"], f"{where} [[strategy]] {entry['name']}")
    from clbench.core.continual import continual_options

    continual = continual_options(spec.get("continual"), where)
    metric = spec.get("metric", "acc")
    if metric in ("min_acc", "wc_acc") and not continual:
        raise ClbenchError(f"{where}: metric {metric!r} needs continual evaluation; add [continual] eval_every = K")
    if metric not in METRICS:
        raise ClbenchError(f"{where}: metric {spec['metric']!r} unknown; use one of {', '.join(METRICS)} "
                           "(see clbench.core.metrics)")


def _check_tuning_streams(spec: dict[str, Any], subset: Any, where: str) -> None:
    """``[tuning] streams``: a table {arg = [values]} of stream axes that leaves at least one config."""
    from clbench.experiments.sweep import axes

    example = "streams = { rho_a = [0.0, 1.0], rho_b = [0.0, 1.0] }"
    if not isinstance(subset, dict) or not subset or not all(isinstance(v, list) and v for v in subset.values()):
        raise ClbenchError(f"{where} [tuning]: streams must be a table of stream arguments and the values tuning "
                           f"uses, e.g. {example}; got {subset!r}")
    configs = [{"stream_args": args} for s in spec["stream"] for args in axes(s.get("args"))]
    names = {arg for c in configs for arg in c["stream_args"]}
    for arg in subset:
        if arg not in names:
            raise unknown_key(arg, names, f"{where} [tuning] streams (the stream arguments)")
    if not _pick(configs, subset):
        raise ClbenchError(f"{where} [tuning]: streams = {subset!r} matches none of the suite's stream configs; "
                           "list values the [[stream]] args take")


def protocol(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a suite that defines the comparison (hashed): everything but the strategy list and device."""
    val = dict(spec.get("validation", {}))
    val.setdefault("protocol", "holdout")
    if val["protocol"] == "holdout":
        val.setdefault("share", 0.1)
        val.setdefault("seed", 0)
    tuning = {"trials": 8, "seeds": [100], "sampler_seed": 0, "space": {}, **spec.get("tuning", {})}
    out = {"streams": spec["stream"], "training": spec.get("training", {}), "seeds": spec["seeds"],
           "metric": spec.get("metric", "acc"), "validation": val, "tuning": tuning}
    if spec.get("continual"):  # only then: the hashes of suites without it stay as they were
        from clbench.core.continual import continual_options

        out["continual"] = continual_options(spec["continual"])
    return out


def protocol_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(protocol(spec), sort_keys=True, default=str).encode()).hexdigest()[:12]


def find(name: str | os.PathLike) -> Path:
    """A suite by name (``clbench/suites/NAME.toml``) or by path."""
    path = Path(name)
    if path.suffix == ".toml":
        if path.is_dir():
            raise ClbenchError(f"suite file {path} is a folder; give the path of a suite .toml file")
        if not path.is_file():
            raise ClbenchError(f"suite file {path} not found")
        return path
    candidate = SUITES_DIR / f"{name}.toml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.toml"))
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ClbenchError(f"unknown suite {name!r}.{hint} Known suites: {', '.join(known) or 'none'} "
                           f"(files in {SUITES_DIR}); or pass the path of a suite .toml file")
    return candidate


def load(name: str | os.PathLike) -> Suite:
    """Load and check a suite file."""
    from clbench.core.registry import check_name

    path = find(name)
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ClbenchError(f"suite file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ClbenchError(f"cannot read suite file {path} ({e.strerror or e})") from None
    _check(spec, f"suite file {path}")
    if "name" not in spec:
        try:
            check_name("suite", path.stem)
        except ClbenchError as e:
            raise ClbenchError(f"suite file {path}: {e}; rename the file or give name = \"...\" in it") from None
    return Suite(name=spec.get("name", path.stem), version=spec["version"], path=path, spec=spec,
                 protocol_hash=protocol_hash(spec))


# --- the data splits ------------------------------------------------------------------------------------------

def holdout(stream: Stream, share: float, seed: int = 0) -> Stream:
    """The stream with each task's test set replaced by a seeded ``share`` of its training data (removed from
    training). Evaluation then measures validation scores; the test tensors are not in the returned stream."""
    if not 0 < share < 1:
        raise ClbenchError(f"validation share must be between 0 and 1, got {share!r}")
    tasks = []
    for task in stream.tasks:
        n = len(task.train_x)
        n_val = int(round(share * n))
        if n_val < 1 or n_val >= n:
            raise ClbenchError(f"task {task.id} has {n} training samples: a validation share of {share} leaves "
                               "no validation or no training data; change the share or the stream's size")
        g = torch.Generator().manual_seed(int(seed) * 100003 + task.id)
        order = torch.randperm(n, generator=g).to(task.train_x.device)
        val, train = order[:n_val], order[n_val:]
        tasks.append(dataclasses.replace(task, train_x=task.train_x[train], train_y=task.train_y[train],
                                         test_x=task.train_x[val], test_y=task.train_y[val]))
    provenance = {**stream.provenance, "evaluated_on": "validation", "validation": {"share": share, "seed": seed}}
    return dataclasses.replace(stream, tasks=tasks, provenance=provenance)


def task_range(stream: Stream, start: int = 0, stop: int | None = None) -> Stream:
    """Tasks ``start:stop`` of the stream, renumbered from 0 (the A-GEM protocol's tuning and reporting parts)."""
    picked = stream.tasks[start:stop]
    if not picked or (stop is not None and stop >= len(stream.tasks) and start == 0):
        raise ClbenchError(f"task range {start}:{stop} of a {len(stream.tasks)}-task stream leaves nothing to "
                           "tune on or to report; the first-tasks protocol needs tasks < the stream's task count")
    tasks = [dataclasses.replace(t, id=i) for i, t in enumerate(picked)]
    provenance = {**stream.provenance, "task_range": [start, stop]}
    return dataclasses.replace(stream, tasks=tasks, provenance=provenance)


def split_stream(stream: Stream, split: dict[str, Any]) -> Stream:
    """Apply a cell's ``split``: ``{"kind": "holdout", "share", "seed"}`` or ``{"kind": "tasks", "start", "stop"}``."""
    if split["kind"] == "holdout":
        return holdout(stream, split["share"], split.get("seed", 0))
    if split["kind"] == "tasks":
        return task_range(stream, split.get("start", 0), split.get("stop"))
    raise ClbenchError(f"unknown split kind {split['kind']!r}")


def tuning_split(suite: Suite) -> dict[str, Any]:
    """The split tuning runs use."""
    val = protocol(suite.spec)["validation"]
    if val["protocol"] == "holdout":
        return {"kind": "holdout", "share": val["share"], "seed": val["seed"]}
    return {"kind": "tasks", "start": 0, "stop": val["tasks"]}


def final_split(suite: Suite) -> dict[str, Any] | None:
    """The split final (test) runs use: none for holdout, the remaining tasks for first-tasks."""
    val = protocol(suite.spec)["validation"]
    return None if val["protocol"] == "holdout" else {"kind": "tasks", "start": val["tasks"], "stop": None}


def cells(suite: Suite, strategy: str, strategy_args: dict[str, Any], seeds: list[int],
          split: dict[str, Any] | None, extra: dict[str, Any] | None = None,
          streams: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Sweep cells (see clbench.experiments.sweep) for one strategy config on every stream config of the suite
    (or on ``streams``, a subset of them)."""
    args = {**suite.spec.get("training", {}), **strategy_args}
    out = []
    for stream in suite.streams() if streams is None else streams:
        for seed in seeds:
            cell = {**stream, "strategy": strategy, "strategy_args": args, "seed": int(seed), "suite": suite.tag}
            if "continual" in protocol(suite.spec):
                cell["continual"] = protocol(suite.spec)["continual"]
            if split is not None:
                cell["split"] = split
            cell.update(extra or {})
            out.append(cell)
    return out
