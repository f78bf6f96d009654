"""Permuted MNIST / Fashion-MNIST / KMNIST with separate input and readout similarity.

Input similarity rho_a: task 1 sees the images as they are; each next task
takes the previous task's pixel order and re-shuffles k = round(784 (1 - rho_a))
randomly chosen pixels among themselves as one random cycle, so none of them
keeps its place. Exactly a 1 - rho_a share of pixels moves between
consecutive tasks (k = 1 cannot move alone and is left in place). rho_a = 0 is
the classic fully permuted stream, rho_a = 1 repeats the input.

Readout similarity rho_b (Hiratani, NeurIPS 2024), two readouts:

- ``readout="classification"``: each class keeps its label with probability
  rho_b; the others are permuted among themselves as one random cycle (when a
  single class is drawn to move, two move or none, with equal odds, so the kept
  share stays rho_b in expectation). Cross-entropy.
- ``readout="latent"``: the latent s = 4-bit binary code of the class minus 0.5;
  target y = B s with B (10 x 4) N(0, 1); the next task keeps each entry of B
  with probability rho_b and redraws the rest: B' = G*B + (1-G)*B~,
  G ~ Bernoulli(rho_b). MSE; score 1 - error/error_at_init.

Options for Hiratani's own settings (pm/pm_data.py): ``permutation="derangement"``
(any derangement of the chosen pixels instead of one cycle) and ``first_task="permuted"``
(task 1 is itself a partial permutation of the raw images by rho_a, instead of
the raw images).

Scenarios: ``domain`` (one shared head; the task id is not an input) or
``task`` (one head of 10 outputs per task).
"""
from __future__ import annotations

import numpy as np
import torch

from clbench.core.errors import ClbenchError, check_unit_interval
from clbench.core.progress import steps
from clbench.core.registry import register_stream
from clbench.core.types import Stream, Task, TrainDefaults
from clbench.data.datasets import load
from clbench.data.transforms import PixelPermutation
from clbench.streams._common import (
    check_positive,
    check_scenario,
    cyclic_derangement,
    subset,
)

PIXELS = 784


def next_permutation(perm: np.ndarray, rho_a: float, rng: np.random.Generator, kind: str = "cycle") -> np.ndarray:
    """Re-shuffle round(784 (1 - rho_a)) randomly chosen positions of ``perm`` as a derangement: one random
    cycle (``kind="cycle"``), or any derangement, drawn uniformly by redrawing a random permutation until no
    chosen pixel stays (``"derangement"``, as Hiratani's pm/pm_data.py)."""
    k = round(PIXELS * (1 - rho_a))
    new = perm.copy()
    if k >= 2:
        chosen = rng.choice(PIXELS, size=k, replace=False)
        if kind == "cycle":
            source, target = cyclic_derangement(chosen, rng)
        else:
            order = rng.permutation(k)
            while np.any(order == np.arange(k)):
                order = rng.permutation(k)
            source, target = chosen[order], chosen
        new[target] = perm[source]
    return new


def next_label_map(labels: np.ndarray, rho_b: float, rng: np.random.Generator) -> np.ndarray:
    """Each class keeps its label with probability rho_b; the rest are deranged among themselves."""
    moving = np.flatnonzero(rng.random(len(labels)) >= rho_b)
    if len(moving) == 1:  # one class cannot move alone: move two or none, keeping the expectation
        moving = np.append(moving, rng.choice(np.setdiff1d(np.arange(len(labels)), moving))) if rng.random() < 0.5 \
            else moving[:0]
    new = labels.copy()
    if len(moving) >= 2:
        source, target = cyclic_derangement(moving, rng)
        new[target] = labels[source]
    return new


def latent_codes(classes: int = 10, bits: int = 4) -> torch.Tensor:
    """(classes, bits): the binary code of each class minus 0.5 (Hiratani 2024)."""
    c = torch.arange(classes).unsqueeze(1)
    return ((c >> torch.arange(bits - 1, -1, -1)) & 1).float() - 0.5


