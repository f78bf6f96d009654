"""Do clbench's newer baselines give their peers' numbers? MAS, A-GEM, DER/DER++, ER-ACE, GDumb, iCaRL, BiC
beside Avalanche 0.6, and finetune, replay, A-GEM, DER++, iCaRL, LwF, SI, online EWC beside Mammoth.

Four parts (``--parts``), each printing a Markdown table:

``mas``: exact agreement. The machinery of ``agree_with_avalanche.py`` (same stream, initial weights and batch
order, one epoch, plain SGD) on class-incremental split Fashion-MNIST. Settings mapping, clbench -> Avalanche
``MASPlugin(lambda_reg, alpha)``:

| clbench | Avalanche | mapping |
| --- | --- | --- |
| `mas strength=s decay=0` | `MASPlugin(lambda_reg=s, alpha=0)` with importance batches of one sample | R identical |
| `mas strength=s` (decay=1, the paper's sum) | none | no (lambda_reg, alpha) reproduces a sum |

Avalanche (``avalanche/training/plugins/mas.py``) departs from Aljundi et al. 2018 (eq. 4: the mean over
samples of |d ||F(x)||^2 / d theta|; Omega accumulated over tasks) in two places:

- lines 99-100 and 109: the magnitude is taken of the gradient of a *batch's* mean squared norm, not per sample,
  and line 113 divides by the number of batches: with batches of one sample (the patch below) it is eq. 4
  exactly; with larger batches it is smaller wherever per-sample gradients disagree in sign.
- lines 151 and 171-173: the importance is a moving average started at the first task's,
  Omega_1 = O_1, Omega_t = alpha Omega_{t-1} + (1 - alpha) O_t, not the paper's sum. Its weights (alpha^{t-1}
  on O_1, (1 - alpha) alpha^{t-k} on the later O_k) match clbench's decayed sum s sum_k decay^{t-k} O_k for
  every t only at alpha = decay = 0 (the latest task's importance alone); the default alpha = 0.5 halves the
  weight of every task's importance after the first and cannot give the paper's sum for any alpha.
- line 67 computes the importance in training mode (no effect on an MLP without dropout or batch norm); line 143
  carries no factor 1/2, like the paper's eq. 3 and clbench.

``memory``: seeded agreement. clbench's memory methods and Avalanche's draw their memories, replay batches and
(for Avalanche) batch orders from different random streams, and aligning them would mean rewriting either
side's sampling, so both sides run ``--seeds`` seeds (initial weights and every random draw follow the seed)
on the same stream, model and settings; the table gives final ACC mean +- std and Welch's t-test. Mapping:
A-GEM ``buffer_size=K replay_batch_size=m`` -> ``AGEM(patterns_per_exp=K/tasks, sample_size=m)``; DER / DER++
``alpha beta`` -> ``DER(alpha, beta)`` (beta=0 for DER); ER-ACE ``buffer_size replay_batch_size`` ->
``ER_ACE(mem_size, batch_size_mem)``; iCaRL ``memory_size`` -> ``ICaRL(memory_size, fixed_memory=True)`` with
the MLP's hidden layers as feature extractor; BiC ``memory_size val_share temperature`` -> ``BiC(mem_size,
val_percentage, T)``; GDumb ``memory_size fit_epochs=E`` with plain SGD at the stream's lr (momentum 0, no
weight decay, no clipping, constant rate after the warm-up epoch) -> ``GDumb(mem_size, train_epochs=E)``.

``mammoth``: Mammoth (github aimagelab/mammoth) run from its own checkout and virtual environment
(``--mammoth DIR --mammoth-python PY``), never imported. Its MNIST loader reads ``DIR/data/MNIST/MNIST/processed``
(and ``.../MyMNIST/processed``); the script writes there the same Fashion-MNIST subsample clbench's stream uses
(``--mammoth-train``/``--mammoth-test`` images, stream seed 0), so ``seq-mnist`` is class-incremental split
Fashion-MNIST (5 x 2) and ``perm-mnist`` is permuted Fashion-MNIST (``--stop_after`` tasks). Both sides: MLP
784-100-100-10 (Mammoth's ``mnistmlp``), SGD lr 0.1, batch 32, one epoch, memory 200, replay batch 32, seeds
0..n-1; the table gives final ACC (Mammoth's Class-IL / Domain-IL accuracy) mean +- std. Without
``--mammoth`` only clbench's side runs.

``suite``: both sides under a committed suite's protocol (``--suite``: its model, optimiser, learning rate,
batch, epochs and every training image) at the settings its committed tuning chose, on its first
``--suite-tasks`` tasks, ``--mammoth-seeds`` seeds a side: against Mammoth (``--suite-strategies`` with a
Mammoth counterpart, ``--mammoth-jobs`` of its runs at once), or with ``--suite-avalanche`` against Avalanche
0.6 (finetune as ``Naive`` and the memory methods, mapped as in ``memory``; a replay batch not given is the
incoming batch size, A-GEM's 256).

    python perf/agree_with_peers.py [--parts mas,memory] [--seeds 5] [--train-samples 2000] [--test-samples 1000]
    python perf/agree_with_peers.py --parts mammoth --mammoth /path/to/mammoth --mammoth-python /path/to/python

Results (AMD EPYC, 2 cores, torch 2.14.1; the full table is in docs/strategies-baselines.md):

| method | peer | protocol | clbench | peer | verdict |
| --- | --- | --- | --- | --- | --- |
| MAS decay=0 | Avalanche MASPlugin alpha=0, batches of 1 | exact, 5000 images | R | R | identical |
| MAS (sum) | Avalanche MASPlugin alpha=0.5 | exact | R | R | differ by design (4.5e-3) |
| A-GEM | Avalanche | 5 + 5 seeds | 0.256 +- 0.022 | 0.243 +- 0.026 | agree (p = 0.41) |
| DER | Avalanche | 5 + 5 seeds | 0.212 +- 0.062 | 0.322 +- 0.053 | differ (p = 0.02): its memory departs |
| DER++ | Avalanche | 5 + 5 seeds | 0.370 +- 0.055 | 0.375 +- 0.021 | agree (p = 0.84) |
| ER-ACE | Avalanche | 5 + 5 seeds | 0.489 +- 0.024 | 0.488 +- 0.059 | agree (p = 0.97) |
| GDumb | Avalanche | 5 + 5 seeds | 0.474 +- 0.043 | 0.382 +- 0.080 | agree at p = 0.07 |
| finetune | Mammoth sgd | seq-mnist, 3 + 3 | 0.197 +- 0.003 | 0.199 +- 0.000 | agree (p = 0.37) |
| replay | Mammoth er | seq-mnist, 3 + 3 | 0.567 +- 0.050 | 0.665 +- 0.072 | agree at p = 0.13 |
| A-GEM | Mammoth agem | seq-mnist, 3 + 3 | 0.328 +- 0.020 | 0.333 +- 0.007 | agree (p = 0.72) |
| DER++ | Mammoth derpp | seq-mnist, 3 + 3 | 0.643 +- 0.003 | 0.616 +- 0.061 | agree (p = 0.52) |
| iCaRL | Mammoth icarl | seq-mnist, 3 + 3 | 0.577 +- 0.014 | 0.564 +- 0.040 | agree (p = 0.64) |
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agree_with_avalanche import Comparison, compare  # noqa: E402

from clbench import make_strategy, make_stream, run  # noqa: E402
from clbench.core.types import Stream  # noqa: E402
from clbench.models.networks import build_model  # noqa: E402

MLP = {"widths": (100, 100)}  # Mammoth's mnistmlp


# --- MAS: exact ------------------------------------------------------------------------------------------------

def _per_sample_mas():
    from avalanche.training.plugins import MASPlugin

    class PerSampleMAS(MASPlugin):
        """Avalanche's MAS with importance batches of one sample: Aljundi et al.'s per-sample magnitude."""

        def _get_importance(self, strategy):
            batch, strategy.train_mb_size = strategy.train_mb_size, 1
            try:
                return super()._get_importance(strategy)
            finally:
                strategy.train_mb_size = batch

    return PerSampleMAS


def mas_comparisons(strength: float = 0.01) -> list[Comparison]:
    """MAS beside Avalanche's MASPlugin: the exact mapping, and Avalanche as shipped."""
    from avalanche.training.plugins import MASPlugin

    return [
        Comparison("MAS, latest importance", "mas", {"strength": strength, "decay": 0.0},
                   lambda: [_per_sample_mas()(strength, alpha=0.0)],
                   note="Avalanche alpha=0, importance from batches of one sample"),
        Comparison("MAS, paper's sum vs Avalanche alpha=0.5", "mas", {"strength": strength},
                   lambda: [_per_sample_mas()(strength, alpha=0.5)],
                   note="Avalanche departs: moving average, not a sum (per-sample importance)"),
        Comparison("MAS, Avalanche as shipped", "mas", {"strength": strength},
                   lambda: [MASPlugin(strength, alpha=0.5)],
                   note="Avalanche departs: per-batch magnitude and moving average"),
    ]


