"""Sweep cells run in batches: which cells can share one batched run (:func:`plan`), and running them."""
from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterator

import torch

from clbench.batched import Member, batchable, has_batched_form, run_batched
from clbench.batched.group import DEFAULT_MEMORY_MB
from clbench.core.errors import ClbenchError, env_number
from clbench.core.threads import default_threads
from clbench.core.types import Stream
from clbench.experiments.cells import cell_record, cell_stream, cell_stream_key, process_pool, run_cell

TRAINING_KEYS = ("epochs", "batch_size", "optimizer")  # lockstep: equal in a batch (the learning rate may differ)


def _word_or_count(value: str | int, words: tuple[str, ...], error: str) -> str | int:
    """``value`` if it is one of ``words``, else a positive integer, else ClbenchError(``error``)."""
    if value in words:
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ClbenchError(f"{error}, got {value!r}")
    return n


def parse_batch(value: str | int) -> str | int:
    """``auto``, ``off`` or a positive integer (the most members one batch holds)."""
    return _word_or_count(value, ("auto", "off"), "--batch takes auto, off or a positive integer (members per batch)")


def _group_key(cell: dict[str, Any]) -> str:
    """Cells that may share a batch: equal but for the seed and numeric stream/strategy arguments, the
    learning rate included (epochs, batch size and optimizer must match). run_batched splits further by
    shapes and settings."""
    wild = lambda args, keep=(): {k: ("#" if isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
                                       and k not in keep else v) for k, v in args.items()}
    key = {k: v for k, v in cell.items() if k != "seed"}
    key["stream_args"] = wild(cell["stream_args"], ("seed",))
    key["strategy_args"] = wild(cell["strategy_args"], TRAINING_KEYS)
    return json.dumps(key, sort_keys=True, default=str)


AUTO_CHUNKS, AUTO_MIN_BATCH = 4, 16  # auto: a large group runs in >= 4 batches of >= 16 members


def plan(cells: list[dict[str, Any]], batch: str | int, jobs: int = 1) -> list[list[dict[str, Any]]]:
    """Cells in batches: compatible cells together, ``batch`` at most (auto: enough batches to keep ``jobs``
    workers busy, and a group of more than AUTO_MIN_BATCH cells in at least AUTO_CHUNKS batches of at least
    AUTO_MIN_BATCH, so that an interrupted sweep, which stores each batch's records when it ends, loses at
    most the batches in flight). Memory limits are applied when a batch runs (see run_batched)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(_group_key(cell), []).append(cell)
    out = []
    for group in groups.values():
        n = len(group)
        size = batch if isinstance(batch, int) else max(1, min(math.ceil(n / max(jobs, 1)),
                                                               max(math.ceil(n / AUTO_CHUNKS), AUTO_MIN_BATCH)))
        out += [group[k:k + size] for k in range(0, len(group), size)]
    return out


def run_cells(cells: list[dict[str, Any]], device: str, threads: int | None = None, commit: str | None = None,
              plugins: tuple[str, ...] = (), memory_mb: float | None = None, executor: str = "local") -> list[tuple]:
    """Run sweep cells, batching what can be; returns (cell, record, error) per cell, records as run_cell's."""
    return list(iter_cells(cells, device, threads, commit, plugins, memory_mb, executor))


