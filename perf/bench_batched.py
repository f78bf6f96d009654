"""Batched runs vs one run after another, side by side in one process, with the same numbers.

Parts (``--parts``, default all):

- ``demo``: the ``clbench run`` demo grid (teacher-student, 3 x 3 (rho_a, rho_b) x 3 seeds, six strategies,
  exact expected-loss training): every run through ``clbench.run`` (what the demo did before batching) vs
  each strategy's 27 runs as one batched model (what it does now); largest |R difference|.
- ``ts``: the committed teacher-student leaderboard sweep (sweeps/teacher_student.toml) through
  ``clbench sweep`` machinery: ``--jobs 2 --batch off`` (sequential cells in two processes) vs
  ``--jobs 2 --batch auto``; ``--ts-seeds`` keeps the first seeds only (the file has 3).
- ``fmnist``: permuted Fashion-MNIST sweeps with an MLP 784-100-10, an ewc-diag strength sweep (members of a
  seed share inputs) and a finetune seed sweep (nothing shared): cells one after another vs batched, one cell
  in Avalanche (its own PermutedMNIST generator and EWC strategy), and the matmul ceiling as
  perf/bench_vectorized.py computes it (training and evaluation matmuls at this machine's measured fp32
  matmul rate; the Fisher, the penalty and the input preparation are extra work it does not count). Each side
  is timed ``--repeat`` times, interleaved, and the best kept; the rate is the best of as many measurements
  (this part's figures otherwise swing by 20% on a shared VM).

    python perf/bench_batched.py [--parts demo,ts,fmnist] [--threads N] [--ts-seeds 1] [--repeat 3] [--device cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import clbench
from clbench.batched import Member, run_batched
from clbench.batched import fisher as batched_fisher
from clbench.batched import group as batched_group

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vectorized import matmul_flops, matmul_throughput  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def line(name: str, t_seq: float, t_batched: float, runs: int, gap: float, seq_label: str = "one after another"
         ) -> None:
    print(f"  {name:<28} {seq_label} {t_seq:8.1f} s | batched {t_batched:7.1f} s | {t_seq / t_batched:5.1f}x | "
          f"{runs} runs | largest |R difference| {gap:.2g}", flush=True)


@contextlib.contextmanager
def phase_times() -> dict[str, float]:
    """Seconds the batched path spends in its once-a-task phases (input preparation, evaluation, the diagonal
    Fisher), found by wrapping those functions for the duration."""
    spent: dict[str, float] = {}
    phases = [(batched_group, "distinct_inputs", "inputs"), (batched_group.Group, "evaluate", "evaluation"),
              (batched_fisher, "diagonal_fisher", "Fisher")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in phases]

    def timed(function, label):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
        return call

    for (owner, name, label), (_, _, function) in zip(phases, originals):
        setattr(owner, name, timed(function, label))
    try:
        yield spent
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def demo(device: str) -> tuple[float, float]:
    from clbench.cli.commands import DEMO_GRID, DEMO_SEEDS, DEMO_STRATEGIES

    grid = [((a, b), s) for a in DEMO_GRID for b in DEMO_GRID for s in range(DEMO_SEEDS)]
    total_seq = total_batched = largest = 0.0
    print(f"demo grid: teacher-student exact mode, {len(grid)} runs per strategy")
    for label, name, args in DEMO_STRATEGIES:
        streams = [clbench.make_stream("teacher-student", rho_a=a, rho_b=b, seed=s) for (a, b), s in grid]
        start = time.perf_counter()
        seq = [clbench.run(st, clbench.make_strategy(name, **args), device=device, seed=s, progress=False)
               for st, (_, s) in zip(streams, grid)]
        t_seq = time.perf_counter() - start
        start = time.perf_counter()
        batched = run_batched([Member(st, clbench.make_strategy(name, **args), s) for st, (_, s) in zip(streams, grid)],
                              device=device)
        t_batched = time.perf_counter() - start
        gap = max(float(np.abs(np.array(b.R) - np.array(r.R)).max()) for b, r in zip(batched, seq))
        line(label, t_seq, t_batched, len(grid), gap)
        total_seq, total_batched, largest = total_seq + t_seq, total_batched + t_batched, max(largest, gap)
    line("demo total", total_seq, total_batched, len(grid) * len(DEMO_STRATEGIES), largest)
    return total_seq, total_batched


def ts_sweep(seeds: int, jobs: int) -> None:
    from clbench.experiments import sweep
    from clbench.experiments.store import Store

    spec = sweep.load_spec(ROOT / "sweeps" / "teacher_student.toml")
    spec["seeds"] = spec["seeds"][:seeds]
    cells = sweep.expand(spec)
    print(f"teacher-student leaderboard sweep (sweeps/teacher_student.toml, seeds {spec['seeds']}): {len(cells)} cells, "
          f"--jobs {jobs}")
    with tempfile.TemporaryDirectory() as tmp:
        off, auto = Store(Path(tmp) / "off"), Store(Path(tmp) / "auto")
        start = time.perf_counter()
        sweep.run_sweep(cells, off, jobs=jobs, progress=False, batch="off")
        t_off = time.perf_counter() - start
        start = time.perf_counter()
        sweep.run_sweep(cells, auto, jobs=jobs, progress=False, batch="auto")
        t_auto = time.perf_counter() - start
        want = {r["id"]: r for r in off.records()}
        gaps = {}
        for r in auto.records():
            gap = float(np.nanmax(np.abs(np.array(r["R"], float) - np.array(want[r["id"]]["R"], float))))
            gaps[r["cell"]["strategy"]] = max(gaps.get(r["cell"]["strategy"], 0.0), gap)
    line("leaderboard sweep", t_off, t_auto, len(cells), max(gaps.values()), "cells --batch off")
    print("  largest |R difference| per strategy: " + ", ".join(f"{k} {v:.1g}" for k, v in gaps.items()))


def avalanche_ewc(tasks: int, train_samples: int, strength: float, lr: float, widths: tuple[int, ...],
                  device: str) -> float:
    """One cell in Avalanche: its PermutedMNIST generator on the Fashion-MNIST files, its EWC strategy."""
    from avalanche.benchmarks.classic import PermutedMNIST
    from avalanche.training import EWC

    from clbench.data.datasets import locate

    folder, files = locate("fashion-mnist")
    root = Path(tempfile.mkdtemp())
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for paths in files.values():
        src = paths[0]
        with (gzip.open(src) if src.suffix == ".gz" else open(src, "rb")) as f, \
                open(raw / src.name.removesuffix(".gz"), "wb") as g:
            shutil.copyfileobj(f, g)
    start = time.perf_counter()
    torch.manual_seed(0)
    benchmark = PermutedMNIST(tasks, seed=0, dataset_root=root)
    model = clbench.build_model("mlp", (1, 28, 28), 10, widths=widths)
    strategy = EWC(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), criterion=torch.nn.CrossEntropyLoss(),
                   ewc_lambda=strength, train_mb_size=128, train_epochs=1, eval_mb_size=1024, device=device,
                   evaluator=None)
    for experience in benchmark.train_stream:
        # the same number of training images per task as the clbench cells
        experience.dataset = experience.dataset.subset(range(train_samples))
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)
    elapsed = time.perf_counter() - start
    shutil.rmtree(root)
    return elapsed


def fmnist(strengths: list[float], finetune_seeds: int, seeds: int, tasks: int, train_samples: int,
           with_avalanche: bool, repeat: int, device: str) -> None:
    widths = (100,)
    print(f"permuted Fashion-MNIST sweeps: {tasks} tasks, {train_samples} training images, 1 epoch, MLP 784-100-10, "
          f"SGD, batch 128; each time the best of {repeat} (the ceiling's rate the best of {repeat} measurements)")
    streams = {s: clbench.make_stream("permuted-fashion-mnist", tasks=tasks, train_samples=train_samples, seed=s)
               for s in range(max(seeds, finetune_seeds))}
    task = streams[0].tasks[0]
    flops = matmul_flops([784, *widths, 10], len(task.train_x), len(task.test_x), tasks, 1)
    eval_flops = matmul_flops([784, *widths, 10], 0, len(task.test_x), tasks, 1)
    # the strength sweep's members of one seed share their inputs; the seed sweep's members share nothing
    sweeps = [(f"ewc-diag strength {strengths} x seeds {list(range(seeds))}",
               lambda v: clbench.make_strategy("ewc-diag", strength=v, epochs=1),
               [(v, s) for s in range(seeds) for v in strengths]),
              (f"finetune x seeds {list(range(finetune_seeds))}", lambda v: clbench.make_strategy("finetune", epochs=1),
               [(None, s) for s in range(finetune_seeds)])]
    for label, make, cells in sweeps:
        t_seq = t_batched = float("inf")
        rate = 0.0
        for _ in range(repeat):  # interleaved, so that a slow spell of the machine hits every side alike
            rate = max(rate, matmul_throughput(784, sum(widths) * 4, seconds=0.5, device=device))
            start = time.perf_counter()
            seq = [clbench.run(streams[s], make(v), device=device, seed=s, progress=False,
                               model_args={"widths": widths}) for v, s in cells]
            t_seq = min(t_seq, time.perf_counter() - start)
            with phase_times() as phases:
                start = time.perf_counter()
                batched = run_batched([Member(streams[s], make(v), s) for v, s in cells], device=device,
                                      model_args={"widths": widths})
                elapsed = time.perf_counter() - start
            if elapsed < t_batched:
                t_batched, spent = elapsed, phases
        gap = max(float(np.abs(np.array(b.R) - np.array(r.R)).max()) for b, r in zip(batched, seq))
        print(f"  {label}")
        line("sweep", t_seq, t_batched, len(cells), gap)
        floor = len(cells) * flops / rate
        print(f"  matmul ceiling {floor:.2f} s for the {len(cells)} runs ({len(cells) * flops / 1e9:.0f} GFLOP at "
              f"{rate / 1e9:.0f} GFLOP/s): batched is {t_batched / floor:.2f}x the ceiling, one after another "
              f"{t_seq / floor:.1f}x (the ceiling counts no Fisher, penalty or input preparation)")
        training = t_batched - sum(spent.values())
        eval_floor = len(cells) * eval_flops / rate
        print(f"  batched by phase: evaluation {spent.get('evaluation', 0):.2f} s (its matmuls alone {eval_floor:.2f} s), "
              f"training {training:.2f} s (its matmuls alone {floor - eval_floor:.2f} s), inputs "
              f"{spent.get('inputs', 0):.2f} s, Fisher {spent.get('Fisher', 0):.2f} s")
        if with_avalanche and label.startswith("ewc"):
            lr = seq[0].config["lr"]
            t_av = avalanche_ewc(tasks, train_samples, strengths[0], lr, widths, device)
            print(f"  avalanche, one cell (EWC strength {strengths[0]}): {t_av:.1f} s; clbench one cell "
                  f"{t_seq / len(cells):.1f} s, batched {t_batched / len(cells):.2f} s a cell "
                  f"({t_av / (t_batched / len(cells)):.0f}x)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="demo,ts,fmnist")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--ts-seeds", type=int, default=3)
    parser.add_argument("--ts-jobs", type=int, default=2)
    parser.add_argument("--strengths", default="0.3,1,3,10")
    parser.add_argument("--finetune-seeds", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--no-avalanche", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="fmnist: time each side this many times, keep the best")
    parser.add_argument("--device", default="cpu", help="demo and fmnist parts (cpu, cuda); the ts part runs the "
                        "sweep file's device (cpu)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {card}")
    if "demo" in parts:
        demo(args.device)
    if "ts" in parts:
        ts_sweep(args.ts_seeds, args.ts_jobs)
    if "fmnist" in parts:
        fmnist([float(s) for s in args.strengths.split(",")], args.finetune_seeds, args.seeds,
               args.tasks, args.train_samples, not args.no_avalanche, args.repeat, args.device)


if __name__ == "__main__":
    main()