def part_mas(stream: Stream, seed: int, lr: float, batch_size: int) -> None:
    print("| comparison | clbench | Avalanche | max abs R difference | note |\n| --- | --- | --- | --- | --- |")
    for row in compare(stream, mas_comparisons(), seed=seed, lr=lr, batch_size=batch_size, model_args=MLP):
        settings = " ".join(f"{k}={v}" for k, v in row.clbench_args.items())
        r = row.results
        diff = f"diverged in clbench: {r['diverged']}" if "diverged" in r else f"{r['max_abs_diff']:.2e}"
        print(f"| {row.label} | `mas` {settings} | MASPlugin | {diff} | {row.note} |", flush=True)


# --- memory methods: seeded ------------------------------------------------------------------------------------

def memory_settings(tasks: int, buffer: int = 200, replay: int = 32, fit_epochs: int = 5,
                    lr: float = 0.1) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """clbench arguments and the mapped Avalanche arguments, per method."""
    gdumb = dict(memory_size=buffer, fit_epochs=fit_epochs, max_lr=lr, min_lr=lr, momentum=0.0, weight_decay=0.0,
                 clip=1e9)
    replayed = {"a-gem": dict(buffer_size=buffer, replay_batch_size=replay),
                "der": dict(alpha=0.5, buffer_size=buffer, replay_batch_size=replay),
                "der++": dict(alpha=0.5, beta=0.5, buffer_size=buffer, replay_batch_size=replay),
                "er-ace": dict(buffer_size=buffer, replay_batch_size=replay)}
    return {
        **{name: (ours, avalanche_args(name, ours, tasks, replay)) for name, ours in replayed.items()},
        "gdumb": (gdumb, dict(mem_size=buffer, train_epochs=fit_epochs)),
        "icarl": (dict(memory_size=buffer), dict(memory_size=buffer, buffer_transform=None, fixed_memory=True)),
        "bic": (dict(memory_size=buffer, val_share=0.1, temperature=2.0),
                dict(mem_size=buffer, val_percentage=0.1, T=2)),
    }


