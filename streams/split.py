"""Split streams: a dataset's classes dealt out to tasks (Zenke et al. 2017; Lopez-Paz & Ranzato 2017).

Split MNIST / Fashion-MNIST and split CIFAR-10: 5 tasks of 2 classes; split
CIFAR-100: 10 tasks of 10 classes by default (any divisor of 100). Class order
is 0, 1, 2, ... unless ``shuffle_classes`` (seeded). ``scenario="class"``: one
head over all classes, no task id at test; ``scenario="task"``: each task
reads only its own classes' output units; ``scenario="domain"``: one shared
head of ``classes_per_task`` units, a sample's target its class's position in
its task (split MNIST's "is it the first or second digit", Hsu et al. 2018;
van de Ven & Tolias 2019), no task id at test.
"""
from __future__ import annotations

import numpy as np
import torch

from clbench.core.errors import ClbenchError
from clbench.core.registry import register_stream
from clbench.core.types import Stream, Task, TrainDefaults
from clbench.data.datasets import DATASETS, load
from clbench.data.transforms import Normalize, RandomCropFlip, Scale
from clbench.streams._common import check_positive, check_scenario, subset

CIFAR_MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def split(dataset: str, classes_per_task: int, scenario: str = "class", shuffle_classes: bool = False,
          augment: bool = False, train_samples: int | None = None, test_samples: int | None = None,
          root: str | None = None, seed: int = 0) -> Stream:
    """Deal a dataset's classes to tasks of ``classes_per_task`` classes each."""
    check_scenario(scenario, ("class", "task", "domain"))
    check_positive(classes_per_task=classes_per_task)
    n_classes = DATASETS[dataset].classes
    if n_classes % classes_per_task:
        raise ClbenchError(f"classes_per_task must divide {n_classes} for {dataset}, got {classes_per_task}")
    data = load(dataset, root)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_classes) if shuffle_classes else np.arange(n_classes)
    train_x, train_y = subset(data["train_x"], data["train_y"], train_samples, rng, "train_samples",
                              f"{dataset}'s training set")
    test_x, test_y = subset(data["test_x"], data["test_y"], test_samples, rng, "test_samples",
                            f"{dataset}'s test set")
    is_cifar = dataset.startswith("cifar")
    transform = Normalize(*CIFAR_MEAN_STD[dataset]) if is_cifar else Scale()
    task_list = []
    for t in range(n_classes // classes_per_task):
        classes = order[t * classes_per_task:(t + 1) * classes_per_task]
        cls = torch.from_numpy(classes)
        tr, te = torch.isin(train_y, cls), torch.isin(test_y, cls)
        head = cls if scenario == "task" else None
        # task- and domain-incremental targets are positions in the task; class-incremental ones the class ids
        remap = torch.full((n_classes,), -1, dtype=torch.long)
        remap[cls] = cls if scenario == "class" else torch.arange(len(cls))
        task_list.append(Task(id=t, train_x=train_x[tr], train_y=remap[train_y[tr]], test_x=test_x[te],
                              test_y=remap[test_y[te]], transform=transform,
                              augment=RandomCropFlip() if (augment and is_cifar) else None, head=head,
                              classes=None if scenario == "domain" else classes.tolist(),
                              metadata={"classes": classes.tolist()}))
    defaults = (TrainDefaults(model="resnet18-reduced", epochs=1, batch_size=32, lr=0.03, optimizer="sgd") if is_cifar
                else TrainDefaults(model="mlp", model_args={"widths": (400, 400)}, epochs=1, batch_size=128, lr=0.05))
    shape = (3, 32, 32) if is_cifar else (1, 28, 28)
    return Stream(name=f"split-{dataset}", tasks=task_list, scenario=scenario, loss="ce", input_shape=shape,
                  num_outputs=classes_per_task if scenario == "domain" else n_classes, defaults=defaults,
                  provenance={"dataset": dataset, "classes_per_task": classes_per_task, "class_order": order.tolist(),
                              "scenario": scenario, "augment": augment, "seed": seed,
                              "train_samples": len(train_x), "test_samples": len(test_x),
                              "data": data["source"]})


@register_stream("split-mnist")
def split_mnist(scenario: str = "class", shuffle_classes: bool = False, train_samples: int | None = None,
                test_samples: int | None = None, root: str | None = None, seed: int = 0) -> Stream:
    """Split MNIST: 5 tasks of 2 digits, class-, task- or domain-incremental."""
    return split("mnist", 2, scenario, shuffle_classes, False, train_samples, test_samples, root, seed)


@register_stream("split-fashion-mnist")
def split_fashion_mnist(scenario: str = "class", shuffle_classes: bool = False, train_samples: int | None = None,
                        test_samples: int | None = None, root: str | None = None, seed: int = 0) -> Stream:
    """Split Fashion-MNIST: 5 tasks of 2 classes, class-, task- or domain-incremental."""
    return split("fashion-mnist", 2, scenario, shuffle_classes, False, train_samples, test_samples, root, seed)


@register_stream("split-cifar10")
def split_cifar10(scenario: str = "class", shuffle_classes: bool = False, augment: bool = True,
                  train_samples: int | None = None, test_samples: int | None = None, root: str | None = None,
                  seed: int = 0) -> Stream:
    """Split CIFAR-10: 5 tasks of 2 classes, class- or task-incremental; crop+flip augmentation on the device."""
    return split("cifar10", 2, scenario, shuffle_classes, augment, train_samples, test_samples, root, seed)


@register_stream("split-cifar100")
def split_cifar100(classes_per_task: int = 10, scenario: str = "class", shuffle_classes: bool = False,
                   augment: bool = True, train_samples: int | None = None, test_samples: int | None = None,
                   root: str | None = None, seed: int = 0) -> Stream:
    """Split CIFAR-100: tasks of classes_per_task classes (default 10 x 10), class- or task-incremental."""
    return split("cifar100", classes_per_task, scenario, shuffle_classes, augment, train_samples, test_samples,
                 root, seed)