def iter_cells(cells: list[dict[str, Any]], device: str, threads: int | None = None, commit: str | None = None,
               plugins: tuple[str, ...] = (), memory_mb: float | None = None, executor: str = "local"
               ) -> Iterator[tuple]:
    """run_cells, yielding each (cell, record, error) as soon as it is known, so that a sweep stores every
    finished run before the next one starts (a killed sweep loses only the runs in flight)."""
    import clbench
    from clbench.core.registry import load_plugin

    for plugin in plugins:
        load_plugin(plugin)
    if threads:
        torch.set_num_threads(threads)
    streams: dict[str, Stream] = {}
    members, single = [], []
    for cell in cells:
        try:
            key = cell_stream_key(cell)
            if key not in streams:  # cells on the same stream share its data
                streams[key] = cell_stream(cell)
            strategy = clbench.make_strategy(cell["strategy"], **cell["strategy_args"])
        except Exception as e:  # noqa: BLE001  (reported per cell, as run_cell's errors are)
            yield cell, None, e
            continue
        if batchable(streams[key], strategy) is None:
            members.append((cell, Member(streams[key], strategy, cell["seed"], {"cell": cell})))
        else:
            single.append(cell)
    by_model: dict[str, list] = {}  # cells of one model and one evaluation schedule
    for cell, member in members:
        key = json.dumps([cell["model"], cell["model_args"], cell.get("continual"), cell.get("final_only", False)],
                         default=str)
        by_model.setdefault(key, []).append((cell, member))
    for group in by_model.values():
        cell0 = group[0][0]
        try:
            results = run_batched([m for _, m in group], model_name=cell0["model"], model_args=cell0["model_args"],
                                  device=device, memory_mb=memory_mb, final_only=cell0.get("final_only", False),
                                  **cell0.get("continual", {}))
        except (Exception, SystemExit) as e:  # noqa: BLE001  (a batch that cannot run falls back to one run per cell)
            print(f"clbench: {len(group)} {cell0['strategy']} run(s) could not train as one batched model "
                  f"({type(e).__name__}: {str(e)[:300]}); running them one at a time", file=sys.stderr)
            single += [c for c, _ in group]
            continue
        for (cell, _), result in zip(group, results):
            if isinstance(result, Exception):
                yield cell, None, result
                continue
            yield cell, cell_record(result, cell, commit, executor), None
    for cell in single:
        try:
            record = run_cell(cell, device, commit=commit, executor=executor)
        except Exception as e:  # noqa: BLE001
            yield cell, None, e
            continue
        yield cell, record, None


def sweep_outcomes(todo: list[dict[str, Any]], device: str, commit: str | None, jobs: int, batch: str | int,
                   threads: int | None = None) -> Iterator[tuple]:
    """What run_sweep stores: (cell, record, error) per cell, batches run in ``jobs`` processes (which exit
    when the sweep process dies)."""
    from concurrent.futures import as_completed

    from clbench.core.registry import LOADED_PLUGINS

    batches = plan(todo, batch, jobs)
    budget = env_number("CLBENCH_BATCH_MEMORY_MB", DEFAULT_MEMORY_MB) / jobs
    if jobs == 1:
        for cells in batches:
            yield from iter_cells(cells, device, threads, commit=commit, memory_mb=budget)
        return
    threads = threads or default_threads(jobs)
    with process_pool(jobs) as pool:  # Ctrl-C cancels the queue and stops the workers at once
        futures = {pool.submit(run_cells, cells, device, threads, commit, tuple(LOADED_PLUGINS), budget): cells
                   for cells in batches}
        for future in as_completed(futures):
            error = future.exception()
            if error is None:
                yield from future.result()
            else:
                yield from ((cell, None, error) for cell in futures[future])


def _worker_can_import(obj: Any) -> bool:
    """Whether a fresh worker process knows ``obj``: built in, or registered by a loaded plugin (which the
    workers load again), not by code that only this process ran."""
    from clbench.core.registry import LOADED_PLUGINS

    module = getattr(obj, "__module__", "") or ""
    return module.split(".")[0] in ("clbench", "strategies", "streams") or module.startswith("clbench_plugin_") or \
        any(module == p or module.startswith(p + ".") for p in LOADED_PLUGINS)


def resolve_jobs(jobs: int | str, strategy: str, batch: str | int = "auto", executor: str = "processes",
                 device: str = "cpu", say: bool = False) -> int:
    """``jobs="auto"``: on the CPU, one worker process of one thread per core to use
    (clbench.core.threads.default_threads), whether the strategy's runs are batched or not: the small models
    of these suites gain more from a process per core than from more threads, batched or not
    (docs/performance.md); a batched strategy's trials or seeds are then shared out among the workers, one
    batched model each. Elsewhere (a GPU, Ray, a strategy the workers cannot import) 1. A number is taken as
    it is. ``say``: one stderr line when auto chose several processes."""
    from clbench.core.registry import lookup

    if jobs != "auto":
        return _word_or_count(jobs, (), "--jobs takes auto or a whole number of worker processes (at least 1)")
    cls = lookup("strategy", strategy)
    if executor != "processes" or not str(device).startswith("cpu") or not _worker_can_import(cls):
        return 1
    n = default_threads(1)
    if say and n > 1:
        how = ("batched models" if batch != "off" and has_batched_form(cls)
               else f"runs ({'--batch off' if batch == 'off' else 'no batched form'})")
        print(f"clbench: {strategy}: its {how} go {n} at a time, one worker process and thread each "
              "(--jobs 1 for one process)", file=sys.stderr)
    return n
