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
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

from clbench.errors import ClbenchError
from clbench.registry import LOADED_PLUGINS
from clbench.store import Store


def _axes(args: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Expand list-valued arguments into the grid of their combinations."""
    args = args or {}
    keys = sorted(args)
    values = [v if isinstance(v, list) else [v] for v in (args[k] for k in keys)]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """All cells of a sweep spec, in a stable order."""
    for key in ("stream", "strategy"):
        if not spec.get(key):
            raise ClbenchError(f"a sweep needs at least one [[{key}]] entry (or --{key} on the command line)")
    seeds = spec.get("seeds", [0])
    cells = []
    for stream, strategy in itertools.product(spec["stream"], spec["strategy"]):
        for s_args, t_args, seed in itertools.product(_axes(stream.get("args")), _axes(strategy.get("args")), seeds):
            cell = {"stream": stream["name"], "stream_args": s_args, "strategy": strategy["name"],
                    "strategy_args": t_args, "model": stream.get("model"), "model_args": stream.get("model_args", {}),
                    "seed": int(seed)}
            cells.append(cell)
    return cells


def cell_id(cell: dict[str, Any]) -> str:
    """Readable and stable: stream, strategy, seed and a hash of the whole canonical config."""
    digest = hashlib.sha1(json.dumps(cell, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cell['stream']}--{cell['strategy']}--s{cell['seed']}--{digest}"


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ClbenchError(f"sweep file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ClbenchError(f"sweep file {path} is not valid TOML: {e}") from None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_cell(cell: dict[str, Any], device: str, threads: int | None = None, commit: str | None = None,
             executor: str = "local", plugins: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one cell and return its record (the caller stores it). Runs in worker processes and Ray tasks too."""
    import torch

    import clbench
    from clbench.registry import arguments, load_plugin, lookup

    for plugin in plugins:  # a fresh worker knows only the built-in names
        load_plugin(plugin)
    if threads:
        torch.set_num_threads(threads)
    stream_args = dict(cell["stream_args"])
    if "seed" in arguments(lookup("stream", cell["stream"])):
        stream_args.setdefault("seed", cell["seed"])
    stream = clbench.make_stream(cell["stream"], **stream_args)
    if cell.get("split"):  # a suite's validation or task-range split (clbench.suite)
        from clbench.suite import split_stream

        stream = split_stream(stream, cell["split"])
    strategy = clbench.make_strategy(cell["strategy"], **cell["strategy_args"])
    result = clbench.run(stream, strategy, model_name=cell["model"], model_args=cell["model_args"], device=device,
                         seed=cell["seed"], progress=False, config={"cell": cell})
    record = result.to_dict()
    record.update(id=cell_id(cell), cell=cell, git_commit=commit,
                  worker={"executor": executor, "host": socket.gethostname(), "pid": os.getpid()})
    return record


Outcome = tuple[dict[str, Any], "dict[str, Any] | None", "BaseException | None"]  # cell, record, error


def _serial(todo: list[dict[str, Any]], device: str, commit: str | None) -> Iterator[Outcome]:
    for cell in todo:
        try:
            yield cell, run_cell(cell, device, commit=commit), None
        except Exception as e:  # one failed cell does not stop the sweep
            yield cell, None, e


def _processes(todo: list[dict[str, Any]], device: str, commit: str | None, jobs: int) -> Iterator[Outcome]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    plugins = tuple(LOADED_PLUGINS)
    with ProcessPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_cell, c, device, threads, commit, "local", plugins): c for c in todo}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], None if error else future.result(), error


def _ray(todo: list[dict[str, Any]], device: str, commit: str | None, address: str | None,
         cpus_per_run: float, gpus_per_run: float | None) -> Iterator[Outcome]:
    """Each cell is one Ray task; records come back to this process, which stores them as they finish."""
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
        remote = ray.remote(run_cell).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        threads = max(1, int(cpus_per_run))
        plugins = tuple(LOADED_PLUGINS)
        pending = {remote.remote(c, device, threads, commit, "ray", plugins): c for c in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                yield cell, ray.get(done[0]), None
            except ray.exceptions.RayTaskError as e:
                yield cell, None, e.cause if isinstance(e.cause, BaseException) else e
            except ray.exceptions.RayError as e:  # a worker or node died
                yield cell, None, e
    finally:
        ray.shutdown()


def run_sweep(cells: list[dict[str, Any]], store: Store, device: str = "cpu", jobs: int = 1,
              progress: bool = True, executor: str = "processes", address: str | None = None,
              cpus_per_run: float = 1.0, gpus_per_run: float | None = None) -> tuple[int, int]:
    """Run the cells missing from ``store`` and store each record as it finishes; returns (ran, skipped).

    ``executor``: ``"processes"`` (this machine; ``jobs`` processes, in this process when ``jobs`` is 1) or
    ``"ray"`` (one Ray task per cell on the cluster at ``address``, or on a local Ray instance without one,
    each asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs; the default is one GPU for CUDA runs).
    """
    from tqdm.auto import tqdm

    from clbench.registry import check_arguments, lookup

    if executor not in ("processes", "ray"):
        raise ClbenchError(f"unknown executor {executor!r}; use 'processes' (this machine) or 'ray'")
    if jobs < 1:
        raise ClbenchError(f"--jobs must be at least 1, got {jobs}")
    for cell in cells:  # fail fast on bad names and arguments, before any run
        check_arguments("stream", cell["stream"], lookup("stream", cell["stream"]), cell["stream_args"])
        check_arguments("strategy", cell["strategy"], lookup("strategy", cell["strategy"]), cell["strategy_args"])
    store.remove_partial()
    done = store.ids()
    todo = [c for c in cells if cell_id(c) not in done]
    skipped = len(cells) - len(todo)
    commit = git_commit()
    if not todo:
        return 0, skipped
    if executor == "ray":
        outcomes = _ray(todo, device, commit, address, cpus_per_run, gpus_per_run)
    elif jobs > 1:
        outcomes = _processes(todo, device, commit, jobs)
    else:
        outcomes = _serial(todo, device, commit)
    failures: list[str] = []
    with tqdm(total=len(todo), disable=None if progress else True, unit="run", desc="sweep") as bar:
        for cell, record, error in outcomes:
            if error is None:
                store.write(record["id"], record)
            else:
                failures.append(f"{cell_id(cell)}: {type(error).__name__}: {error}")
            bar.update(1)
    if failures:
        raise ClbenchError(f"{len(failures)} of {len(todo)} runs failed (the {len(todo) - len(failures)} others are "
                           f"stored; rerun to retry only the failed ones): " + " | ".join(failures[:5]))
    return len(todo), skipped


def inline_spec(streams: list[str], stream_args: dict[str, Any], strategies: list[str],
                strategy_args: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """A spec from command-line lists; a comma-separated value (a tuple) is a grid axis."""
    axis = lambda args: {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}  # noqa: E731
    return {"stream": [{"name": s, "args": axis(stream_args)} for s in streams],
            "strategy": [{"name": s, "args": axis(strategy_args)} for s in strategies], "seeds": seeds}


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `clbench sweep`")