def avalanche_args(strategy: str, args: dict[str, Any], tasks: int, batch_size: int) -> dict[str, Any] | None:
    """Avalanche 0.6 arguments for clbench's ``strategy`` at ``args`` (finetune and the replay-buffer methods), or
    None where there is no counterpart here. A replay batch ``args`` does not give is clbench's default: the
    incoming batch size (A-GEM: 256)."""
    buffer, replay = args.get("buffer_size", 500), args.get("replay_batch_size")
    if strategy == "finetune":
        return {}
    if strategy == "a-gem":
        return dict(patterns_per_exp=buffer // tasks, sample_size=replay or 256)
    if strategy in ("der", "der++"):
        return dict(mem_size=buffer, batch_size_mem=replay or batch_size, alpha=args.get("alpha", 1.0),
                    beta=args.get("beta", 0.5) if strategy == "der++" else 0.0)
    if strategy == "er-ace":
        return dict(mem_size=buffer, batch_size_mem=replay or batch_size)
    return None


def model_for(stream: Stream, seed: int, model_args: dict | None = None) -> torch.nn.Module:
    """The stream's MLP with the initial weights clbench.run builds for ``seed``."""
    torch.manual_seed(seed)
    return build_model(stream.defaults.model, stream.input_shape, stream.num_outputs, **{**stream.defaults.model_args,
                                                                                          **(model_args or MLP)})


def avalanche_acc(stream: Stream, exported, name: str, args: dict, seed: int, lr: float, batch_size: int,
                  epochs: int = 1, optimizer: str = "sgd", model_args: dict | None = None) -> float:
    """Final ACC of Avalanche's strategy for ``name``: mean accuracy over every task's test set after the last."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import AGEM, DER, ER_ACE, BiC, GDumb, ICaRL, Naive
    from avalanche.training.plugins import EvaluationPlugin

    model = model_for(stream, seed, model_args)  # seeds the global generator: Avalanche's draws follow the seed
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer](model.parameters(), lr=lr)
    common = dict(optimizer=opt, train_mb_size=batch_size, train_epochs=epochs, eval_mb_size=1024, device="cpu",
                  evaluator=evaluator)
    ce = torch.nn.CrossEntropyLoss()
    if name == "icarl":  # Avalanche's ICaRL reads the class count of each experience from the benchmark
        exported.n_classes_per_exp = [len(task.classes) for task in stream.tasks]
        exported.classes_order = [c for task in stream.tasks for c in task.classes]
        strategy = ICaRL(feature_extractor=model[:-1], classifier=model[-1], **common, **args)
    else:
        cls = {"finetune": Naive, "a-gem": AGEM, "der": DER, "der++": DER, "er-ace": ER_ACE, "gdumb": GDumb,
               "bic": BiC}[name]
        strategy = cls(model=model, criterion=ce, **{**common, **args})
    for experience in exported.train_stream:
        strategy.train(experience)
    metrics = strategy.eval(exported.test_stream)
    accs = [v for k, v in metrics.items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream")]
    return float(np.mean(accs))


def clbench_acc(stream: Stream, name: str, args: dict, seed: int, lr: float, batch_size: int,
                epochs: int = 1, optimizer: str = "sgd", model_args: dict | None = None) -> float:
    strategy = make_strategy(name, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, **args)
    result = run(stream, strategy, device="cpu", seed=seed, progress=False, model_args=model_args or MLP)
    return float(np.mean(result.R[-1][:len(stream.tasks)]))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p value for the means of ``a`` and ``b``."""
    from scipy.stats import ttest_ind

    if np.std(a) == 0 and np.std(b) == 0:
        return (0.0, 1.0) if np.mean(a) == np.mean(b) else (float("inf"), 0.0)
    t = ttest_ind(a, b, equal_var=False)
    return float(t.statistic), float(t.pvalue)


def verdict(a: list[float], b: list[float]) -> str:
    t, p = welch(a, b)
    return f"t = {t:+.2f}, p = {p:.2f}: " + ("agree within seed noise" if p >= 0.05 else "differ")


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} +- {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def part_memory(stream: Stream, seeds: int, lr: float, batch_size: int, methods: list[str]) -> None:
    exported = stream.to_avalanche()
    settings = memory_settings(len(stream.tasks), lr=lr)
    print(f"| method | clbench ACC ({seeds} seeds) | Avalanche ACC | Welch |\n| --- | --- | --- | --- |")
    for name in methods:
        ours, theirs = settings[name]
        epochs = 0 if name == "gdumb" else 1
        a = [clbench_acc(stream, name, ours, s, lr, batch_size, epochs) for s in range(seeds)]
        b = [avalanche_acc(stream, exported, name, theirs, s, lr, batch_size) for s in range(seeds)]
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {verdict(a, b)} |", flush=True)


# --- Mammoth ---------------------------------------------------------------------------------------------------

MAMMOTH_RUNS = {  # Mammoth model and arguments -> clbench strategy and arguments
    "sgd": ([], "finetune", {}),
    "er": (["--buffer_size", "200", "--minibatch_size", "32"], "replay",
           {"buffer_size": 200, "replay_batch_size": 32}),
    "agem": (["--buffer_size", "200", "--minibatch_size", "32"], "a-gem",
             {"buffer_size": 200, "replay_batch_size": 32}),
    "derpp": (["--buffer_size", "200", "--minibatch_size", "32", "--alpha", "0.5", "--beta", "0.5"], "der++",
              {"buffer_size": 200, "replay_batch_size": 32, "alpha": 0.5, "beta": 0.5}),
    "icarl": (["--buffer_size", "200"], "icarl", {"memory_size": 200}),
    "lwf": (["--alpha", "1", "--softmax_temp", "2"], "lwf", {"alpha": 1.0, "temperature": 2.0}),
    "si": (["--c", "0.5", "--xi", "1.0"], "si", {"c": 0.5, "xi": 1.0}),
    "ewc_on": (["--e_lambda", "10", "--gamma", "1.0"], "ewc-diag", {"form": "online", "strength": 20.0}),
}


def write_mammoth_data(mammoth: Path, train_samples: int | None, test_samples: int | None) -> None:
    """Fashion-MNIST, subsampled as clbench's split stream does with seed 0, where Mammoth's MNIST loader
    (torchvision's, legacy processed files) reads it: ``data/MNIST/{MNIST,MyMNIST}/processed``."""
    stream = make_stream("split-fashion-mnist", scenario="class", train_samples=train_samples,
                         test_samples=test_samples, seed=0)
    train = (torch.cat([t.train_x for t in stream.tasks]), torch.cat([t.train_y for t in stream.tasks]))
    test = (torch.cat([t.test_x for t in stream.tasks]), torch.cat([t.test_y for t in stream.tasks]))
    for folder in ("MNIST", "MyMNIST"):
        out = mammoth / "data" / "MNIST" / folder / "processed"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(tuple(x.contiguous() for x in train), out / "training.pt")
        torch.save(tuple(x.contiguous() for x in test), out / "test.pt")


def mammoth_acc(mammoth: Path, python: str, dataset: str, model: str, extra: list[str], seed: int,
                tasks: int | None, lr: float = 0.1, batch_size: int = 32, epochs: int = 1, threads: int = 1) -> float:
    """Mammoth's final accuracy (percent / 100) from its log line ``Raw accuracy values: Class-IL [...]``."""
    cmd = [python, "main.py", "--dataset", dataset, "--model", model, "--seed", str(seed), "--lr", str(lr),
           "--n_epochs", str(epochs), "--batch_size", str(batch_size), "--non_verbose", "1", "--num_workers", "0",
           *extra]
    if tasks:
        cmd += ["--stop_after", str(tasks)]
    out = subprocess.run(cmd, cwd=mammoth, capture_output=True, text=True, env={"OMP_NUM_THREADS": str(threads),
                                                                                "PATH": "/usr/bin:/bin",
                                                                                "HF_HUB_OFFLINE": "1"})
    lines = [l for l in (out.stdout + out.stderr).splitlines() if "Raw accuracy values" in l]
    if not lines:
        raise RuntimeError(f"Mammoth printed no accuracy for {' '.join(cmd)}:\n{out.stderr[-2000:]}")
    return parse_mammoth(lines[-1])


def parse_mammoth(line: str) -> float:
    """The mean of the first list on a ``Raw accuracy values`` line (Class-IL or Domain-IL), as a fraction."""
    first = re.search(r"\[([^\]]*)\]", line.split("Raw accuracy values:")[-1])
    return float(np.mean([float(v) for v in first.group(1).split(",")])) / 100


def part_mammoth(args) -> None:
    mammoth = Path(args.mammoth) if args.mammoth else None
    if mammoth:
        write_mammoth_data(mammoth, args.mammoth_train, args.mammoth_test)
    sizes = dict(train_samples=args.mammoth_train, test_samples=args.mammoth_test, seed=0)
    protocols = {"seq-mnist": lambda: make_stream("split-fashion-mnist", scenario="class", **sizes),
                 "perm-mnist": lambda: make_stream("permuted-fashion-mnist", tasks=args.perm_tasks, **sizes)}
    print(f"| method | protocol | clbench ACC ({args.mammoth_seeds} seeds) | Mammoth ACC | Welch |\n"
          "| --- | --- | --- | --- | --- |")
    for dataset in args.protocols:
        stream = protocols[dataset]()
        for model in args.mammoth_models:
            extra, name, ours = MAMMOTH_RUNS[model]
            if dataset == "perm-mnist" and model in ("icarl", "lwf"):
                continue  # class-incremental methods
            a = [clbench_acc(stream, name, ours, s, 0.1, 32) for s in range(args.mammoth_seeds)]
            b = [mammoth_acc(mammoth, args.mammoth_python, dataset, model, extra, s,
                             args.perm_tasks if dataset == "perm-mnist" else None)
                 for s in range(args.mammoth_seeds)] if mammoth else []
            print(f"| {name} / {model} | {dataset} | {fmt(a)} | {fmt(b) if b else 'not run'} | "
                  f"{verdict(a, b) if b else ''} |", flush=True)


# --- Mammoth at a suite's protocol and tuned settings ------------------------------------------------------------

def mammoth_args(strategy: str, args: dict[str, Any], batch_size: int) -> tuple[str, list[str], dict[str, Any]] | None:
    """Mammoth's model and flags for a clbench strategy at ``args`` (its tuned and fixed settings), and the
    clbench arguments that run the same method; None where Mammoth has no counterpart."""
    memory = str(args.get("buffer_size", args.get("memory_size", 500)))
    replay = ["--buffer_size", memory, "--minibatch_size", str(args.get("replay_batch_size") or batch_size)]
    if strategy == "finetune":
        return "sgd", [], args
    if strategy == "replay":
        return "er", replay, args
    if strategy == "a-gem":  # clbench's reference batch defaults to 256 (the paper's code), not the batch size
        return "agem", ["--buffer_size", memory, "--minibatch_size", str(args.get("replay_batch_size") or 256)], args
    if strategy == "der":
        return "der", replay + ["--alpha", str(args.get("alpha", 1.0))], args
    if strategy == "der++":
        return "derpp", replay + ["--alpha", str(args.get("alpha", 1.0)), "--beta", str(args.get("beta", 0.5))], args
    if strategy == "er-ace":
        return "er_ace", replay, args
    if strategy == "si":  # Zenke et al.'s c and xi on both sides (clbench's default xi is 1e-3)
        return "si", ["--c", str(args.get("c", 0.1)), "--xi", str(args.get("xi", 1e-3))], args
    if strategy == "lwf":
        return "lwf", ["--alpha", str(args.get("alpha", 1.0)),
                       "--softmax_temp", str(args.get("temperature", 2.0))], args
    if strategy == "ewc-diag":  # Mammoth has the online form only: e_lambda * sum F d^2 = (strength / 2) sum F d^2
        return "ewc_on", ["--e_lambda", str(args["strength"] / 2), "--gamma", "1.0"], {**args, "form": "online"}
    if strategy == "icarl":
        return "icarl", ["--buffer_size", memory], args
    return None


def part_suite(args) -> None:
    """Both sides at a suite's protocol (its model, optimiser, lr, batch and epochs, all training images) and at
    the settings its committed tuning chose (a tuned learning rate included), on the suite's first
    ``--suite-tasks`` tasks."""
    import dataclasses
    import json

    from clbench.experiments import suite as suites

    suite = suites.load(args.suite)
    training = dict(suite.spec.get("training", {}))
    lr, batch, epochs = float(training["lr"]), int(training["batch_size"]), int(training.get("epochs", 1))
    optimizer = training.get("optimizer", "sgd")
    config = suite.streams()[0]
    model_args = {**config.get("model_args", {})} or dict(MLP)
    if args.suite_init:  # e.g. "xavier": Mammoth's MLP initialization on clbench's side too
        model_args["init"] = args.suite_init
    widths = list(model_args.get("widths", MLP["widths"]))
    if len(widths) != 2 or widths[0] != widths[1]:
        raise SystemExit(f"Mammoth's mnistmlp has two hidden layers of one width; the suite's MLP has {widths}")
    dataset = "perm-mnist" if config["stream"] == "permuted-fashion-mnist" else "seq-mnist"
    if dataset == "seq-mnist" and config["stream_args"].get("scenario", "class") != "class":
        raise SystemExit("Mammoth's seq-mnist is class-incremental (with Task-IL accuracy beside it); "
                         f"the suite's scenario is {config['stream_args']['scenario']}")
    mammoth = Path(args.mammoth) if args.mammoth else None
    if mammoth:
        write_mammoth_data(mammoth, None, None)  # every image
    stream_args = {**config["stream_args"], "seed": 0}
    if dataset == "perm-mnist":
        stream_args["tasks"] = args.suite_tasks
    stream = make_stream(config["stream"], **stream_args)
    stream = dataclasses.replace(stream, tasks=stream.tasks[:args.suite_tasks])
    chosen = {}
    for path in sorted((suite.results_dir / "tuning").glob("*.json")):
        t = json.loads(path.read_text())
        chosen[t["strategy"]] = {**t["fixed_args"], **t["chosen"]}
    if args.suite_settings:  # e.g. Mammoth's best_args, in clbench's terms, instead of the suite's tuning
        given = json.loads(Path(args.suite_settings).read_text() if Path(args.suite_settings).is_file()
                           else args.suite_settings)
        for name, settings in given.items():
            chosen[name] = {**suite.strategy_entry(name).get("args", {}), **settings}
    source = "--suite-settings" if args.suite_settings else f"{suite.results_dir.name}/tuning"
    print(f"{suite.name} v{suite.version}: {dataset}, {len(stream.tasks)} tasks, all training images, "
          f"MLP 784-{widths[0]}-{widths[1]}-{stream.num_outputs}, {optimizer}, batch {batch}, {epochs} epoch(s) a "
          f"task, settings from {source}, clbench init {model_args.get('init', 'default')}, "
          f"torch threads {torch.get_num_threads()}\n")
    if args.suite_avalanche:
        part_suite_avalanche(args, stream, chosen, lr, batch, epochs, optimizer, model_args)
        return
    print(f"| clbench / Mammoth | settings | clbench ACC ({args.mammoth_seeds} seeds) | Mammoth ACC | Welch |\n"
          "| --- | --- | --- | --- | --- |", flush=True)
    for name in args.suite_strategies.split(","):
        mapped = mammoth_args(name, chosen.get(name, {}), batch) if name in chosen else None
        if mapped is None:
            print(f"| {name} | - | no committed tuning or no Mammoth counterpart | | |", flush=True)
            continue
        model, extra, ours = mapped
        ours = dict(ours)
        lr_s = float(ours.pop("lr", lr))
        extra = [*extra, "--optimizer", optimizer, "--mlp_hidden_size", str(widths[0])]
        a = [clbench_acc(stream, name, ours, s, lr_s, batch, epochs, optimizer, model_args)
             for s in range(args.mammoth_seeds)]
        b = []
        if mammoth:  # Mammoth's seeds side by side, one process and thread each
            with ThreadPoolExecutor(args.mammoth_jobs) as pool:
                b = list(pool.map(lambda s: mammoth_acc(mammoth, args.mammoth_python, dataset, model, extra, s,
                                                        args.suite_tasks, lr_s, batch, epochs),
                                  range(args.mammoth_seeds)))
        shown = ", ".join(f"{k}={v}" for k, v in sorted({**ours, "lr": lr_s}.items()))
        print(f"| {name} / {model} | {shown} | {fmt(a)} | {fmt(b) if b else 'not run'} | "
              f"{verdict(a, b) if b else ''} |", flush=True)


def part_suite_avalanche(args, stream: Stream, chosen: dict[str, dict], lr: float, batch: int, epochs: int,
                         optimizer: str, model_args: dict) -> None:
    """The suite part against Avalanche 0.6 (``--suite-avalanche``): each side its own seeds, both in this
    process, at the suite's protocol and its tuned settings."""
    exported = stream.to_avalanche()
    print(f"| clbench / Avalanche | settings | clbench ACC ({args.mammoth_seeds} seeds) | Avalanche ACC | Welch |\n"
          "| --- | --- | --- | --- | --- |", flush=True)
    for name in args.suite_strategies.split(","):
        theirs = avalanche_args(name, chosen.get(name, {}), len(stream.tasks), batch) if name in chosen else None
        if theirs is None:
            print(f"| {name} | - | no committed tuning or no Avalanche counterpart in this part | | |", flush=True)
            continue
        ours = dict(chosen[name])
        lr_s = float(ours.pop("lr", lr))
        a = [clbench_acc(stream, name, ours, s, lr_s, batch, epochs, optimizer, model_args)
             for s in range(args.mammoth_seeds)]
        b = [avalanche_acc(stream, exported, name, theirs, s, lr_s, batch, epochs, optimizer, model_args)
             for s in range(args.mammoth_seeds)]
        shown = ", ".join(f"{k}={v}" for k, v in sorted({**ours, "lr": lr_s}.items()))
        print(f"| {name} / {AVALANCHE_NAMES[name]} | {shown} | {fmt(a)} | {fmt(b)} | {verdict(a, b)} |", flush=True)


AVALANCHE_NAMES = {"finetune": "`Naive`", "a-gem": "`AGEM`", "der": "`DER(beta=0)`", "der++": "`DER`",
                   "er-ace": "`ER_ACE`"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="mas,memory", help="comma-separated: mas, memory, mammoth, suite")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the seed of the exact (MAS) comparison")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--methods", default="a-gem,der,der++,er-ace,gdumb,icarl,bic")
    parser.add_argument("--mammoth", help="a Mammoth checkout (its main.py is run, never imported)")
    parser.add_argument("--mammoth-python", default=sys.executable, help="the Python of Mammoth's environment")
    parser.add_argument("--mammoth-models", default="sgd,er,agem,derpp,icarl", type=lambda s: s.split(","))
    parser.add_argument("--mammoth-seeds", type=int, default=3)
    parser.add_argument("--mammoth-train", type=int, default=5000)
    parser.add_argument("--mammoth-test", type=int, default=1000)
    parser.add_argument("--protocols", default="seq-mnist,perm-mnist", type=lambda s: s.split(","),
                        help="Mammoth protocols: seq-mnist (class-IL 5 x 2), perm-mnist")
    parser.add_argument("--perm-tasks", type=int, default=3)
    parser.add_argument("--suite", help="part 'suite': a suite whose protocol and committed tuned settings both "
                                        "sides run (e.g. permuted-fashion-mnist)")
    parser.add_argument("--suite-strategies", default="finetune,ewc-diag,si,replay,a-gem,der++,er-ace")
    parser.add_argument("--suite-init", help="part 'suite': clbench's MLP init (default: the suite's; 'xavier' is "
                                             "Mammoth's Glorot-uniform weights and zero biases)")
    parser.add_argument("--mammoth-jobs", type=int, default=1, help="part 'suite': Mammoth runs at once")
    parser.add_argument("--suite-settings", metavar="JSON",
                        help="part 'suite': settings per strategy instead of the committed tuning's, as JSON or a "
                             "JSON file, e.g. '{\"der++\": {\"lr\": 0.2, \"alpha\": 1.0, \"beta\": 0.5}}' (the "
                             "suite's fixed arguments still apply)")
    parser.add_argument("--suite-avalanche", action="store_true",
                        help="part 'suite': compare with Avalanche 0.6 (finetune and the memory methods; "
                             "--mammoth-seeds seeds a side) instead of Mammoth")
    parser.add_argument("--suite-tasks", type=int, default=2,
                        help="part 'suite': the suite's first N tasks on both sides (Mammoth's --stop_after)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    parts = args.parts.split(",")
    lr, batch_size = 0.1, 32
    if {"mas", "memory", "mammoth"} & set(parts):
        print(f"class-incremental split Fashion-MNIST, {args.train_samples} training images ({args.test_samples} "
              f"test), MLP 784-100-100-10, SGD lr {lr}, batch {batch_size}, 1 epoch, torch threads "
              f"{torch.get_num_threads()}\n")
    if "mas" in parts or "memory" in parts:
        stream = make_stream("split-fashion-mnist", scenario="class", train_samples=args.train_samples,
                             test_samples=args.test_samples, seed=0)
        if "mas" in parts:
            part_mas(stream, args.seed, lr, batch_size)
            print()
        if "memory" in parts:
            part_memory(stream, args.seeds, lr, batch_size, args.methods.split(","))
            print()
    if "mammoth" in parts:
        part_mammoth(args)
    if "suite" in parts:
        part_suite(args)


if __name__ == "__main__":
    main()
