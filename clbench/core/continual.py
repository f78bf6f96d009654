"""Continual evaluation: scores every K training steps on a fixed subsample of each task's test set.

De Lange, van de Ven & Tuytelaars, "Continual evaluation for lifelong learning: identifying the stability
gap" (ICLR 2023) evaluate every K iterations (1000 samples a task) and find that old tasks' accuracy
collapses when a new task starts, then partly recovers. The engine calls :class:`Recorder` from its loop:

- before training (step 0), then after every ``eval_every``-th optimizer step (counted over the whole run),
  and once at the end of every task (after its ``after_task`` hook, as R's rows are);
- at a step of task i (0-based) it scores tasks 0..i+1: every task seen so far and the next one;
- on a subsample of each test set fixed by the run seed (:func:`subsample`), so every strategy run with
  that seed sees the same samples;
- the inputs are transformed once and, when the strategy's forward ignores the task (no gating, no
  task-specific modules), all tasks' subsets go through the model in one forward (chunked at
  ``CHUNK_ELEMENTS`` input numbers); otherwise one forward per task. No gradient, inference mode, and
  no host sync: the scores stay on the device until the run ends.

Scores are on R's scale: accuracy, or for regression 1 - error/error_at_init with the error of the
untrained model on the same subsample. The metrics of the curves are in :mod:`clbench.core.metrics`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from clbench.core.errors import ClbenchError, unknown_key
from clbench.core.strategy import Strategy
from clbench.core.types import Task

EVAL_SAMPLES = 1000
CONTINUAL_KEYS = ("eval_every", "eval_samples")  # a sweep's or suite's [continual] table
CHUNK_ELEMENTS = 2**23  # model-input numbers a forward holds (32 MB of float32)


def check_options(eval_every: Any, eval_samples: Any) -> tuple[int | None, int]:
    """``(eval_every, eval_samples)`` checked: None/0 turns continual evaluation off."""
    def whole(name: str, value: Any, low: int) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ClbenchError(f"{name} must be a whole number >= {low} (e.g. {name}=50), got {value!r}")
        return value

    every = None if eval_every in (None, 0) else whole("eval_every", eval_every, 1)
    return every, whole("eval_samples", EVAL_SAMPLES if eval_samples is None else eval_samples, 1)


def continual_options(table: Any, source: str = "the sweep") -> dict[str, int]:
    """A ``[continual]`` table checked: ``{eval_every, eval_samples}`` for ``clbench.run``, or {} when off."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ClbenchError(f"{source}: [continual] must be a table such as {{ eval_every = 50 }}; got {table!r}")
    for key in table:
        if key not in CONTINUAL_KEYS:
            raise unknown_key(key, CONTINUAL_KEYS, f"{source}: [continual]")
    if "eval_every" not in table:
        raise ClbenchError(f"{source}: [continual] needs eval_every = K (training steps between evaluations)")
    try:
        every, samples = check_options(table["eval_every"], table.get("eval_samples"))
    except ClbenchError as e:
        raise ClbenchError(f"{source}: [continual] {e}") from None
    return {"eval_every": every, "eval_samples": samples} if every else {}


def subsample(n: int, k: int, seed: int, task: int) -> np.ndarray:
    """Sorted indices of ``min(n, k)`` of a task's ``n`` test samples, drawn from (seed, task) alone."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(task), 0xCE7A1]).permutation(n)[:k])


def subsamples(sizes: list[int], k: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The evaluated samples of every task (test-set sizes ``sizes``) of a run with ``seed``, as index tensors:
    what both the engine's and the batched path's curves score."""
    return [torch.as_tensor(subsample(n, k, seed, j), device=device) for j, n in enumerate(sizes)]


def evaluated(i: int, T: int) -> int:
    """How many tasks (a prefix) an evaluation during task ``i`` (0-based) scores: the seen ones and the next."""
    return min(i + 2, T)


