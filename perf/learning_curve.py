"""A task's test score against training epochs, to choose how long a sweep trains each task.

One task of permuted Fashion-MNIST (real data), finetune for ``--epochs`` epochs, several seeds trained at
once (clbench.batched.run_batched), the test score after every epoch (continual evaluation every epoch on
the whole test set). A run of e epochs is the first e epochs of the long run (the batch orders are drawn
epoch by epoch from the seed, the learning rate is constant), so one long run gives the whole curve.
Prints the mean over seeds per epoch and the first epoch within ``--within`` of the last one.

    python perf/learning_curve.py --train-samples 10000 --epochs 30 --lr 0.05 --widths 100,100 --seeds 3
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from clbench import make_strategy, make_stream
from clbench.batched import Member, run_batched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--widths", default="100,100")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--within", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    train = dict(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, batch_size=args.batch_size)
    members = [Member(make_stream("permuted-fashion-mnist", tasks=1, train_samples=args.train_samples,
                                  test_samples=args.test_samples, seed=seed), make_strategy("finetune", **train), seed)
               for seed in range(args.seeds)]
    per_epoch = math.ceil(len(members[0].stream[0].train_x) / args.batch_size)
    results = run_batched(members, device="cpu", model_name="mlp", model_args={"widths": widths},
                          eval_every=per_epoch, eval_samples=args.test_samples)
    curves = np.array([[row[0] for row in r.curves["score"]] for r in results])  # seeds x (epochs + 1)
    mean = curves.mean(0)
    first = next(e for e in range(len(mean)) if mean[e] >= mean[-1] - args.within)
    print(f"finetune, {len(members[0].stream[0].train_x)} training images, MLP {widths}, {args.optimizer} lr {args.lr}, "
          f"batch {args.batch_size}, {args.seeds} seeds; test score (mean over seeds, min, max) after each epoch:")
    for e in range(len(mean)):
        print(f"  epoch {e:3d}: {mean[e]:.4f}  ({curves[:, e].min():.4f} .. {curves[:, e].max():.4f})")
    print(f"first epoch within {args.within} of epoch {len(mean) - 1}: {first} ({mean[first]:.4f} vs {mean[-1]:.4f})")


if __name__ == "__main__":
    main()
