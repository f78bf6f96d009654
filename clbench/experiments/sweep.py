"""Sweeps: a grid of runs (streams x stream args x strategies x strategy args x seeds), each a cell
with a stable id, written to a results store one record at a time and resumed on rerun.

A sweep file (TOML)::

    seeds = [0, 1, 2]
    device = "cpu"                       # optional

    [[stream]]
    name = "teacher-student"
    args = { rho_a = [0.0, 0.5, 1.0], rho_b = [0.0, 0.5, 1.0] }   # a list is a grid axis

    [[strategy]]
    name = "ewc-full"
    args = { strength = 1.0 }            # a scalar is fixed; write [[400, 400]] for a list value

    [[strategy]]
    name = "finetune"

    [continual]                          # optional: continual evaluation (clbench.core.continual)
    eval_every = 50                      # training steps between evaluations
    eval_samples = 1000                  # test samples a task

Keys are checked, so a file never runs another grid than the one written: an
unknown key (top level: seeds, device, stream, strategy; [[stream]]: name, args,
model, model_args; [[strategy]]: name, args) is an error suggesting the nearest
known one (also in [continual]: eval_every, eval_samples), and so are an entry without a name, an empty axis (``rho_a = []``)
and seeds that are not a non-empty list of integers.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sys
import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any, Iterator

import tomllib

from clbench.core.continual import continual_options
from clbench.core.errors import ClbenchError, Interrupted, cpu_limit, unknown_key, warn
from clbench.core.registry import LOADED_PLUGINS
from clbench.core.threads import default_threads
from clbench.experiments.batching import parse_batch, plan, run_cells, sweep_outcomes
from clbench.experiments.cells import (  # noqa: F401
    SYNTHETIC_CACHE_MB,
    cell_id,
    cell_record,
    cell_stream,
    cell_stream_args,
    cell_stream_key,
    exit_with_parent,
    git_commit,
    process_pool,
    run_cell,
)
from clbench.experiments.store import Store

TOP_KEYS = ("seeds", "device", "stream", "strategy", "continual")
ENTRY_KEYS = {"stream": ("name", "args", "model", "model_args"), "strategy": ("name", "args")}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_spec(spec: Any, source: str = "the sweep") -> dict[str, Any]:
    """Refuse a spec that would run another grid than the one written: unknown (misspelt) keys, entries
    without a name, empty axes, seeds that are not integers. Returns ``spec``."""
    if not isinstance(spec, dict):
        raise ClbenchError(f"{source}: a sweep is a table of seeds, device, [[stream]] and [[strategy]]")
    for key in spec:
        if key not in TOP_KEYS:
            raise unknown_key(key, TOP_KEYS, source)
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise ClbenchError(f"{source}: seeds must be a non-empty list of integers, e.g. seeds = [0, 1, 2]; "
                           f"got {seeds!r}")
    continual_options(spec.get("continual"), source)
    if "device" in spec and not isinstance(spec["device"], str):
        raise ClbenchError(f"{source}: device must be a string such as \"cpu\" or \"cuda\"; got {spec['device']!r}")
    for kind, known in ENTRY_KEYS.items():
        entries = spec.get(kind)
        if not entries:
            raise ClbenchError(f"{source}: a sweep needs at least one [[{kind}]] entry (or --{kind} on the command "
                               "line)")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ClbenchError(f"{source}: {kind} must be [[{kind}]] tables (name = ..., args = {{...}}); got "
                               f"{entries!r}")
        for k, entry in enumerate(entries, 1):
            where = f"{source}: [[{kind}]] entry {k}"
            for key in entry:
                if key not in known:
                    raise unknown_key(key, known, where)
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise ClbenchError(f"{where} has no name; add name = \"...\" (see `clbench list`)")
            where = f"{source}: [[{kind}]] {name!r}"
            for table in ("args", "model_args"):
                args = entry.get(table, {})
                if not isinstance(args, dict):
                    raise ClbenchError(f"{where}: {table} must be a table such as {{ rho_a = 0.5 }}; got {args!r}")
                for arg, value in args.items():
                    if isinstance(value, list) and not value:
                        raise ClbenchError(f"{where}: the axis {arg} = [] is empty, so the grid would have no cells; "
                                           f"give it values, or remove it to use the default")
            if "model" in entry and not isinstance(entry["model"], str):
                raise ClbenchError(f"{where}: model must be a model name (see `clbench list`); got {entry['model']!r}")
    return spec


def axes(args: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Expand list-valued arguments into the grid of their combinations."""
    args = args or {}
    keys = sorted(args)
    values = [v if isinstance(v, list) else [v] for v in (args[k] for k in keys)]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """All cells of a sweep spec, in a stable order."""
    check_spec(spec)
    seeds = spec.get("seeds", [0])
    continual = continual_options(spec.get("continual"))
    cells = []
    for stream, strategy in itertools.product(spec["stream"], spec["strategy"]):
        for s_args, t_args, seed in itertools.product(axes(stream.get("args")), axes(strategy.get("args")), seeds):
            cell = {"stream": stream["name"], "stream_args": s_args, "strategy": strategy["name"],
                    "strategy_args": t_args, "model": stream.get("model"), "model_args": stream.get("model_args", {}),
                    "seed": int(seed)}
            if continual:  # only then, so that the ids of other cells stay as they were
                cell["continual"] = continual
            cells.append(cell)
    return cells


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except FileNotFoundError:
        raise ClbenchError(f"sweep file {path} not found") from None
    except IsADirectoryError:
        raise ClbenchError(f"sweep file {path} is a folder; give a .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ClbenchError(f"sweep file {path} is not valid TOML: {e}") from None
    return check_spec(spec, f"sweep file {path}")


Outcome = tuple[dict[str, Any], "dict[str, Any] | None", "BaseException | None"]  # cell, record, error


def _serial(todo: list[dict[str, Any]], device: str, commit: str | None, threads: int | None) -> Iterator[Outcome]:
    for cell in todo:
        try:
            yield cell, run_cell(cell, device, threads, commit=commit), None
        except Exception as e:  # one failed cell does not stop the sweep
            yield cell, None, e


def in_processes(todo: list[dict[str, Any]], device: str, commit: str | None, jobs: int,
                 threads: int | None) -> Iterator[Outcome]:
    """Each cell run in one of ``jobs`` worker processes (see process_pool); outcomes as they finish."""
    threads = threads or default_threads(jobs)
    plugins = tuple(LOADED_PLUGINS)
    with process_pool(jobs) as pool:
        futures = {pool.submit(run_cell, c, device, threads, commit, "local", plugins): c for c in todo}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], None if error else future.result(), error


