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

import difflib
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tomllib
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

from clbench.core.errors import ClbenchError, warn
from clbench.core.progress import quiet
from clbench.core.registry import LOADED_PLUGINS
from clbench.experiments.store import Store


TOP_KEYS = ("seeds", "device", "stream", "strategy", "continual")
CONTINUAL_KEYS = ("eval_every", "eval_samples")
ENTRY_KEYS = {"stream": ("name", "args", "model", "model_args"), "strategy": ("name", "args")}


def _unknown_key(key: str, known: tuple[str, ...], where: str) -> ClbenchError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ClbenchError(f"{where}: unknown key {key!r}{hint} (known keys: {', '.join(known)})")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_spec(spec: Any, source: str = "the sweep") -> dict[str, Any]:
    """Refuse a spec that would run another grid than the one written: unknown (misspelt) keys, entries
    without a name, empty axes, seeds that are not integers. Returns ``spec``."""
    if not isinstance(spec, dict):
        raise ClbenchError(f"{source}: a sweep is a table of seeds, device, [[stream]] and [[strategy]]")
    for key in spec:
        if key not in TOP_KEYS:
            raise _unknown_key(key, TOP_KEYS, source)
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
                    raise _unknown_key(key, known, where)
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


def continual_options(table: Any, source: str = "the sweep") -> dict[str, int]:
    """A ``[continual]`` table checked: ``{eval_every, eval_samples}`` for ``clbench.run``, or {} when off."""
    from clbench.core.continual import check_options

    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ClbenchError(f"{source}: [continual] must be a table such as {{ eval_every = 50 }}; got {table!r}")
    for key in table:
        if key not in CONTINUAL_KEYS:
            raise _unknown_key(key, CONTINUAL_KEYS, f"{source}: [continual]")
    if "eval_every" not in table:
        raise ClbenchError(f"{source}: [continual] needs eval_every = K (training steps between evaluations)")
    try:
        every, samples = check_options(table["eval_every"], table.get("eval_samples"))
    except ClbenchError as e:
        raise ClbenchError(f"{source}: [continual] {e}") from None
    return {"eval_every": every, "eval_samples": samples} if every else {}


def _axes(args: dict[str, Any] | None) -> list[dict[str, Any]]:
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
        for s_args, t_args, seed in itertools.product(_axes(stream.get("args")), _axes(strategy.get("args")), seeds):
            cell = {"stream": stream["name"], "stream_args": s_args, "strategy": strategy["name"],
                    "strategy_args": t_args, "model": stream.get("model"), "model_args": stream.get("model_args", {}),
                    "seed": int(seed)}
            if continual:  # only then, so that the ids of other cells stay as they were
                cell["continual"] = continual
            cells.append(cell)
    return cells


