"""The cost of continual evaluation: a plain run against ``eval_every=10`` and ``eval_every=50``.

Finetune with the stream's default MLP (784-400-400-10, SGD, batch 128, 1 epoch a task) on permuted
Fashion-MNIST (real data), 1000 test samples a task for the curves. Each setting runs ``--repeat`` times
in turn (plain, K=10, K=50, plain, ...); the best wall time of each is kept (``Result.wall_time_s``:
training and evaluation, not building the stream), and the script prints them and their ratios to the
plain run, plus the number of continual evaluations and the metrics of the curves.

``--batched B`` times the batched path instead (clbench.batched.run_batched): B finetune members (seeds
0..B-1 on the one stream) trained in lockstep, each evaluated on its own subsample; the wall time is the
whole batch's, the metrics are member 0's.

    python perf/bench_continual_eval.py [--tasks 5] [--train-samples N] [--repeat 3] [--threads N]
        [--device cpu] [--batched B] [--output-dir DIR]   # DIR: each setting's result JSON (`clbench plot curves`)
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess

import torch

from clbench import make_strategy, make_stream, run
from clbench.batched import Member, run_batched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--train-samples", type=int, default=None, help="training images a task (default: all 60000)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batched", type=int, default=0, metavar="B", help="time B members of the batched path")
    p.add_argument("--output-dir", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stream = make_stream("permuted-fashion-mnist", tasks=args.tasks, train_samples=args.train_samples, seed=0)
    settings = {"plain": None, "K=10": 10, "K=50": 50}
    best: dict[str, float] = {}
    results = {}
    for _ in range(args.repeat):
        for label, every in settings.items():
            if args.batched:
                members = [Member(stream, make_strategy("finetune"), seed) for seed in range(args.batched)]
                batch = run_batched(members, device=args.device, eval_every=every, eval_samples=args.eval_samples)
                r, wall = batch[0], sum(m.wall_time_s for m in batch)  # each member holds its share of the batch
            else:
                r = run(stream, make_strategy("finetune"), device=args.device, seed=0, progress=False,
                        eval_every=every, eval_samples=args.eval_samples)
                wall = r.wall_time_s
            best[label] = min(best.get(label, float("inf")), wall)
            results[label] = r
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {commit}, device {args.device}")
    print(f"{f'batched, {args.batched} members, ' if args.batched else ''}finetune, permuted Fashion-MNIST, {args.tasks} tasks x {len(stream[0].train_x)} training images, "
          f"{args.eval_samples} test samples a task for the curves; best of {args.repeat}")
    print(f"{'setting':8s} {'wall s':>8s} {'ratio':>6s} {'evaluations':>11s}  min_acc  wc_acc  stability_gap")
    for label in settings:
        r = results[label]
        n = len(r.curves["step"]) if r.curves else 0
        m = r.metrics
        extra = (f"  {m['min_acc']:.3f}    {m['wc_acc']:.3f}   {m['stability_gap']:.3f}" if r.curves else "")
        print(f"{label:8s} {best[label]:8.2f} {best[label] / best['plain']:6.2f} {n:11d}{extra}")
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            r.to_json(os.path.join(args.output_dir, f"{label.replace('=', '')}.json"))


if __name__ == "__main__":
    main()
