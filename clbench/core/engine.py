"""The evaluation loop: train task after task, evaluate every task after each.

Each task's data lives on the device as one tensor; batches are index slices
and the task transform runs on the device. No DataLoader in the hot loop, and
one host sync per epoch (for the NaN check and the loss curve).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from clbench.core import continual, metrics
from clbench.core.errors import ClbenchError
from clbench.core.io import atomic_write
from clbench.core.registry import build_model
from clbench.core.strategy import Strategy, count_parameters
from clbench.core.types import Stream, Task


@dataclass
class Result:
    """Everything a run produced. ``R`` is the (T+1) x T score matrix (see clbench.core.metrics);
    ``extra["raw"]`` the same matrix before scoring (accuracy, or the mean squared error for regression)."""

    R: list[list[float]]
    metrics: dict[str, float]
    loss_curves: list[list[float]]
    wall_time_s: float
    peak_memory_mb: float
    parameter_count: int
    config: dict[str, Any]
    seed: int
    versions: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    #: continual evaluation (``run(eval_every=K)``): see clbench.core.continual.Recorder.to_dict; else None
    curves: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, then rename; see clbench.core.io.atomic_write)."""
        atomic_write(path, self.json_text())

    def json_text(self) -> str:
        """The result as JSON (non-finite numbers as null)."""
        return json.dumps(finite_json(self.to_dict()), indent=1)


class TrainingDiverged(ClbenchError):
    """The loss became NaN or infinite; ``partial`` holds the rows of R computed so far."""

    def __init__(self, message: str, partial: Result) -> None:
        super().__init__(message)
        self.partial = partial

    def __reduce__(self):  # picklable, so sweep workers (processes, Ray tasks) can send it back
        return type(self), (str(self), self.partial)