def cell_id(cell: dict[str, Any]) -> str:
    """Readable and stable: stream, strategy, seed and a hash of the whole canonical config."""
    digest = hashlib.sha1(json.dumps(cell, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cell['stream']}--{cell['strategy']}--s{cell['seed']}--{digest}"


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


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cell_stream_args(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell's stream arguments, seeded by the cell's seed unless they give one."""
    from clbench.core.registry import arguments, lookup

    stream_args = dict(cell["stream_args"])
    if "seed" in arguments(lookup("stream", cell["stream"])):
        stream_args.setdefault("seed", cell["seed"])
    return stream_args


def cell_stream_key(cell: dict[str, Any]) -> str:
    """Equal for cells that run on the same stream (name, arguments with the seed, split)."""
    return json.dumps([cell["stream"], cell_stream_args(cell), cell.get("split")], sort_keys=True, default=str)


_SYNTHETIC: "OrderedDict[str, Any]" = OrderedDict()  # key -> stream, least recently used first
SYNTHETIC_CACHE_MB = 256


def cell_stream(cell: dict[str, Any]):
    """The stream a cell runs on: built from its arguments, then a suite's validation or task-range split.

    Synthetic streams (no data files: a pure function of their arguments) are kept per process, up to
    SYNTHETIC_CACHE_MB, so that the cells of a sweep that share one (every strategy at a grid point and
    seed) build it once per worker; streams read from files are built each time."""
    import clbench

    key = cell_stream_key(cell)
    if key in _SYNTHETIC:
        _SYNTHETIC.move_to_end(key)
        return _SYNTHETIC[key]
    stream = clbench.make_stream(cell["stream"], **cell_stream_args(cell))
    if cell.get("split"):  # clbench.experiments.suite
        from clbench.experiments.suite import split_stream

        stream = split_stream(stream, cell["split"])
    if stream.provenance.get("dataset") == "synthetic":
        _SYNTHETIC[key] = stream
        while sum(_stream_bytes(s) for s in _SYNTHETIC.values()) > SYNTHETIC_CACHE_MB * 2**20:
            _SYNTHETIC.popitem(last=False)
    return stream


def _stream_bytes(stream: Any) -> int:
    return sum(x.numel() * x.element_size() for t in stream.tasks for x in (t.train_x, t.train_y, t.test_x, t.test_y))


def cell_record(result: Any, cell: dict[str, Any], commit: str | None, executor: str) -> dict[str, Any]:
    """What the store keeps of a cell's result: the result, its id and cell, the commit and the worker."""
    record = {f.name: getattr(result, f.name) for f in fields(result)}  # as to_dict, without its deep copy
    record.update(id=cell_id(cell), cell=cell, git_commit=commit,
                  worker={"executor": executor, "host": socket.gethostname(), "pid": os.getpid()})
    return record


def run_cell(cell: dict[str, Any], device: str, threads: int | None = None, commit: str | None = None,
             executor: str = "local", plugins: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one cell and return its record (the caller stores it). Runs in worker processes and Ray tasks too."""
    import torch

    import clbench
    from clbench.core.registry import load_plugin

    for plugin in plugins:  # a fresh worker knows only the built-in names
        load_plugin(plugin)
    if threads:
        torch.set_num_threads(threads)
    with quiet():  # the sweep's own bar reports progress
        stream = cell_stream(cell)
        strategy = clbench.make_strategy(cell["strategy"], **cell["strategy_args"])
        result = clbench.run(stream, strategy, model_name=cell["model"], model_args=cell["model_args"],
                             device=device, seed=cell["seed"], progress=False, config={"cell": cell},
                             **cell.get("continual", {}))
    return cell_record(result, cell, commit, executor)


Outcome = tuple[dict[str, Any], "dict[str, Any] | None", "BaseException | None"]  # cell, record, error


def _serial(todo: list[dict[str, Any]], device: str, commit: str | None, threads: int | None) -> Iterator[Outcome]:
    for cell in todo:
        try:
            yield cell, run_cell(cell, device, threads, commit=commit), None
        except Exception as e:  # one failed cell does not stop the sweep
            yield cell, None, e


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the sweep process that started it dies (even by SIGKILL).

    On Linux the kernel sends SIGKILL when the parent exits (prctl PR_SET_PDEATHSIG); everywhere, a daemon
    thread also checks once a second that the parent is still this process's parent, and exits if not.
    """
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    first = os.getppid()  # the sweep process (fork, spawn) or a fork server that it started

    def orphaned() -> bool:
        if os.getppid() != first:
            return True
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False

    if orphaned():  # the parent died before the lines above
        os._exit(1)

    def watch() -> None:
        while not orphaned():
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="clbench-parent-watch", daemon=True).start()


def _processes(todo: list[dict[str, Any]], device: str, commit: str | None, jobs: int,
               threads: int | None) -> Iterator[Outcome]:
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    plugins = tuple(LOADED_PLUGINS)
    with ProcessPoolExecutor(jobs, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_cell, c, device, threads, commit, "local", plugins): c for c in todo}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], None if error else future.result(), error


def _ray(todo: list[dict[str, Any]], device: str, commit: str | None, address: str | None,
         cpus_per_run: float, gpus_per_run: float | None, threads: int | None) -> Iterator[Outcome]:
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
        threads = threads or max(1, int(cpus_per_run))
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
              cpus_per_run: float = 1.0, gpus_per_run: float | None = None,
              threads: int | None = None, batch: str | int = "auto") -> tuple[int, int]:
    """Run the cells missing from ``store`` and store each record as it finishes; returns (ran, skipped).

    ``executor``: ``"processes"`` (this machine; ``jobs`` processes, in this process when ``jobs`` is 1) or
    ``"ray"`` (one Ray task per cell on the cluster at ``address``, or on a local Ray instance without one,
    each asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs; the default is one GPU for CUDA runs).
    ``threads``: torch threads per run (default: this process's for one job, cores / jobs for several,
    ``cpus_per_run`` on Ray). Same seed and same thread count give the same R bit for bit on CPU.
    ``batch`` (processes only): ``"auto"`` trains compatible cells together as one batched model
    (clbench.batched.run), ``N`` at most N a batch, ``"off"`` one run per cell; the records are the same.
    """
    from tqdm.auto import tqdm

    from clbench.batched.run import parse_batch, sweep_outcomes
    from clbench.core.registry import check_arguments, lookup

    if executor not in ("processes", "ray"):
        raise ClbenchError(f"unknown executor {executor!r}; use 'processes' (this machine) or 'ray'")
    if jobs < 1:
        raise ClbenchError(f"--jobs must be at least 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ClbenchError(f"--threads must be at least 1, got {threads}")
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
    commit = git_commit()
    if not todo:
        return 0, skipped
    if executor == "ray":
        outcomes = _ray(todo, device, commit, address, cpus_per_run, gpus_per_run, threads)
    else:
        # the batched runner records no continual-evaluation curves: such cells run one by one
        lockstep = [c for c in todo if batch != "off" and not c.get("continual")]
        single = [c for c in todo if batch == "off" or c.get("continual")]
        outcomes = itertools.chain(
            sweep_outcomes(lockstep, device, commit, jobs, batch, threads) if lockstep else (),
            (_processes(single, device, commit, jobs, threads) if jobs > 1 else _serial(single, device, commit, threads))
            if single else ())
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
