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
import subprocess
import sys
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError
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


def run_cell(cell: dict[str, Any], device: str, store_root: str, threads: int | None = None,
             commit: str | None = None) -> str:
    """Run one cell and write its record; returns its id. Runs in worker processes too."""
    import torch

    import clbench
    from clbench.registry import arguments, lookup

    if threads:
        torch.set_num_threads(threads)
    stream_args = dict(cell["stream_args"])
    if "seed" in arguments(lookup("stream", cell["stream"])):
        stream_args.setdefault("seed", cell["seed"])
    stream = clbench.make_stream(cell["stream"], **stream_args)
    strategy = clbench.make_strategy(cell["strategy"], **cell["strategy_args"])
    result = clbench.run(stream, strategy, model_name=cell["model"], model_args=cell["model_args"], device=device,
                         seed=cell["seed"], progress=False, config={"cell": cell})
    record = result.to_dict()
    record.update(id=cell_id(cell), cell=cell, git_commit=commit)
    Store(store_root).write(record["id"], record)
    return record["id"]


def run_sweep(cells: list[dict[str, Any]], store: Store, device: str = "cpu", jobs: int = 1,
              progress: bool = True) -> tuple[int, int]:
    """Run the cells missing from ``store``; returns (ran, skipped)."""
    from tqdm.auto import tqdm

    from clbench import make_strategy, make_stream  # noqa: F401  (fail fast on bad names before any run)
    from clbench.registry import check_arguments, lookup

    for cell in cells:
        check_arguments("stream", cell["stream"], lookup("stream", cell["stream"]), cell["stream_args"])
        check_arguments("strategy", cell["strategy"], lookup("strategy", cell["strategy"]), cell["strategy_args"])
    store.remove_partial()
    done = store.ids()
    todo = [c for c in cells if cell_id(c) not in done]
    skipped = len(cells) - len(todo)
    commit = git_commit()
    bar = tqdm(total=len(todo), disable=None if progress else True, unit="run", desc="sweep")
    failures: list[str] = []

    def finished(cell: dict[str, Any], error: BaseException | None) -> None:
        bar.update(1)
        if error is not None:
            failures.append(f"{cell_id(cell)}: {type(error).__name__}: {error}")

    if jobs <= 1:
        for cell in todo:
            try:
                run_cell(cell, device, str(store.root), commit=commit)
                finished(cell, None)
            except Exception as e:  # one failed cell does not stop the sweep
                finished(cell, e)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(run_cell, c, device, str(store.root), threads, commit): c for c in todo}
            for future in as_completed(futures):
                finished(futures[future], future.exception())
    bar.close()
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
