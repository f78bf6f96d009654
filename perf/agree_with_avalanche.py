"""Do clbench's strategies give Avalanche's numbers? Same stream, model, initial weights and batch order.

The stream is clbench's permuted Fashion-MNIST exported with ``to_avalanche()``. Each training
experience is re-ordered into the exact order clbench's engine draws its batches in (one
``torch.randperm`` per task from a generator seeded with the run's seed; one epoch, so Avalanche's
unshuffled data loader yields the same batches), the model starts from the same weights, and both
train with plain SGD. Both matrices R are computed the same way (accuracy on every test set after
every task). Printed per comparison: the largest |R difference| and both wall times (training and
evaluation of R).

Settings mapping (clbench -> Avalanche 0.6):

| clbench | Avalanche | mapping |
| --- | --- | --- |
| `finetune` | `Naive` | |
| `ewc-diag form=per-task` | `EWCPlugin(mode="separate")` | `ewc_lambda = strength / 2` (Avalanche's penalty has no 1/2) |
| `ewc-diag form=online decay=g` | `EWCPlugin(mode="online", decay_factor=g)` | as above |
| `ewc-diag fisher=empirical fisher_samples=N` | importance with batches of one sample | Avalanche's importance is the squared gradient of the *mean* loss of each training mini-batch, averaged over batches: not a Fisher. With batches of one sample it is the empirical Fisher (mean squared per-sample gradient) over the task's N training samples |
| `si c=c xi=xi` | `SynapticIntelligencePlugin(si_lambda=2c, eps=xi)` | Avalanche's penalty is si_lambda/2; it clips the importance at 0.001 (hard-coded `clip_to`), clbench does not: they agree while no importance exceeds 0.001 (the script checks) |
| `lwf alpha=a temperature=T` | `LwFPlugin(alpha=a, temperature=T)` | same alpha (Li & Hoiem's lambda_o); clbench `t_squared=true` is Avalanche `alpha = a T^2` |

Where Avalanche itself departs, the script says so and runs Avalanche both as shipped and corrected:

- its EWC importance is the squared mean-batch gradient (above), so stock Avalanche EWC is compared
  too, and differs;
- its SI stores ``param.detach().cpu().flatten()``, which on a CPU model is a view of the live
  weights, not a copy: the "old" weights always equal the current ones, so the path integral,
  the importance and the penalty are all 0 and SI trains exactly like ``Naive`` on CPU. The
  corrected run patches that one function to copy (``.clone()``).

Replay is left out: clbench's reservoir and Avalanche's buffers draw different random samples.

    python perf/agree_with_avalanche.py [--tasks 3] [--train-samples 5000] [--test-samples 2000]
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from clbench import make_strategy, make_stream, run
from clbench.core.types import Stream
from clbench.models.networks import build_model


@dataclass
class Comparison:
    """One row: a clbench strategy beside an Avalanche configuration."""

    label: str
    clbench: str
    clbench_args: dict[str, Any]
    plugins: Callable[[], list]  # Avalanche plugins for Naive (fresh each run)
    patch: Callable[[], Any] = contextlib.nullcontext
    note: str = ""
    results: dict[str, Any] = field(default_factory=dict)


def _per_sample_ewc():
    from avalanche.training.plugins import EWCPlugin

    class PerSampleEWC(EWCPlugin):
        """Avalanche's EWC with importance batches of one sample: the mean squared per-sample gradient."""

        def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
            return super().compute_importances(model, criterion, optimizer, dataset, device, 1, num_workers)

    return PerSampleEWC


@contextlib.contextmanager
def si_copies_weights():
    """Avalanche's SI with its one defect fixed: stored weights are copies, not views of the live weights."""
    from avalanche.training.plugins import SynapticIntelligencePlugin as SI

    shipped = SI.__dict__["extract_weights"]

    @torch.no_grad()
    def extract_weights(model, target, excluded_parameters):
        for name, param in SI.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    SI.extract_weights = staticmethod(extract_weights)
    try:
        yield
    finally:
        SI.extract_weights = shipped


def comparisons(n_train: int, strength: float = 1.0, decay: float = 0.5, c: float = 1000.0, xi: float = 100.0,
                alpha: float = 1.0, temperature: float = 2.0) -> list[Comparison]:
    """Every comparison the script runs, with mapped settings.

    SI's default ``xi`` is large so that no importance reaches Avalanche's 0.001 clip (``c`` is large to
    compensate); with smaller ``xi`` the clip binds and the two differ by design.
    """
    from avalanche.training.plugins import (
        EWCPlugin,
        LwFPlugin,
        SynapticIntelligencePlugin,
    )

    ewc = dict(strength=strength, fisher="empirical", fisher_samples=n_train)
    return [
        Comparison("finetune", "finetune", {}, lambda: []),
        Comparison("EWC per-task", "ewc-diag", {**ewc, "form": "per-task"},
                   lambda: [_per_sample_ewc()(strength / 2, mode="separate")],
                   note="Avalanche importance from batches of one sample"),
        Comparison("EWC online", "ewc-diag", {**ewc, "form": "online", "decay": decay},
                   lambda: [_per_sample_ewc()(strength / 2, mode="online", decay_factor=decay)],
                   note="Avalanche importance from batches of one sample"),
        Comparison("EWC per-task, Avalanche as shipped", "ewc-diag", {**ewc, "form": "per-task"},
                   lambda: [EWCPlugin(strength / 2, mode="separate")],
                   note="Avalanche departs: importance = squared mean-batch gradient, not a Fisher"),
        Comparison("SI", "si", {"c": c, "xi": xi}, lambda: [SynapticIntelligencePlugin(2 * c, eps=xi)],
                   patch=si_copies_weights, note="Avalanche's SI patched to copy the weights it stores"),
        Comparison("SI, Avalanche as shipped", "si", {"c": c, "xi": xi},
                   lambda: [SynapticIntelligencePlugin(2 * c, eps=xi)],
                   note="Avalanche departs: on CPU it stores views of the live weights, so its penalty is 0"),
        Comparison("LwF", "lwf", {"alpha": alpha, "temperature": temperature},
                   lambda: [LwFPlugin(alpha, temperature)]),
        Comparison("LwF with T^2", "lwf", {"alpha": alpha, "temperature": temperature, "t_squared": True},
                   lambda: [LwFPlugin(alpha * temperature**2, temperature)]),
    ]


