"""One tuning search, batched against one trial at a time, side by side in one run.

The search: the first ``--trials`` trials (default 16) of ``--strategy``'s search (default ewc-diag) under a
committed suite's protocol, data and search space (``--suite``, default ``permuted-fashion-mnist``: the v2
protocol, Mammoth's P-MNIST on Fashion-MNIST, 10 tasks of all 60000 training images, MLP 784-100-100-10,
SGD lr 0.1, batch 128, 1 epoch a task; ewc-diag searches its strength), validation on the suite's seeded
split of the training images. ``clbench tune``'s defaults (``--batch auto --jobs auto``: 8 trials asked at
once with TPE's constant liar, shared out among one worker process per idle core, each training its share
as one batched model) against one trial at a time (``--batch off --jobs 1``: one run at a time in this
process, ``--threads`` threads), each in a fresh store. Prints both wall times, the ratio, both searches'
chosen settings and validation scores, and how many trials diverged (a diverged run stops where it diverged;
in a batch it leaves at the next task boundary). ``--jobs 1``: the batched search in this process instead. The first 10 trials are TPE's random start-up
and the same points in both searches (each trial's random state comes from its place), so their values
agree up to float rounding compounded over the run; later points differ because the batched search hears
back only after each batch.

    python perf/bench_tuning.py [--suite permuted-fashion-mnist] [--strategy ewc-diag] [--trials 16] [--threads 2] [--jobs auto]
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="permuted-fashion-mnist")
    parser.add_argument("--strategy", default="ewc-diag")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", default="auto", help="the batched search's --jobs (auto: one worker per core)")
    args = parser.parse_args()
    import torch

    from clbench.experiments import suite as suites
    from clbench.experiments import tune
    from clbench.experiments.batching import resolve_jobs

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="clbench-bench-tuning-"))
    suite = suites.load(args.suite)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, commit {commit}: {args.strategy}, the first {args.trials} trials on {suite.name} v{suite.version}; "
          f"the batched search's --jobs {args.jobs} is {resolve_jobs(args.jobs, args.strategy)} worker process(es) "
          "($CLBENCH_THREADS sets the cores to use)")
    out = {}
    for batch in ("auto", "off"):
        start = time.perf_counter()
        summary = tune.tune(suite, args.strategy, root / batch, progress=False, batch=batch,
                            jobs=args.jobs if batch == "auto" else 1, max_new_trials=args.trials)
        out[batch] = (time.perf_counter() - start, summary)
        pruned = sum(t["state"] == "PRUNED" for t in summary["trials"])
        print(f"--batch {batch:4s}: {out[batch][0]:7.1f} s, chosen {summary['chosen']}, "
              f"validation {summary['validation_score']:.4f}, {pruned} of {len(summary['trials'])} trials diverged",
              flush=True)
    together, alone = (out[b][1]["trials"] for b in ("auto", "off"))
    shared = [(a["value"], b["value"]) for a, b in zip(together, alone) if a["params"] == b["params"]]
    gap = max((abs(a - b) for a, b in shared if a is not None and b is not None), default=float("nan"))
    print(f"speed-up {out['off'][0] / out['auto'][0]:.1f}x (one at a time / batched); {len(shared)} trials tried "
          f"the same point in both searches, largest value difference {gap:.2e}")


if __name__ == "__main__":
    main()
