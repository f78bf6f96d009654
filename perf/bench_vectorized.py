"""Runs per second: 8 seeds of the default MLP on permuted Fashion-MNIST, vectorised vs one after another.

Both sides train finetune with the same settings and produce the same matrices
(tests/test_vectorized.py); the script prints both rates and their ratio.

It also prints the ceiling that no batching can pass: the run's matmul work
(training forward and backward, and every evaluation of R) at this machine's
measured fp32 matmul throughput. When one-after-another runs already sit close to
that floor (a wide MLP on a CPU), vectorising cannot give much; small models and
GPUs, where runs are dominated by per-step overhead, gain the most.

    python perf/bench_vectorized.py [--seeds 8] [--tasks 3] [--train-samples 10000] [--epochs 1] [--widths 400,400]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from clbench import make_strategy, make_stream, run
from clbench.batched import run_seeds


def matmul_flops(dims: list[int], train_samples: int, test_samples: int, tasks: int, epochs: int) -> float:
    """Multiply-add work of one run of an MLP with layer sizes ``dims``: training and the (T+1) x T evaluations."""
    forward = 2 * sum(a * b for a, b in zip(dims, dims[1:]))
    backward = 2 * forward - 2 * dims[0] * dims[1]  # no gradient for the input itself
    return tasks * epochs * train_samples * (forward + backward) + (tasks + 1) * tasks * test_samples * forward


def matmul_throughput(k: int, n: int, seconds: float = 1.0, device: str = "cpu") -> float:
    """Best fp32 matmul rate (FLOP/s) of this machine (or ``device``) at a large, friendly shape."""
    a, b = torch.randn(2048, k, device=device), torch.randn(k, n, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if count % 16 == 0:
            sync()
    sync()
    return count * 2 * 2048 * k * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", default="400,400", help="hidden widths of the MLP (default: the stream's)")
    args = parser.parse_args()
    stream = make_stream("permuted-fashion-mnist", tasks=args.tasks, train_samples=args.train_samples)
    seeds = list(range(args.seeds))
    model_args = {"widths": tuple(int(w) for w in args.widths.split(","))}
    print(f"permuted Fashion-MNIST, {args.tasks} tasks, {args.train_samples} training images, {args.epochs} epoch(s), "
          f"MLP 784-{args.widths.replace(',', '-')}-10, finetune, {len(seeds)} seeds, device {args.device}")
    start = time.perf_counter()
    separate = [run(stream, make_strategy("finetune", epochs=args.epochs), device=args.device, seed=s, progress=False,
                    model_args=model_args)
                for s in seeds]
    t_separate = time.perf_counter() - start
    start = time.perf_counter()
    batched = run_seeds(stream, seeds, epochs=args.epochs, device=args.device, model_args=model_args)
    t_batched = time.perf_counter() - start
    gap = max(float(np.abs(np.array(b["R"]) - np.array(r.R)).max()) for b, r in zip(batched, separate))
    print(f"one after another: {len(seeds) / t_separate:6.2f} runs/s ({t_separate:.1f} s)")
    print(f"vectorised       : {len(seeds) / t_batched:6.2f} runs/s ({t_batched:.1f} s)")
    print(f"speed-up         : {t_separate / t_batched:.1f}x   (largest |R difference| {gap:.4f})")
    dims = [784, *model_args["widths"], 10]
    task = stream.tasks[0]
    flops = matmul_flops(dims, len(task.train_x), len(task.test_x), len(stream.tasks), args.epochs)
    rate = matmul_throughput(784, sum(model_args["widths"]) * 4, device=args.device)
    floor = len(seeds) * flops / rate
    print(f"ceiling          : {len(seeds) / floor:6.2f} runs/s ({floor:.1f} s): {flops / 1e9:.0f} GFLOP of matmuls "
          f"a run at {rate / 1e9:.0f} GFLOP/s; no batching can beat {t_separate / floor:.1f}x here")


if __name__ == "__main__":
    main()