def on_ray(todo: list[dict[str, Any]], device: str, commit: str | None, address: str | None,
           cpus_per_run: float, gpus_per_run: float | None, threads: int | None,
           batch: str | int = "off") -> Iterator[Outcome]:
    """Each cell (``batch="off"``), or each batch of cells that train together (see
    clbench.experiments.batching.plan), is one Ray task; records come back to this process, which stores
    them as they finish."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": "warning", "log_to_driver": False}
    if address:
        host, _, port = address.split("://")[-1].rpartition(":")
        try:  # Ray retries an unreachable head for minutes; fail at once instead
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise ClbenchError(f"no Ray head answers at {address} ({e}); start one with `ray start --head` and "
                               "pass its HOST:PORT to --address") from None
        if host.strip("[]") in ("127.0.0.1", "localhost", "::1"):
            # Ray rewrites loopback addresses to this machine's interface address by default; a head started on
            # loopback (see tests/test_ray.py) is reachable only through loopback, so keep Ray there.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            options["_node_ip_address"] = "127.0.0.1"
    else:
        options["include_dashboard"] = False
    try:
        import ray
    except ImportError:
        raise ClbenchError("--executor ray needs Ray; install it with: pip install 'clbench[ray]'") from None
    if gpus_per_run is None:
        gpus_per_run = 1.0 if device.startswith("cuda") else 0.0
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray head at {address}" if address else "a local Ray instance"
        raise ClbenchError(f"could not connect to {where} ({e}); start one with `ray start --head` and pass "
                           "its HOST:PORT to --address") from None
    try:
        options = dict(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        threads = threads or max(1, int(cpus_per_run))
        plugins = tuple(LOADED_PLUGINS)
        if batch == "off":
            remote = ray.remote(run_cell).options(**options)
            pending = {remote.remote(c, device, threads, commit, "ray", plugins): c for c in todo}
        else:
            remote = ray.remote(run_cells).options(**options)
            pending = {remote.remote(cells, device, threads, commit, plugins, None, "ray"): cells
                       for cells in plan(todo, batch)}
        try:
            yield from _ray_outcomes(ray, pending)
        except BaseException:  # Ctrl-C: cancel what is queued or running, keep what was stored
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
    finally:
        ray.shutdown()


def _ray_outcomes(ray: Any, pending: dict) -> Iterator[Outcome]:
    """(cell, record, error) of each finished task; a task that ran a batch (a list of cells) returns its
    cells' outcomes, and its error is every one of its cells' error."""
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cells = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            error = e.cause if isinstance(e.cause, BaseException) else e
        except ray.exceptions.RayError as e:  # a worker or node died
            error = e
        else:
            yield from (out if isinstance(cells, list) else [(cells, out, None)])
            continue
        yield from ((cell, None, error) for cell in (cells if isinstance(cells, list) else [cells]))


def run_sweep(cells: list[dict[str, Any]], store: Store, device: str = "cpu", jobs: int = 1,
              progress: bool = True, executor: str = "processes", address: str | None = None,
              cpus_per_run: float = 1.0, gpus_per_run: float | None = None,
              threads: int | None = None, batch: str | int = "auto") -> tuple[int, int]:
    """Run the cells missing from ``store`` and store each record as it finishes; returns (ran, skipped).

    ``executor``: ``"processes"`` (this machine; ``jobs`` processes, in this process when ``jobs`` is 1) or
    ``"ray"`` (one Ray task per batch, or per cell with ``batch="off"``, on the cluster at ``address``, or on a
    local Ray instance without one,
    each asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs; the default is one GPU for CUDA runs).
    ``threads``: torch threads per run (default: this process's for one job, cores / jobs for several,
    ``cpus_per_run`` on Ray). Same seed and same thread count give the same R bit for bit on CPU.
    ``batch``: ``"auto"`` trains compatible cells together as one batched model
    (clbench.experiments.batching), ``N`` at most N a batch, ``"off"`` one run per cell; the records are the
    same up to float rounding.

    Ctrl-C stops the sweep within seconds (queued runs cancelled, workers terminated) and raises
    clbench.core.errors.Interrupted saying how many records were stored and what was lost: the runs in
    flight only (a batch stores its members' records when it ends; large groups run in several batches).
    A record that cannot be written to the store (a full disk) is written to a rescue folder instead
    and the sweep goes on; the ClbenchError at the end names that folder.
    """
    from clbench.core.registry import check_arguments, lookup

    if executor not in ("processes", "ray"):
        raise ClbenchError(f"unknown executor {executor!r}; use 'processes' (this machine) or 'ray'")
    if jobs < 1:
        raise ClbenchError(f"--jobs must be at least 1, got {jobs}")
    if threads is not None:
        threads = cpu_limit("--threads", threads, "threads")
    batch = parse_batch(batch)
    for cell in cells:  # fail fast on bad names and arguments, before any run
        check_arguments("stream", cell["stream"], lookup("stream", cell["stream"]), cell["stream_args"])
        check_arguments("strategy", cell["strategy"], lookup("strategy", cell["strategy"]), cell["strategy_args"])
    store.remove_partial()
    done, corrupt = store.scan()
    ids = {cell_id(c) for c in cells}
    for path, problem in corrupt.items():
        if Path(path).stem in ids:
            warn(f"corrupt record {path} ({problem}); running its cell again")
    todo = [c for c in cells if cell_id(c) not in done]
    skipped = len(cells) - len(todo)
    if not todo:
        return 0, skipped
    if executor == "processes" and jobs > 1:
        jobs = cpu_limit("--jobs", jobs, "processes")
        if jobs > len(todo):
            warn(f"--jobs {jobs} is more than the {len(todo)} runs to do; using {len(todo)} processes")
            jobs = len(todo)
    failures = _store_outcomes(todo, store, device, jobs, progress, executor, address, cpus_per_run,
                               gpus_per_run, threads, batch)
    if failures:
        raise ClbenchError(f"{len(failures)} of {len(todo)} runs failed (the {len(todo) - len(failures)} others are "
                           f"stored; rerun to retry only the failed ones): " + " | ".join(failures[:5]))
    return len(todo), skipped


def _one_after_another(*parts) -> Iterator[Outcome]:
    """The outcomes of each part in turn, each part started when the one before it ends (a generator, so that
    closing it on Ctrl-C closes the part in flight and its workers)."""
    for part in parts:
        yield from part()


def _store_outcomes(todo: list[dict[str, Any]], store: Store, device: str, jobs: int, progress: bool,
                    executor: str, address: str | None, cpus_per_run: float, gpus_per_run: float | None,
                    threads: int | None, batch: str | int) -> list[str]:
    """Run ``todo`` and store each record as it comes; returns the failures. See run_sweep."""
    from tqdm.auto import tqdm

    commit = git_commit()
    if executor == "ray":
        outcomes, in_flight = on_ray(todo, device, commit, address, cpus_per_run, gpus_per_run, threads, batch), None
    else:
        lockstep = [c for c in todo if batch != "off"]
        single = [c for c in todo if batch == "off"]
        outcomes = _one_after_another(
            lambda: sweep_outcomes(lockstep, device, commit, jobs, batch, threads) if lockstep else iter(()),
            lambda: (in_processes(single, device, commit, jobs, threads) if jobs > 1
                     else _serial(single, device, commit, threads)) if single else iter(()))
        in_flight = max(jobs * max((len(b) for b in plan(lockstep, batch, jobs)), default=1) if lockstep else 0,
                        jobs if single else 0)
    failures: list[str] = []
    stored, rescue, rescued, lost = 0, None, [], []
    last = time.monotonic()
    try:
        with tqdm(total=len(todo), disable=None if progress else True, unit="run", desc="sweep") as bar:
            for cell, record, error in outcomes:
                if error is not None:
                    failures.append(f"{cell_id(cell)}: {type(error).__name__}: {error}")
                else:
                    try:
                        store.write(record["id"], record)
                        stored += 1
                    except OSError as e:  # a full disk: keep the record elsewhere, go on
                        rescue = rescue or _rescue_store(store, e)
                        try:
                            rescue[0].write(record["id"], record)
                            rescued.append(record["id"])
                        except (OSError, ClbenchError):
                            lost.append(record["id"])
                            break  # nowhere to write: stop computing what would be lost
                    last = time.monotonic()
                bar.update(1)
    except KeyboardInterrupt:
        done = stored + len(rescued) + len(failures)
        flight = (f"the runs in flight (at most {min(in_flight, len(todo) - done)}, {time.monotonic() - last:.0f} s "
                  "of work since the last record) were lost" if in_flight else "the runs in flight were lost")
        raise Interrupted(f"stored {stored} of the {len(todo)} runs to do in {store.root}"
                          + (f" (and {len(rescued)} in {rescue[0].root})" if rescued else "")
                          + f"; {flight}, {max(len(todo) - done - in_flight, 0) if in_flight else 'the rest'} "
                          "not started; rerun the same command to run only the missing ones") from None
    finally:
        outcomes.close()  # stops the workers when the loop ended early
    if rescued or lost:
        moved = (f"{len(rescued)} finished records were written to {rescue[0].root} instead: move them into the "
                 f"store once there is space (mv {rescue[0].root}/*.json {store.root}/)" if rescued else "")
        gone = (f"{len(lost)} could not be written anywhere and the sweep stopped" if lost else "")
        raise ClbenchError(f"could not write records into the store {store.root} ({rescue[1]}); "
                           + "; ".join(x for x in (moved, gone) if x)
                           + f"; {stored} were stored; rerun the sweep to run only what is missing")
    return failures


def _rescue_store(store: Store, error: OSError) -> tuple[Store, str]:
    """A fresh folder in the system's temporary folder for the records the store cannot take, and why."""
    import tempfile

    why = error.strerror or str(error)
    try:
        root = tempfile.mkdtemp(prefix=f"clbench-rescue-{store.root.name}-")
        return Store(root), why
    except (OSError, ClbenchError) as e:
        raise ClbenchError(f"could not write a record into the store {store.root} ({why}) nor make a rescue folder "
                           f"in {tempfile.gettempdir()} ({e}); free some space and rerun the sweep") from None


def inline_spec(streams: list[str], stream_args: dict[str, Any], strategies: list[str],
                strategy_args: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """A spec from command-line lists; a comma-separated value (a tuple) is a grid axis."""
    axis = lambda args: {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}  # noqa: E731
    return {"stream": [{"name": s, "args": axis(stream_args)} for s in streams],
            "strategy": [{"name": s, "args": axis(strategy_args)} for s in strategies], "seeds": seeds}


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `clbench sweep`")
