"""Similarity-controlled CIFAR-100 on its 20 superclasses (clbench's image analogue of Hiratani's dials).

Every task has ``classes_per_task`` = K classes read by K shared output units
(domain-incremental; ``scenario="task"`` gives each task its own K units).
Task 1 draws K classes from K different superclasses; class in slot k has
label k. Task t+1 is built from task t:

- input similarity rho_a: round(rho_a K) randomly chosen slots receive a
  *sibling* of the class in that slot (an unused class of the same
  superclass); the other slots receive unused classes from superclasses that
  task t does not use. rho_a = 1: all classes are siblings of the previous
  task's; rho_a = 0: no superclass is shared.
- readout similarity rho_b: of the n sibling slots, round(rho_b n) keep their
  label, i.e. the sibling takes its sibling's output unit; the other sibling
  classes are relabelled by one random cycle among themselves, so none keeps
  its sibling's unit (a single one swaps units with a non-sibling slot, or
  keeps it if every slot is a sibling). Non-sibling classes keep their slot's label.

Each class is used by at most one task; a stream that needs more unused
classes than the 100 (or a superclass's 5) allow is refused.
"""
from __future__ import annotations

import numpy as np
import torch

from clbench.core.errors import ClbenchError, check_unit_interval
from clbench.core.progress import steps
from clbench.core.registry import register_stream
from clbench.core.types import Stream, Task, TrainDefaults
from clbench.data.datasets import load
from clbench.data.transforms import Normalize, RandomCropFlip
from clbench.streams._common import (
    check_positive,
    check_scenario,
    cyclic_derangement,
    subset,
)
from clbench.streams.split import CIFAR_MEAN_STD


def superclass_tasks(coarse_of: np.ndarray, tasks: int, k: int, rho_a: float, rho_b: float,
                     rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per task: (classes by slot, label of each slot, number of sibling slots)."""
    members = {s: list(rng.permutation(np.flatnonzero(coarse_of == s))) for s in np.unique(coarse_of)}

    def take(superclass: int) -> int:
        if not members[superclass]:
            raise ClbenchError(f"superclass {superclass} has no unused class left; ask for fewer tasks, fewer "
                               "classes_per_task or a lower rho_a")
        return int(members[superclass].pop())

    def fresh(exclude: set[int], n: int) -> list[int]:
        pool = [s for s in members if s not in exclude and members[s]]
        if len(pool) < n:
            raise ClbenchError(f"not enough unused superclasses for {n} new classes; ask for fewer tasks or "
                               "classes_per_task")
        return [take(s) for s in rng.choice(pool, size=n, replace=False)]

    classes = np.array(fresh(set(), k))
    labels = np.arange(k)
    out = [(classes, labels, 0)]
    for _ in range(1, tasks):
        previous = {int(coarse_of[c]) for c in classes}
        n_sib = round(rho_a * k)
        sib_slots = rng.choice(k, size=n_sib, replace=False)
        other_slots = np.setdiff1d(np.arange(k), sib_slots)
        new = classes.copy()
        for slot in sib_slots:
            new[slot] = take(int(coarse_of[classes[slot]]))
        new[other_slots] = fresh(previous, len(other_slots))
        labels = np.arange(k)
        moving = rng.permutation(sib_slots)[: n_sib - round(rho_b * n_sib)]
        if len(moving) >= 2:
            source, target = cyclic_derangement(moving, rng)
            labels[target] = source
        elif len(moving) == 1 and len(other_slots):
            partner = rng.choice(other_slots)
            labels[moving[0]], labels[partner] = partner, moving[0]
        classes = new
        out.append((classes, labels, n_sib))
    return out


@register_stream("similar-cifar100")
def similar_cifar100(tasks: int = 5, classes_per_task: int = 5, rho_a: float = 0.5, rho_b: float = 0.5,
                     scenario: str = "domain", augment: bool = True, train_samples: int | None = None,
                     test_samples: int | None = None, root: str | None = None, seed: int = 0) -> Stream:
    """CIFAR-100 tasks whose classes are superclass siblings (rho_a) that keep their sibling's output (rho_b)."""
    rho_a, rho_b = check_unit_interval("rho_a", rho_a), check_unit_interval("rho_b", rho_b)
    check_scenario(scenario, ("domain", "task"))
    check_positive(tasks=tasks, classes_per_task=classes_per_task)
    data = load("cifar100", root)
    coarse_of = np.zeros(100, dtype=np.int64)
    coarse_of[data["train_y"].numpy()] = data["train_coarse"].numpy()
    rng = np.random.default_rng(seed)
    plan = superclass_tasks(coarse_of, tasks, classes_per_task, rho_a, rho_b, rng)
    train_x, train_y = subset(data["train_x"], data["train_y"], train_samples, rng, "train_samples",
                              "cifar100's training set")
    test_x, test_y = subset(data["test_x"], data["test_y"], test_samples, rng, "test_samples",
                            "cifar100's test set")
    task_list = []
    building = f"building similar-cifar100 ({tasks} tasks)"
    for t, (classes, labels, n_sib) in steps(enumerate(plan), len(plan), building):
        label_of = torch.full((100,), -1, dtype=torch.long)
        label_of[torch.from_numpy(classes)] = torch.from_numpy(labels)
        cls = torch.from_numpy(classes)
        tr, te = torch.isin(train_y, cls), torch.isin(test_y, cls)
        k = classes_per_task
        task_list.append(Task(
            id=t, train_x=train_x[tr], train_y=label_of[train_y[tr]], test_x=test_x[te], test_y=label_of[test_y[te]],
            transform=Normalize(*CIFAR_MEAN_STD["cifar100"]), augment=RandomCropFlip() if augment else None,
            head=torch.arange(k * t, k * t + k) if scenario == "task" else None, classes=classes.tolist(),
            metadata={"classes": classes.tolist(), "labels": labels.tolist(), "sibling_slots": n_sib,
                      "superclasses": coarse_of[classes].tolist()}))
    return Stream(
        name="similar-cifar100", tasks=task_list, scenario=scenario, loss="ce", input_shape=(3, 32, 32),
        num_outputs=classes_per_task * (tasks if scenario == "task" else 1),
        defaults=TrainDefaults(model="resnet18-reduced", epochs=1, batch_size=32, lr=0.03),
        provenance={"dataset": "cifar100", "tasks": tasks, "classes_per_task": classes_per_task, "rho_a": rho_a,
                    "rho_b": rho_b, "scenario": scenario, "seed": seed, "train_samples": len(train_x),
                    "test_samples": len(test_x), "data": data["source"]})
