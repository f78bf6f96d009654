"""iCaRL: exemplars chosen by herding, distillation through sigmoids, nearest-mean-of-exemplars classification.

Rebuffi, Kolesnikov, Sperl & Lampert, "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017
(Algorithms 1-5)::

    features phi(x): the input of the output layer, L2-normalised
    train on task t (classes s..t):  D = task data + all exemplars; q = sigmoid(old model(x)) for every x in D
        loss = sum over seen classes y of BCE(sigmoid(f_y(x)), target_y),
               target_y = [y == label] for the new classes, q_y for the old ones          (Alg. 3)
    after task t:  m = K / (classes seen)
        every old class: keep its first m exemplars                                     (Alg. 5)
        every new class: mu = mean phi(x); for k = 1..m:
            p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||                  (herding, Alg. 4)
        mu_y = normalised mean of phi over class y's exemplars
    classify:  y* = argmin_y || phi(x) - mu_y ||                                         (Alg. 1)

The BCE is averaged over samples and classes, as the authors' code does (their lr 2.0 goes with that). Herding
picks every sample at most once, and its target mu is the plain mean of the normalised features (the
authors' code), while the class means used to classify are re-normalised (Sec. 2.1). Before any exemplar
exists (row 0 of R) the network's own outputs classify. Class- and task-incremental (on a task-incremental
stream the nearest mean is taken over the task's classes). Default memory K = 2000, the paper's CIFAR-100
setting; a suite fixes its own. The paper's schedule (70 epochs, lr 2.0 divided by 5 at 49 and 63, ResNet-32)
is not imposed: training settings come from the stream or suite like every other strategy's.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from clbench.core.class_buffer import ClassBalancedBuffer, as_units, herding, task_units, with_samples
from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Stream, Task
from clbench.models.features import penultimate


@torch.no_grad()
def normalised_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """phi(x): the model's penultimate features, L2-normalised, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([F.normalize(penultimate(model, x[i:i + batch_size]).float(), dim=1)
                          for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def update_exemplars(memory: ClassBalancedBuffer, model: torch.nn.Module, task: Task, seen_units: list[int],
                     x: torch.Tensor | None = None, units: torch.Tensor | None = None) -> int:
    """iCaRL's exemplar management after ``task``: shrink every class to m = K / len(seen_units), then herd m
    exemplars of each of the task's classes from its training inputs ``x`` (default: all of them) with output
    units ``units``. Returns m."""
    m = memory.capacity // len(seen_units)
    if m < 1:
        raise ClbenchError(f"memory_size={memory.capacity} is smaller than the {len(seen_units)} classes seen: "
                           "every class needs at least one exemplar; raise memory_size")
    if x is None:
        x, units = task.inputs(task.train_x), as_units(task, task.train_y)
    memory.keep_first(m)
    for c in task_units(task):
        xc = x[units == c]
        if len(xc):
            memory.put(c, xc[herding(normalised_features(model, xc), m)], task.id)
    return m


def exemplar_means(memory: ClassBalancedBuffer, model: torch.nn.Module, num_outputs: int) -> torch.Tensor:
    """mu_y (num_outputs, d): the re-normalised mean of phi over each class's exemplars; NaN rows for classes
    without exemplars."""
    x, y, _ = memory.data()
    phi = normalised_features(model, x)
    means = torch.full((num_outputs, phi.shape[1]), float("nan"), device=phi.device)
    for c in memory.classes():
        means[c] = F.normalize(phi[y == c].mean(0), dim=0)
    return means


def nearest_mean_scores(phi: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """-||phi - mu_y||^2 for every class (-inf for classes without a mean): the argmax is the nearest mean."""
    known = ~means.isnan().any(1)
    mu = torch.where(known[:, None], means, torch.zeros_like(means))
    dist = phi.pow(2).sum(1, keepdim=True) - 2 * phi @ mu.T + mu.pow(2).sum(1)
    return (-dist).masked_fill(~known, float("-inf"))


@register_strategy("icarl")
class ICaRL(Strategy):
    """iCaRL: herding exemplars (memory K split evenly over classes), sigmoid distillation, nearest-mean-of-exemplars (Rebuffi et al. 2017)."""

    scenarios = ("class", "task")
    # memory_size is a budget fixed by the suite, and iCaRL's loss has no weight to tune: nothing to search
    search_space = {}

    def __init__(self, memory_size: int = 2000, **train) -> None:
        super().__init__(**train)
        self.memory = ClassBalancedBuffer(memory_size)
        self.old: torch.nn.Module | None = None
        self.seen_units: list[int] = []
        self.means: torch.Tensor | None = None

    def setup(self, model: torch.nn.Module, stream: Stream) -> torch.nn.Module:
        model = super().setup(model, stream)
        if stream.loss != "ce":
            raise ClbenchError(f"icarl classifies by nearest class mean: it needs a classification stream, and "
                               f"{stream.name!r} is a regression (mse) stream; pick a classification stream")
        return model

    def before_task(self, task: Task) -> None:
        self.old_units = torch.tensor(self.seen_units, dtype=torch.long, device=task.train_x.device)
        self.units = torch.tensor(sorted(set(self.seen_units) | set(task_units(task))), dtype=torch.long,
                                  device=task.train_x.device)
        self.old_positions = torch.searchsorted(self.units, self.old_units)  # where the old units sit in self.units

    def train_tasks(self, task: Task, seen: list[Task]) -> list[Task]:
        """D = the task's data plus every exemplar (Alg. 3), as one training set."""
        x, units = task.inputs(task.train_x), as_units(task, task.train_y)
        if len(self.memory):
            mx, my, _ = self.memory.data()
            x, units = torch.cat([x, mx]), torch.cat([units, my])
        return [with_samples(task, x, units)]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        logits = self.model(x).index_select(1, self.units).float()
        target = (y[:, None] == self.units[None]).float()
        if self.old is not None and len(self.old_units):
            with torch.no_grad():
                q = torch.sigmoid(self.old(x).index_select(1, self.old_units).float())
            target[:, self.old_positions] = q
        return F.binary_cross_entropy_with_logits(logits, target)

    def after_task(self, task: Task) -> None:
        self.seen_units = sorted(set(self.seen_units) | set(task_units(task)))
        update_exemplars(self.memory, self.model, task, self.seen_units)
        self.means = exemplar_means(self.memory, self.model, self.stream.num_outputs)
        self.old = copy.deepcopy(self.model).eval()
        for p in self.old.parameters():
            p.requires_grad_(False)

    def predict(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        """Nearest mean of exemplars: scores -||phi(x) - mu_y||^2 (the network's outputs before any exemplar)."""
        scores = self.model(x) if self.means is None else nearest_mean_scores(
            normalised_features(self.model, x), self.means)
        return scores if task.head is None else scores.index_select(1, task.head)

    def extra_results(self) -> dict[str, Any]:
        return {"memory_size": self.memory.capacity, "memory_samples": len(self.memory)}
