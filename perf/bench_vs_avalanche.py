"""clbench vs Avalanche, side by side, on the same stream, model and optimiser.

Permuted Fashion-MNIST, 3 tasks, one epoch per task, the default MLP
(784-400-400-10, ReLU), SGD lr 0.05, batch 128, evaluation on every task after
each task. The Avalanche side is Avalanche's own ``PermutedMNIST`` benchmark
generator and ``Naive`` strategy, unmodified: Fashion-MNIST shares MNIST's
file names and format, so its IDX files are placed where Avalanche's MNIST
loader looks (MNIST itself cannot be downloaded offline). Prints wall times
and the ratio.

    python perf/bench_vs_avalanche.py [--tasks 3] [--epochs 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from clbench import make_strategy, make_stream, run
from clbench.data.datasets import locate
from clbench.models.networks import build_model


def clbench_run(tasks: int, epochs: int, device: str) -> tuple[float, float]:
    start = time.perf_counter()
    stream = make_stream("permuted-fashion-mnist", tasks=tasks, seed=0)
    result = run(stream, make_strategy("finetune", epochs=epochs, lr=0.05, batch_size=128), device=device,
                 seed=0, progress=False)
    return time.perf_counter() - start, result.metrics["acc"]


def avalanche_run(tasks: int, epochs: int, device: str, widths: tuple[int, ...] = (400, 400),
                  lr: float = 0.05) -> tuple[float, float]:
    from avalanche.benchmarks.classic import PermutedMNIST
    from avalanche.training.supervised import Naive

    folder, files = locate("fashion-mnist")
    root = Path(tempfile.mkdtemp())
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for paths in files.values():  # torchvision reads the decompressed IDX files
        src = paths[0]
        with (gzip.open(src) if src.suffix == ".gz" else open(src, "rb")) as f, open(raw / src.name.removesuffix(".gz"), "wb") as g:
            shutil.copyfileobj(f, g)
    start = time.perf_counter()
    torch.manual_seed(0)
    benchmark = PermutedMNIST(tasks, seed=0, dataset_root=root)
    model = build_model("mlp", (1, 28, 28), 10, widths=widths)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), train_mb_size=128,
                     train_epochs=epochs, eval_mb_size=1024, device=device, evaluator=None)
    for experience in benchmark.train_stream:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)
    elapsed = time.perf_counter() - start
    model.eval()
    accs = []
    with torch.no_grad():  # final accuracy per task, outside the timed part
        for experience in benchmark.test_stream:
            loader = torch.utils.data.DataLoader(experience.dataset, batch_size=1024)
            hits = sum(int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y, *_ in loader)
            accs.append(hits / len(experience.dataset))
    shutil.rmtree(root)
    return elapsed, sum(accs) / len(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"permuted Fashion-MNIST, {args.tasks} tasks x {args.epochs} epoch(s), MLP 784-400-400-10, SGD lr 0.05, "
          f"batch 128, device {args.device}, torch threads {torch.get_num_threads()}")
    t_clbench, acc_clbench = clbench_run(args.tasks, args.epochs, args.device)
    print(f"clbench   : {t_clbench:7.1f} s   final ACC {acc_clbench:.3f}", flush=True)
    t_avalanche, acc_avalanche = avalanche_run(args.tasks, args.epochs, args.device)
    print(f"avalanche : {t_avalanche:7.1f} s   final ACC {acc_avalanche:.3f}")
    print(f"speed-up  : {t_avalanche / t_clbench:.1f}x (Avalanche time / clbench time, end to end)")


if __name__ == "__main__":
    main()
