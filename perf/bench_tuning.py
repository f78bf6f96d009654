"""One tuning search, batched against one trial at a time, side by side in one run.

The search: ewc-diag's strength and the learning rate (TPE, ``--trials`` trials, one tuning seed) on permuted
Fashion-MNIST under Mammoth's P-MNIST protocol (Buzzega et al. 2020: MLP 784-100-100-10, SGD, batch 128,
1 epoch a task, all 60000 training images; ``--tasks`` tasks, 20 in the paper), validation on a seeded 10%
of each task's training images. ``clbench tune``'s defaults (``--batch auto --jobs auto``: 8 trials asked at
once with TPE's constant liar, shared out among one worker process per idle core, each training its share as
one batched model) against one trial at a time (``--batch off --jobs 1``: one run at a time in this process,
``--threads`` threads), each in a fresh store. Prints both wall times, the ratio, and both searches' chosen settings and validation scores:
the first 10 trials are TPE's random start-up and the same points in both searches (each trial's random
state comes from its place), so their values agree to float rounding; later points differ because the
batched search hears back only after each batch.

    python perf/bench_tuning.py [--tasks 5] [--trials 16] [--train-samples 60000] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

SUITE = """\
version = 1
seeds = [0]
metric = "acc"
[training]
epochs = 1
lr = 0.1
batch_size = 128
optimizer = "sgd"
[validation]
share = 0.1
[tuning]
trials = {trials}
seeds = [100]
space = {{ lr = ["log", 0.01, 0.3] }}
[[stream]]
name = "permuted-fashion-mnist"
args = {{ tasks = {tasks}, train_samples = {train}, test_samples = 10000 }}
model = "mlp"
model_args = {{ widths = [100, 100] }}
[[strategy]]
name = "ewc-diag"
args = {{ fisher_samples = 1000 }}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--train-samples", type=int, default=60000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from clbench.experiments import suite as suites
    from clbench.experiments import tune
    from clbench.experiments.batching import resolve_jobs

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="clbench-bench-tuning-"))
    path = root / "pmnist-protocol.toml"
    path.write_text(SUITE.format(trials=args.trials, tasks=args.tasks, train=args.train_samples))
    suite = suites.load(path)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {commit}: ewc-diag, {args.trials} trials, permuted Fashion-MNIST {args.tasks} tasks x "
          f"{args.train_samples} images, MLP 784-100-100-10, SGD, 1 epoch; --jobs auto is "
          f"{resolve_jobs('auto', 'ewc-diag')} worker process(es) ($CLBENCH_THREADS sets the cores to use)")
    out = {}
    for batch in ("auto", "off"):
        start = time.perf_counter()
        summary = tune.tune(suite, "ewc-diag", root / batch, progress=False, batch=batch,
                            jobs="auto" if batch == "auto" else 1)
        out[batch] = (time.perf_counter() - start, summary)
        print(f"--batch {batch:4s}: {out[batch][0]:7.1f} s, chosen {summary['chosen']}, "
              f"validation acc {summary['validation_score']:.4f}", flush=True)
    together, alone = (out[b][1]["trials"] for b in ("auto", "off"))
    shared = [(a["value"], b["value"]) for a, b in zip(together, alone) if a["params"] == b["params"]]
    gap = max((abs(a - b) for a, b in shared if a is not None and b is not None), default=float("nan"))
    print(f"speed-up {out['off'][0] / out['auto'][0]:.1f}x (one at a time / batched); {len(shared)} trials tried "
          f"the same point in both searches, largest value difference {gap:.2e}")


if __name__ == "__main__":
    main()