def seed_torch(seed: int, dev: torch.device) -> None:
    """torch.manual_seed(seed); on a machine without CUDA, for a CPU run, only the CPU generator (what
    manual_seed seeds there), skipping the lazily queued CUDA seeding that records a traceback (0.2 ms a run)."""
    if dev.type == "cpu" and not torch.cuda.is_available():
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def finite_json(obj: Any) -> Any:
    """JSON has no NaN: write None instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def score_problem(raw_row: np.ndarray, loss: str, init: np.ndarray | None = None) -> str | None:
    """Why a row of raw scores (accuracy, or mean squared error for regression) cannot come from a sane
    model, or None: a score that is not finite, an accuracy outside [0, 1], a negative error, or a
    normalised regression score 1 - error/error_at_init that is not finite (``init``: row 0's errors)."""
    row = np.asarray(raw_row, dtype=float)
    if not np.all(np.isfinite(row)):
        return f"a score became {row[~np.isfinite(row)][0]}"
    if loss == "ce" and (row.min() < 0 or row.max() > 1):
        return f"an accuracy is {row.min() if row.min() < 0 else row.max():g}, outside [0, 1]"
    if loss != "ce":
        if row.min() < 0:
            return f"a mean squared error is {row.min():g} < 0"
        if init is not None and np.all(init > 0) and not np.all(np.isfinite(1.0 - row / init)):
            return "a normalised score 1 - error/error_at_init is not finite"
    return None


def weights_problem(tensors: Any) -> str | None:
    """'a weight is NaN or infinite' if any floating tensor in ``tensors`` holds one, else None (one host
    sync for all of them)."""
    bad = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    if bad and not bool(torch.stack(bad).all()):
        return "a weight became NaN or infinite"
    return None


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks CUDA when available, else CPU; anything else is checked."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ClbenchError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClbenchError(f"device {device!r} asked for but CUDA is not available here; use --device cpu or auto")
    return dev


def versions() -> dict[str, str]:
    from clbench import __version__

    return {"clbench": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


class PlainSGD:
    """torch.optim.SGD with its defaults (no momentum, no weight decay), through torch's functional update.

    ``torch.optim.sgd.sgd`` is the function ``torch.optim.SGD.step`` calls, so the arithmetic is the same
    (single-tensor on CPU, foreach on CUDA); only the class's constructor is skipped, which imports
    torch._dynamo, about 2 s of a small run's process on a 2-core CPU.
    """

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        self.params, self.lr = list(params), lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        from torch.optim.sgd import sgd

        live = [p for p in self.params if p.grad is not None]
        sgd(live, [p.grad for p in live], [None] * len(live), weight_decay=0.0, momentum=0.0, lr=self.lr,
            dampening=0.0, nesterov=False, maximize=False)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> "torch.optim.Optimizer | PlainSGD":
    if name == "sgd":
        return PlainSGD(params, lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ClbenchError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


@torch.inference_mode()
def evaluate(strategy: Strategy, tasks: list[Task], loss: str, batch_size: int = 2048,
             on_task: Any = None) -> np.ndarray:
    """Per task: accuracy (classification) or mean squared error (regression) on its test set.

    ``on_task()`` (optional) is called after each task, for progress.
    """
    model = strategy.model
    was_training = model.training
    model.eval()
    out = []
    for task in tasks:
        total = torch.zeros((), device=task.test_x.device, dtype=torch.float64)
        for start in range(0, len(task.test_x), batch_size):
            x = task.inputs(task.test_x[start:start + batch_size])
            y = task.test_y[start:start + batch_size]
            pred = strategy.predict(x, task).float()
            if loss == "ce":
                total += (pred.argmax(1) == y).sum()
            else:
                total += ((pred - y) ** 2).mean(1).sum()
        if len(task.test_x) == 0:
            raise ClbenchError(f"task {task.id} has an empty test set; a score of it would mean nothing")
        out.append(total / len(task.test_x))
        if on_task is not None:
            on_task()
    model.train(was_training)
    return torch.stack(out).cpu().numpy()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; process-wide peak


def stream_model(stream: Stream, model_name: str | None = None, model_args: dict[str, Any] | None = None) -> nn.Module:
    """The model a run trains: the stream's recommended one, or ``model_name`` (with ``model_args`` over the
    recommended arguments only when the name is the stream's default)."""
    name = model_name or stream.defaults.model
    args = dict(stream.defaults.model_args) if model_name is None else {}
    args.update(model_args or {})
    return build_model(name, stream.input_shape, stream.num_outputs, **args)


def checked_settings(strategy: Strategy) -> dict[str, Any]:
    """The strategy's training settings in force, refused when out of range."""
    settings = strategy.settings()
    if settings["epochs"] < 0 or settings["batch_size"] < 1 or not settings["lr"] > 0:
        raise ClbenchError(f"training settings out of range: {settings}; need epochs >= 0, batch_size >= 1, lr > 0")
    return settings


def run_config(stream: Stream, strategy: Strategy, settings: dict[str, Any], device: torch.device, seed: int,
               precision: str = "fp32", config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a result records of how it was run (the thread count too: same seed + same thread count gives the
    same R bit for bit on CPU)."""
    config = dict(config or {})
    config.update(stream=stream.name, strategy=strategy.name, scenario=stream.scenario, device=str(device),
                  precision=precision, seed=seed, threads=torch.get_num_threads(), provenance=stream.provenance,
                  **settings)
    return config


def make_result(raw: np.ndarray, stream: Stream, strategy: Strategy, model: nn.Module, config: dict[str, Any],
                seed: int, curves: list, wall_time_s: float, device: torch.device, complete: bool,
                extra: dict[str, Any] | None = None, continual_curves: dict[str, Any] | None = None) -> Result:
    """A run's Result from its raw matrix (accuracy or error per task, before scoring) and, with continual
    evaluation, its curves (their metrics join the summary of a complete run)."""
    R = scores(raw, stream.loss)
    summary = metrics.summary(R) if complete else {}
    if continual_curves and complete:
        summary.update(metrics.continual_summary(continual_curves))
    return Result(R=R.tolist(), metrics=summary, loss_curves=curves, curves=continual_curves,
                  wall_time_s=wall_time_s, peak_memory_mb=peak_memory_mb(device),
                  parameter_count=count_parameters(model), config=config, seed=seed, versions=versions(),
                  extra={"uses_task_id_at_test": strategy.uses_task_id_at_test, **strategy.extra_results(),
                         "raw": finite_json(raw.tolist()), **(extra or {})},
                  complete=complete)


def diverged(why: str, task: int, lr: float, partial: Result) -> TrainingDiverged:
    """The error of a run that diverged on ``task`` (0-based): a non-finite loss or weight, or impossible scores."""
    return TrainingDiverged(f"the run diverged on task {task + 1}: {why} (lr={lr}); lower the learning rate with "
                            "--strategy-arg lr=... or check the strategy's arguments", partial)


def run(
    stream: Stream,
    strategy: Strategy,
    model: nn.Module | None = None,
    *,
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    precision: str = "fp32",
    progress: bool = True,
    config: dict[str, Any] | None = None,
    on_row: Any = None,
    eval_every: int | None = None,
    eval_samples: int = continual.EVAL_SAMPLES,
    final_only: bool = False,
) -> Result:
    """Train ``strategy`` on ``stream`` and evaluate every task before and after each task.

    ``model`` defaults to the stream's recommended model (``model_name``,
    ``model_args`` override it). Same seed on CPU gives the same R.
    ``on_row(partial)`` (optional) receives the incomplete Result after each row of R, e.g. to save it,
    so an interrupted run keeps its finished tasks. A run whose loss, weights or scores leave what a
    working model can give (NaN, infinity, an accuracy outside [0, 1]) raises TrainingDiverged, whose
    ``partial`` holds the rows before it.
    ``eval_every=K`` also scores the seen tasks and the next one every K training steps on ``eval_samples``
    test samples a task (continual evaluation, see clbench.core.continual): ``Result.curves`` and the
    metrics min_acc, wc_acc, wf10, wp10, stability_gap. It does not change training.
    ``final_only=True`` evaluates before training and after the last task only (rows 0 and T of R; the rows
    between stay NaN, and so do the metrics that read them, such as BWT and forgetting): all that final ACC
    needs, and what a tuning trial scored by it runs. It does not change training either.
    """
    from clbench.core.progress import bar as progress_bar

    eval_every, eval_samples = continual.check_options(eval_every, eval_samples)
    dev = resolve_device(device)
    if precision not in ("fp32", "bf16"):
        raise ClbenchError(f"precision must be fp32 or bf16, got {precision!r}")
    seed_torch(seed, dev)
    if model is None:
        model = stream_model(stream, model_name, model_args)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    check_inputs(stream)
    model = strategy.setup(model.to(dev), stream)
    tasks = [t.to(dev) for t in stream.tasks]
    settings = checked_settings(strategy)
    generator = torch.Generator(device=dev).manual_seed(seed)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    T = len(tasks)
    raw = np.full((T + 1, T), np.nan)
    curves: list[list[float]] = []
    config = run_config(stream, strategy, settings, dev, seed, precision, config)
    start = time.perf_counter()

    def result(complete: bool) -> Result:
        return make_result(raw, stream, strategy, model, config, seed, curves, time.perf_counter() - start, dev,
                           complete, continual_curves=recorder.to_dict() if recorder else None)

    # work measured in task evaluations: a training epoch counts as T of them, as does a row of R (one per task)
    rows = 2 if final_only else T + 1
    bar = progress_bar((T * settings["epochs"] + rows) * T, f"{strategy.name} on {stream.name}", enabled=progress,
                       fraction=True)
    bar.set_postfix_str("evaluating before training", refresh=False)
    tick = lambda: bar.update(1)  # noqa: E731
    def fail(why: str, i: int) -> TrainingDiverged:
        bar.close()
        return diverged(why, i, settings["lr"], result(complete=False))

    def add_row(i: int) -> None:  # row i of R: after task i (0: before training)
        row = evaluate(strategy, tasks, stream.loss, on_task=tick)
        why = score_problem(row, stream.loss, raw[0] if i else None)
        if why:
            raise fail(why, max(i - 1, 0))
        raw[i] = row
        if on_row is not None:
            on_row(result(complete=False))

    recorder = continual.Recorder(strategy, tasks, stream.loss, eval_every, eval_samples, seed) if eval_every else None
    add_row(0)
    if recorder:
        recorder.record(0, 0)
    global_step = 0
    for i, task in enumerate(tasks):
        bar.set_postfix_str(f"training task {i + 1}/{T}", refresh=False)
        strategy.before_task(task)
        train_on = strategy.train_tasks(task, tasks[: i + 1])
        optimizer = make_optimizer(settings["optimizer"], strategy.trainable_parameters(), settings["lr"])
        bs = settings["batch_size"]
        steps = max(math.ceil(len(t.train_x) / bs) for t in train_on)
        task_end = global_step + settings["epochs"] * steps
        if recorder:
            recorder.start_task(global_step)
        curve = []
        for epoch in range(settings["epochs"]):
            orders = [torch.randperm(len(t.train_x), device=dev, generator=generator) if settings["shuffle"]
                      else torch.arange(len(t.train_x), device=dev) for t in train_on]
            epoch_loss = torch.zeros((), device=dev)
            for step in range(steps):
                loss = 0.0
                for t, order in zip(train_on, orders):
                    idx = order[(step * bs) % len(order):][:bs]
                    with autocast:
                        loss = loss + strategy.training_loss(t.inputs(t.train_x[idx], train=True), t.train_y[idx], t)
                loss = loss / len(train_on)  # several tasks (joint): their mean, so the step does not grow with them
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                strategy.after_backward()
                optimizer.step()
                strategy.after_step()
                epoch_loss += loss.detach()
                global_step += 1
                if recorder and recorder.due(global_step, task_end):
                    recorder.record(global_step, i)
            mean_loss = (epoch_loss / steps).item()
            curve.append(mean_loss)
            bar.update(T)
            if not math.isfinite(mean_loss):
                curves.append(curve)
                raise fail(f"the training loss became {mean_loss} in epoch {epoch + 1}", i)
        curves.append(curve)
        # the loss is checked before each step: the last step's explosion shows in the weights only
        why = weights_problem(_weights(strategy))
        if why:
            raise fail(why, i)
        strategy.after_task(task)
        if recorder:
            recorder.record(global_step, i)
        if final_only and i < T - 1:
            continue
        bar.set_postfix_str(f"evaluating after task {i + 1}/{T}", refresh=False)
        add_row(i + 1)
    bar.close()
    return result(complete=True)


def _weights(strategy: Strategy) -> list[torch.Tensor]:
    """The model's parameters and buffers, and whatever else the strategy trains (prompts, keys)."""
    seen, out = set(), []
    for t in itertools.chain(strategy.model.parameters(), strategy.model.buffers(), strategy.trainable_parameters()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t.detach())
    return out


def check_inputs(stream: Stream) -> None:
    """Every task must give model inputs of one shape (that of ``stream.input_shape``, or as many numbers)."""
    expected = tuple(stream.input_shape)
    size = math.prod(expected)
    seen = None
    for k, task in enumerate(stream.tasks, 1):
        for split in ("train", "test"):
            x = getattr(task, f"{split}_x")
            try:
                shape = tuple(task.inputs(x[:1]).shape[1:])
            except Exception as e:  # noqa: BLE001 - a transform that fails on the task's own data
                raise ClbenchError(f"stream {stream.name!r}: the transform of task {k} fails on its {split} inputs "
                                   f"of shape {tuple(x.shape[1:])} ({type(e).__name__}: {e})") from None
            if seen is None:
                seen = shape
            if shape != seen or (shape != expected and math.prod(shape) != size):
                other = f"task 1 gives {seen}" if shape != seen else f"the stream says input_shape={expected}"
                raise ClbenchError(f"stream {stream.name!r}: task {k}'s {split} inputs have shape {shape}, but "
                                   f"{other}; every task must give inputs of the stream's input_shape")


def scores(raw: np.ndarray, loss: str) -> np.ndarray:
    """Accuracy as is; regression error as the normalised score 1 - error/error_at_init."""
    if loss == "ce":
        return raw.copy()
    init = raw[0]
    if np.any(init <= 0):
        raise ClbenchError("the model's error before training is zero on some task; "
                           "the normalised regression score 1 - error/error_at_init is undefined")
    return 1.0 - raw / init
