"""Time per cell against Avalanche 0.6 and Mammoth, side by side, on Mammoth's P-MNIST protocol.

The protocol (Buzzega et al. 2020) on Fashion-MNIST: permuted tasks of all 60000 training images, MLP
784-100-100-10, SGD lr 0.1, batch 128, one epoch a task, finetune (Avalanche's ``Naive``, Mammoth's
``sgd``), evaluation of every task after each task. Every side runs with ``--threads`` torch threads
(Mammoth's runs in its own checkout and virtual environment, ``--mammoth DIR --mammoth-python PY``, never
imported; its MNIST loader is given the Fashion-MNIST files). Four timings:

- clbench, one run: ``clbench.run`` in this process, stream building included;
- clbench, one cell of a batched sweep: ``--cells`` runs that differ in seed trained as one batched model
  (what ``clbench sweep`` and ``clbench tune`` do by default), the total divided by the cells;
- Avalanche: its own ``PermutedMNIST`` generator and ``Naive`` strategy, one run, in this process;
- Mammoth: ``main.py --dataset perm-mnist --model sgd`` in a fresh process, end to end (its start-up too).

Prints each time, each final ACC, and the ratios.

    python perf/bench_vs_peers.py [--tasks 3] [--cells 8] [--threads 1] [--mammoth DIR --mammoth-python PY]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agree_with_peers import mammoth_acc, write_mammoth_data
from bench_vs_avalanche import avalanche_run

from clbench import make_strategy, make_stream, run
from clbench.batched import Member, run_batched

WIDTHS, LR, BATCH = (100, 100), 0.1, 128


def finetune():
    return make_strategy("finetune", epochs=1, lr=LR, batch_size=BATCH, optimizer="sgd")


def clbench_single(tasks: int) -> tuple[float, float]:
    start = time.perf_counter()
    stream = make_stream("permuted-fashion-mnist", tasks=tasks, seed=0)
    result = run(stream, finetune(), model_name="mlp", model_args={"widths": list(WIDTHS)}, device="cpu", seed=0,
                 progress=False)
    return time.perf_counter() - start, result.metrics["acc"]


def clbench_batched(tasks: int, cells: int) -> tuple[float, float]:
    start = time.perf_counter()
    stream = make_stream("permuted-fashion-mnist", tasks=tasks, seed=0)
    results = run_batched([Member(stream, finetune(), seed) for seed in range(cells)], model_name="mlp",
                          model_args={"widths": list(WIDTHS)}, device="cpu")
    elapsed = time.perf_counter() - start
    return elapsed / cells, sum(r.metrics["acc"] for r in results) / cells


def mammoth_run(mammoth: Path, python: str, tasks: int, threads: int) -> tuple[float, float]:
    start = time.perf_counter()
    acc = mammoth_acc(mammoth, python, "perm-mnist", "sgd", [], 0, tasks, lr=LR, batch_size=BATCH,
                      threads=threads)
    return time.perf_counter() - start, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--cells", type=int, default=8, help="runs in the batched sweep (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on every side (default 1)")
    parser.add_argument("--mammoth", default=None, metavar="DIR", help="a Mammoth checkout")
    parser.add_argument("--mammoth-python", default=None, metavar="PY", help="the Python of Mammoth's venv")
    parser.add_argument("--skip-avalanche", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"Measured on: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"{args.threads} thread(s), torch {torch.__version__}, commit {commit}. Permuted Fashion-MNIST, "
          f"{args.tasks} tasks x 60000 images, MLP 784-100-100-10, SGD lr {LR}, batch {BATCH}, 1 epoch, finetune.\n")
    rows = {"clbench, one run": clbench_single(args.tasks)}
    rows[f"clbench, one cell of {args.cells} batched"] = clbench_batched(args.tasks, args.cells)
    if not args.skip_avalanche:
        rows["Avalanche 0.6 (Naive)"] = avalanche_run(args.tasks, 1, "cpu", widths=WIDTHS, lr=LR)
    if args.mammoth:
        write_mammoth_data(Path(args.mammoth), None, None)
        rows["Mammoth (sgd), end to end"] = mammoth_run(Path(args.mammoth), args.mammoth_python, args.tasks,
                                                        args.threads)
    single, cell = rows["clbench, one run"][0], rows[f"clbench, one cell of {args.cells} batched"][0]
    print("| side | seconds a cell | final ACC | peer / clbench run | peer / clbench batched cell |\n"
          "| --- | --- | --- | --- | --- |")
    for label, (seconds, acc) in rows.items():
        ratios = "| | |" if label.startswith("clbench") else f"| {seconds / single:.1f}x | {seconds / cell:.1f}x |"
        print(f"| {label} | {seconds:.1f} | {acc:.3f} {ratios}")


if __name__ == "__main__":
    main()
