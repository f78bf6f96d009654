"""How much slower clbench and Avalanche get when other processes keep every core busy.

Runs the same permuted Fashion-MNIST protocol as ``bench_vs_avalanche.py`` (MLP 784-400-400-10, SGD lr 0.05,
batch 128, one epoch a task) for clbench and for Avalanche 0.6, each in a fresh process, first on a quiet
machine and then while this script keeps one busy-loop process per core running. clbench is also run with
``OMP_WAIT_POLICY=ACTIVE`` (waiters that spin until released), with ``OMP_WAIT_POLICY=PASSIVE`` (waiters that
sleep at once) and with libgomp's own default (a long spin; clbench sets a short one, ``GOMP_SPINCOUNT``) to
show what its setting buys, and through the ``clbench run`` command, which chooses its thread count from the
machine's load (clbench.core.threads), as well as through the Python API, which keeps torch's. Prints each
wall time and each slowdown (busy / quiet).

    python perf/bench_busy_machine.py [--tasks 2] [--skip-avalanche]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def spin() -> None:
    while True:
        pass


def timed(side: str, tasks: int, env: dict[str, str]) -> float:
    """Wall time of one run of ``side`` in a fresh interpreter (so OMP_WAIT_POLICY takes effect), imports
    excluded. ``command`` is ``clbench run`` through the CLI, which picks its thread count from the load;
    ``clbench`` is the Python API with torch's default thread count."""
    if side == "command":
        argv = ["run", "--stream", "permuted-fashion-mnist", "--stream-arg", f"tasks={tasks}", "--stream-arg",
                "seed=0", "--strategy", "finetune", "--strategy-arg", "lr=0.05", "--strategy-arg", "epochs=1",
                "--strategy-arg", "batch_size=128", "--device", "cpu", "--quiet"]
        code = ("import json, time; from clbench.cli.commands import main; t = time.perf_counter(); "
                f"assert main({argv!r}) == 0; print(json.dumps([time.perf_counter() - t]))")
    else:
        first = "import clbench; " if side == "clbench" else ""  # before torch: clbench's OpenMP setting applies
        code = (f"{first}import sys, json, warnings; warnings.filterwarnings('ignore'); "
                f"sys.path.insert(0, {str(HERE)!r}); import bench_vs_avalanche as b; "
                f"t, acc = b.{side}_run({tasks}, 1, 'cpu'); print(json.dumps([t, acc]))")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CLBENCH_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", code], env={**environ, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--skip-avalanche", action="store_true", help="time clbench only (Avalanche is slow)")
    args = parser.parse_args()
    import torch

    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"permuted Fashion-MNIST {args.tasks} tasks x 1 epoch, background load: {cores} busy-loop processes")
    runs = {"clbench run (threads from the load)": ("command", {}),
            "clbench API (torch's threads)": ("clbench", {}),
            "clbench API, OMP_WAIT_POLICY=ACTIVE": ("clbench", {"OMP_WAIT_POLICY": "ACTIVE"}),
            "clbench API, OMP_WAIT_POLICY=PASSIVE": ("clbench", {"OMP_WAIT_POLICY": "PASSIVE"}),
            "clbench API, libgomp's default spin": ("clbench", {"GOMP_SPINCOUNT": "300000"}),
            "clbench API, 1 thread": ("clbench", {"OMP_NUM_THREADS": "1"})}
    if not args.skip_avalanche:
        runs["avalanche"] = ("avalanche", {})
    print(f"quiet machine: load average {os.getloadavg()[0]:.1f}")
    quiet = {label: timed(side, args.tasks, env) for label, (side, env) in runs.items()}
    load = [multiprocessing.Process(target=spin, daemon=True) for _ in range(cores)]
    for p in load:
        p.start()
    try:
        # the load average is a 1-minute moving average: let it see the load before clbench run reads it
        waited = 0
        while os.getloadavg()[0] < cores - 0.5 and waited < 180:
            time.sleep(5)
            waited += 5
        print(f"background load running; load average {os.getloadavg()[0]:.1f} after {waited} s")
        busy = {label: timed(side, args.tasks, env) for label, (side, env) in runs.items()}
    finally:
        for p in load:
            p.terminate()
    for label in runs:
        print(f"{label:38s} quiet {quiet[label]:7.1f} s   busy {busy[label]:7.1f} s   "
              f"slowdown {busy[label] / quiet[label]:5.1f}x")


if __name__ == "__main__":
    main()
