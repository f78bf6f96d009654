"""One sweep cell: its id, its stream (cached when synthetic), its run and its record; and the worker processes
every executor starts (which end with the sweep process, and stop at once on Ctrl-C)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

from clbench.core.progress import quiet


def cell_id(cell: dict[str, Any]) -> str:
    """Readable and stable: stream, strategy, seed and a hash of the whole canonical config."""
    digest = hashlib.sha1(json.dumps(cell, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cell['stream']}--{cell['strategy']}--s{cell['seed']}--{digest}"


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
    try:
        with quiet():  # the sweep's own bar reports progress
            stream = cell_stream(cell)
            strategy = clbench.make_strategy(cell["strategy"], **cell["strategy_args"])
            result = clbench.run(stream, strategy, model_name=cell["model"], model_args=cell["model_args"],
                                 device=device, seed=cell["seed"], progress=False, config={"cell": cell},
                                 final_only=cell.get("final_only", False), **cell.get("continual", {}))
    except SystemExit as e:  # a plugin's sys.exit() fails its cell; it does not end the sweep
        raise RuntimeError(f"the run called sys.exit({e.code!r}) (a plugin's strategy, stream or model); a "
                           "strategy should raise an exception instead") from None
    return cell_record(result, cell, commit, executor)


def exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the sweep process that started it dies (even by SIGKILL),
    and leave Ctrl-C to the sweep process (which stops the workers, see :func:`process_pool`).

    On Linux the kernel sends SIGKILL when the parent exits (prctl PR_SET_PDEATHSIG); everywhere, a daemon
    thread also checks once a second that the parent is still this process's parent, and exits if not.
    """
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole process group
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


@contextlib.contextmanager
def process_pool(jobs: int) -> Iterator[ProcessPoolExecutor]:
    """``jobs`` worker processes that end with this process; on Ctrl-C (or any exception, or a consumer
    that stops early) the queued work is cancelled and the workers are terminated at once, instead of
    working through the queue while the results are thrown away."""
    pool = ProcessPoolExecutor(jobs, initializer=exit_with_parent, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        workers = list((getattr(pool, "_processes", None) or {}).values())  # the executor offers no public kill
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(5)
        raise
    pool.shutdown(wait=True)