class Curves:
    """When to evaluate, which tasks, on what scale, and the rows recorded; ``to_dict()`` is what a Result stores.

    A subclass supplies :meth:`raw`, the accuracy or error of tasks 0..n-1, shaped (n,) for one run or (B, n)
    for B members trained in lockstep (clbench.batched.continual); it calls ``super().__init__`` once its
    data is ready and before training: for regression streams the untrained model's error is measured then,
    the normaliser of every later score.
    """

    def __init__(self, T: int, loss: str, eval_every: int, eval_samples: int) -> None:
        self.T, self.loss, self.every, self.samples = T, loss, eval_every, eval_samples
        self.steps: list[int] = []
        self.rows: list[torch.Tensor] = []
        self.boundaries: list[int] = []
        self.init = self.raw(T) if loss == "mse" else None

    def raw(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def start_task(self, step: int) -> None:
        """Task ``len(boundaries)`` starts at global step ``step``."""
        self.boundaries.append(int(step))

    def due(self, step: int, task_end: int) -> bool:
        """A periodic evaluation after ``step``; the task's last step is left to the end-of-task one."""
        return step % self.every == 0 and step != task_end

    def record(self, step: int, i: int) -> None:
        """Score tasks 0..i+1 now, as global step ``step`` of task ``i``; a second record at the same step
        replaces the first (the end of a task with no training steps)."""
        n = evaluated(i, self.T)
        raw = self.raw(n)
        score = raw if self.loss == "ce" else 1.0 - raw / self.init[..., :n]
        row = torch.full((*score.shape[:-1], self.T), float("nan"), dtype=torch.float64, device=raw.device)
        row[..., :n] = score
        if self.steps and self.steps[-1] == step:
            self.steps.pop()
            self.rows.pop()
        self.steps.append(int(step))
        self.rows.append(row)

    def to_dict(self, member: int | None = None) -> dict[str, Any]:
        """``step`` (n_eval), ``score`` (n_eval x T, NaN where not evaluated), ``boundaries`` (the step at which
        each task started), the options, and for regression the untrained model's ``error_at_init``; of
        member ``member`` when the rows hold several."""
        pick = (lambda t: t) if member is None else (lambda t: t[..., member, :])  # noqa: E731
        score = pick(torch.stack(self.rows)).cpu().numpy() if self.rows else np.zeros((0, self.T))
        out = {"eval_every": self.every, "eval_samples": self.samples, "step": list(self.steps),
               "score": score.tolist(), "boundaries": list(self.boundaries)}
        if self.init is not None:
            out["error_at_init"] = pick(self.init).cpu().tolist()
        return out


class Recorder(Curves):
    """The engine's curves: one strategy's model on its own tasks' subsamples.

    Create it after ``strategy.setup`` and before training.
    """

    def __init__(self, strategy: Strategy, tasks: list[Task], loss: str, eval_every: int, eval_samples: int,
                 seed: int) -> None:
        self.strategy, self.tasks = strategy, tasks
        with torch.inference_mode():
            picks = subsamples([len(t.test_x) for t in tasks], eval_samples, seed, tasks[0].test_x.device)
            self.x = [t.inputs(t.test_x[p]) for t, p in zip(tasks, picks)]
            self.y = [t.test_y[p] for t, p in zip(tasks, picks)]
        sizes = [len(y) for y in self.y]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        cls = type(strategy)
        # one forward for every task: the forward must not read the task (heads are selected afterwards)
        self.shared = (cls.forward is Strategy.forward and cls.predict is Strategy.predict
                       and len({(tuple(x.shape[1:]), x.dtype) for x in self.x}) == 1
                       and len({(tuple(y.shape[1:]), y.dtype) for y in self.y}) == 1)
        if self.shared:
            self.x_all, self.y_all = torch.cat(self.x), torch.cat(self.y)
            self.task_of = torch.repeat_interleave(torch.arange(len(tasks), device=self.x_all.device),
                                                   torch.tensor(sizes, device=self.x_all.device))
            self.sizes = torch.tensor(sizes, device=self.x_all.device, dtype=torch.float64)
        super().__init__(len(tasks), loss, eval_every, eval_samples)

    @torch.inference_mode()
    def raw(self, n: int) -> torch.Tensor:
        """Accuracy or mean squared error of tasks 0..n-1 on their subsamples, (n,) float64 on the device."""
        model = self.strategy.model
        was_training = model.training
        model.eval()
        try:
            if self.shared:
                end = self.offsets[n]
                per = max(1, CHUNK_ELEMENTS // max(1, self.x_all[0].numel()))
                out = torch.cat([self.strategy.forward(self.x_all[a:min(a + per, end)], self.tasks[0])
                                 for a in range(0, end, per)])
                if all(t.head is None for t in self.tasks[:n]):
                    hit = hits(out, self.y_all[:end], self.loss)
                    total = torch.zeros(n, dtype=torch.float64, device=out.device).index_add_(
                        0, self.task_of[:end], hit)
                    return total / self.sizes[:n]
                outs = [out[self.offsets[j]:self.offsets[j + 1]] for j in range(n)]
                outs = [o if t.head is None else o.index_select(1, t.head) for o, t in zip(outs, self.tasks)]
            else:
                outs = []
                for j in range(n):
                    per = max(1, CHUNK_ELEMENTS // max(1, self.x[j][0].numel()))
                    outs.append(torch.cat([self.strategy.predict(self.x[j][a:a + per], self.tasks[j])
                                           for a in range(0, len(self.x[j]), per)]))
            return torch.stack([hits(o, y, self.loss).mean() for o, y in zip(outs, self.y)])
        finally:
            model.train(was_training)


def hits(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per sample (the last dimension of ``out`` holds the outputs): 1 for a correct class (classification),
    else the squared error averaged over outputs; float64."""
    out = out.float()
    if loss == "ce":
        return (out.argmax(-1) == y).double()
    return ((out - y) ** 2).mean(-1).double()