def batch_orders(stream: Stream, seed: int) -> list[torch.Tensor]:
    """The order clbench's engine visits each task's training samples in (one epoch)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(len(task.train_x), generator=generator) for task in stream.tasks]


def _model(stream: Stream, seed: int, model_args: dict) -> torch.nn.Module:
    torch.manual_seed(seed)  # as clbench.run does before building the model
    args = {**stream.defaults.model_args, **model_args}
    return build_model(stream.defaults.model, stream.input_shape, stream.num_outputs, **args)


@torch.no_grad()
def _scores(model: torch.nn.Module, tests: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    model.eval()
    out = [float((model(x).argmax(1) == y).double().sum() / len(y)) for x, y in tests]
    model.train()
    return out


def run_avalanche(stream: Stream, exported, tests: list, comparison: Comparison, seed: int, lr: float,
                  batch_size: int, model_args: dict) -> tuple[np.ndarray, float]:
    """Avalanche's Naive strategy with the comparison's plugins on the exported stream, in clbench's batch order."""
    from avalanche.benchmarks import dataset_benchmark
    from avalanche.training.supervised import Naive

    ordered = [exp.dataset.subset(order.tolist()) for exp, order in zip(exported.train_stream,
                                                                        batch_orders(stream, seed))]
    benchmark = dataset_benchmark(ordered, [exp.dataset for exp in exported.test_stream])
    model = _model(stream, seed, model_args)
    start = time.perf_counter()
    with comparison.patch():
        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                         criterion=torch.nn.CrossEntropyLoss(), train_mb_size=batch_size, train_epochs=1,
                         eval_mb_size=2048, device="cpu", evaluator=None, plugins=comparison.plugins())
        R = [_scores(model, tests)]
        for experience in benchmark.train_stream:
            strategy.train(experience, shuffle=False)
            R.append(_scores(model, tests))
    return np.array(R), time.perf_counter() - start


def run_clbench(stream: Stream, comparison: Comparison, seed: int, lr: float, batch_size: int,
                model_args: dict) -> tuple[np.ndarray, float, Any]:
    strategy = make_strategy(comparison.clbench, epochs=1, lr=lr, batch_size=batch_size, optimizer="sgd",
                             **comparison.clbench_args)
    result = run(stream, strategy, device="cpu", seed=seed, progress=False, model_args=model_args)
    return np.array(result.R), result.wall_time_s, strategy


def compare(stream: Stream, rows: list[Comparison], seed: int = 0, lr: float = 0.05, batch_size: int = 128,
            model_args: dict | None = None) -> list[Comparison]:
    """Fill each comparison's results: both R, the largest |difference|, both times."""
    from clbench.core.engine import TrainingDiverged

    model_args = model_args or {}
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # one-time imports, outside both timings
    exported = stream.to_avalanche()
    tests = [(ds["test"].tensors[0], ds["test"].tensors[1]) for ds in stream.to_torch()]
    for row in rows:
        try:
            R_c, t_c, strategy = run_clbench(stream, row, seed, lr, batch_size, model_args)
        except TrainingDiverged as e:
            row.results = {"diverged": str(e)}
            continue
        R_a, t_a = run_avalanche(stream, exported, tests, row, seed, lr, batch_size, model_args)
        row.results = {"R_clbench": R_c, "R_avalanche": R_a, "max_abs_diff": float(np.abs(R_c - R_a).max()),
                       "clbench_s": t_c, "avalanche_s": t_a}
        if row.clbench == "si":  # does Avalanche's clip (importance <= 0.001) bind for these settings?
            row.results["max_importance"] = float(strategy.omega.max())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    stream = make_stream("permuted-fashion-mnist", tasks=args.tasks, train_samples=args.train_samples,
                         test_samples=args.test_samples, seed=args.seed)
    print(f"permuted Fashion-MNIST, {args.tasks} tasks x {args.train_samples} training images "
          f"({args.test_samples} test), MLP 784-400-400-10, SGD lr 0.05, batch 128, 1 epoch, seed {args.seed}, "
          f"CPU, torch threads {torch.get_num_threads()}\n")
    print("| comparison | clbench | Avalanche | max abs R difference | clbench s | Avalanche s | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for row in comparisons(args.train_samples):
        compare(stream, [row], seed=args.seed)
        r = row.results
        if "diverged" in r:
            print(f"| {row.label} | `{row.clbench}` | | diverged in clbench: {r['diverged']} | | | |", flush=True)
            continue
        avalanche = ", ".join(type(p).__name__ for p in row.plugins()) or "Naive"
        settings = " ".join(f"{k}={v}" for k, v in row.clbench_args.items())
        note = row.note
        if "max_importance" in r:
            note += f"; largest clbench SI importance {r['max_importance']:.2g}" + (
                " (over Avalanche's 0.001 clip)" if r["max_importance"] > 1e-3 else " (under the 0.001 clip)")
        print(f"| {row.label} | `{row.clbench}` {settings} | {avalanche} | {r['max_abs_diff']:.4f} | "
              f"{r['clbench_s']:.1f} | {r['avalanche_s']:.1f} | {note} |", flush=True)


if __name__ == "__main__":
    main()