def permuted(dataset: str, tasks: int = 5, rho_a: float = 0.0, rho_b: float = 1.0, readout: str = "classification",
             scenario: str = "domain", train_samples: int | None = None, test_samples: int | None = None,
             root: str | None = None, seed: int = 0, permutation: str = "cycle", first_task: str = "raw") -> Stream:
    """Permuted-pixel stream of an IDX dataset with input (rho_a) and readout (rho_b) similarity."""
    if permutation not in ("cycle", "derangement"):
        raise ClbenchError(f"permutation must be 'cycle' or 'derangement', got {permutation!r}")
    if first_task not in ("raw", "permuted"):
        raise ClbenchError(f"first_task must be 'raw' or 'permuted', got {first_task!r}")
    rho_a, rho_b = check_unit_interval("rho_a", rho_a), check_unit_interval("rho_b", rho_b)
    check_scenario(scenario, ("domain", "task"))
    check_positive(tasks=tasks)
    if readout not in ("classification", "latent"):
        raise ClbenchError(f"readout must be 'classification' or 'latent', got {readout!r}")
    data = load(dataset, root)
    rng = np.random.default_rng(seed)
    train_x, train_y = subset(data["train_x"], data["train_y"], train_samples, rng, "train_samples",
                              f"{dataset}'s training set")
    test_x, test_y = subset(data["test_x"], data["test_y"], test_samples, rng, "test_samples",
                            f"{dataset}'s test set")
    codes = latent_codes()
    perm, labels = np.arange(PIXELS), np.arange(10)
    B = torch.from_numpy(rng.standard_normal((10, 4))).float()
    task_list = []
    for t in steps(range(tasks), tasks, f"building permuted-{dataset} ({tasks} tasks)"):
        if t > 0 or first_task == "permuted":
            perm = next_permutation(perm, rho_a, rng, permutation)
        if t > 0:
            if readout == "classification":
                labels = next_label_map(labels, rho_b, rng)
            else:
                keep = torch.from_numpy(rng.random((10, 4)) < rho_b)
                B = torch.where(keep, B, torch.from_numpy(rng.standard_normal((10, 4))).float())
        if readout == "classification":
            lab = torch.from_numpy(labels)
            ytr, yte = lab[train_y], lab[test_y]
        else:
            table = codes @ B.T  # (10 classes, 10 outputs)
            ytr, yte = table[train_y], table[test_y]
        task_list.append(Task(
            id=t, train_x=train_x, train_y=ytr, test_x=test_x, test_y=yte,
            transform=PixelPermutation(torch.from_numpy(perm)),
            head=torch.arange(10 * t, 10 * t + 10) if scenario == "task" else None,
            metadata={"permutation": perm.copy(), "label_map": labels.copy(), "readout_matrix": B.clone(),
                      "rho_a": rho_a, "rho_b": rho_b},
        ))
    loss = "ce" if readout == "classification" else "mse"
    defaults = TrainDefaults(model="mlp", model_args={"widths": (400, 400)}, epochs=1, batch_size=128,
                             lr=0.05 if loss == "ce" else 0.01, optimizer="sgd")
    return Stream(
        name=f"permuted-{dataset}", tasks=task_list, scenario=scenario, loss=loss, input_shape=(1, 28, 28),
        num_outputs=10 * tasks if scenario == "task" else 10, defaults=defaults,
        provenance={"dataset": dataset, "tasks": tasks, "rho_a": rho_a, "rho_b": rho_b, "readout": readout,
                    "scenario": scenario, "train_samples": len(train_x), "test_samples": len(test_x), "seed": seed,
                    "data": data["source"], "permutation": permutation, "first_task": first_task},
    )


@register_stream("permuted-mnist")
def permuted_mnist(tasks: int = 5, rho_a: float = 0.0, rho_b: float = 1.0, readout: str = "classification",
                   scenario: str = "domain", train_samples: int | None = None, test_samples: int | None = None,
                   root: str | None = None, seed: int = 0,
                   permutation: str = "cycle", first_task: str = "raw") -> Stream:
    """Permuted MNIST with input (rho_a) and readout (rho_b) similarity; classic = rho_a 0, rho_b 1."""
    return permuted("mnist", tasks, rho_a, rho_b, readout, scenario, train_samples, test_samples, root, seed,
                    permutation, first_task)


@register_stream("permuted-fashion-mnist")
def permuted_fashion_mnist(tasks: int = 5, rho_a: float = 0.0, rho_b: float = 1.0, readout: str = "classification",
                           scenario: str = "domain", train_samples: int | None = None,
                           test_samples: int | None = None, root: str | None = None, seed: int = 0,
                           permutation: str = "cycle", first_task: str = "raw") -> Stream:
    """Permuted Fashion-MNIST with input (rho_a) and readout (rho_b) similarity."""
    return permuted("fashion-mnist", tasks, rho_a, rho_b, readout, scenario, train_samples, test_samples, root, seed,
                    permutation, first_task)


@register_stream("permuted-kmnist")
def permuted_kmnist(tasks: int = 5, rho_a: float = 0.0, rho_b: float = 1.0, readout: str = "classification",
                    scenario: str = "domain", train_samples: int | None = None, test_samples: int | None = None,
                    root: str | None = None, seed: int = 0,
                    permutation: str = "cycle", first_task: str = "raw") -> Stream:
    """Permuted KMNIST with input (rho_a) and readout (rho_b) similarity."""
    return permuted("kmnist", tasks, rho_a, rho_b, readout, scenario, train_samples, test_samples, root, seed,
                    permutation, first_task)
