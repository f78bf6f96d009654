"""One batch of compatible members trained in lockstep, and :func:`run_batched`, which groups and chunks them.

Members do not interact: each gets the gradient of its own loss, its own batch order (the engine's, from its
seed), its own numeric strategy arguments and its own global RNG stream, so every member's R equals the
engine's separate run up to float rounding.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clbench.batched.adapter import Member, adapter_for, batchable, state_in_members
from clbench.batched.continual import StackedCurves
from clbench.batched.inputs import DenseInputs, PermutedInputs, distinct_inputs
from clbench.batched.optim import MemberOptimizer
from clbench.batched.stacked import Sharing, StackedNet, model_problem
from clbench.core import continual
from clbench.core.engine import (
    Result,
    checked_settings,
    diverged,
    make_optimizer,
    make_result,
    resolve_device,
    run_config,
    score_problem,
    seed_torch,
    stream_model,
)
from clbench.core.errors import ClbenchError, env_number
from clbench.core.strategy import count_parameters
from clbench.core.types import Stream
from clbench.data.transforms import PixelPermutation

DEFAULT_MEMORY_MB = 2048


class Group:
    """B compatible members: stacked model, stacked data, per-member generators and RNG streams."""

    def __init__(self, members: list[Member], models: list[nn.Module], dev: torch.device) -> None:
        self.B, self.dev = len(members), dev
        tasks = [[t.to(dev) for t in m.stream.tasks] for m in members]
        cache: dict = {}
        distinct = [distinct_inputs(members, tasks, j, cache) for j in range(len(tasks[0]))]
        # members that share inputs side by side, so each set's stacked weights are one contiguous slice
        self.order = sorted(range(self.B), key=lambda b: [rows[b] for rows, _, _ in distinct])
        self.members = [members[b] for b in self.order]
        self.models = [models[b] for b in self.order]
        self.tasks = [tasks[b] for b in self.order]
        self.net = StackedNet(self.models)
        self.loss_kind = members[0].stream.loss
        self.rng_states: list[tuple] = [m._rng for m in self.members]
        self.member_index = torch.arange(self.B, device=dev)[:, None]  # (B, 1), for per-member gathers
        self.data = [self._stack(j, [rows[b] for b in self.order], train, test)
                     for j, (rows, train, test) in enumerate(distinct)]

    def _stack(self, j: int, rows: list[int], train: torch.Tensor, test: torch.Tensor) -> dict[str, Any]:
        """Task j's distinct inputs (see distinct_inputs); targets and heads stacked per member."""
        with torch.no_grad():
            out: dict[str, Any] = {
                "rows": rows, "rows_index": torch.tensor(rows, device=self.dev),
                "sharing": Sharing.of(rows, self.dev), "train_x": train, "test_x": test,
                "eval_sharing": None, "input_order": None,
                "train_y": torch.stack([self.tasks[b][j].train_y for b in range(self.B)]),
                "test_y": torch.stack([self.tasks[b][j].test_y for b in range(self.B)])}
        if isinstance(test, PermutedInputs):  # evaluation reads the shared images, the order folded into the weights
            out["eval_sharing"] = Sharing.of([test.base_of[r].item() for r in rows], self.dev, least=1)
            out["input_order"] = test.inverse[out["rows_index"]]
        heads = [self.tasks[b][j].head for b in range(self.B)]
        out["head"] = None if heads[0] is None else torch.stack(heads)
        return out

    def full(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's whole training set of task j, (B, n, ...) (cached)."""
        d = self.data[j]
        if "full" not in d:
            d["full"] = (self.member_rows(d, "train_x"), d["train_y"])
        return d["full"]

    def member_rows(self, d: dict[str, Any], key: str, part: slice = slice(None)) -> torch.Tensor:
        """d[key] (distinct inputs) as one row per member, (B, N, ...); the stored tensor itself when it is."""
        if isinstance(d[key], DenseInputs) and d["rows"] == list(range(self.B)):
            return d[key].x[:, part]
        return d[key].take(d["rows_index"], part)

    def rng_key(self, b: int) -> bytes:
        """Member b's random stream state as bytes (equal for members whose streams are equal)."""
        cpu, cuda = self.rng_states[b]
        return cpu.numpy().tobytes() + (b"" if cuda is None else cuda.cpu().numpy().tobytes())

    @contextlib.contextmanager
    def rng(self, b: int) -> Iterator[None]:
        """Member b's global RNG stream (as its own run would have it)."""
        cpu, cuda = self.rng_states[b]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.dev)
        try:
            yield
        finally:
            self.rng_states[b] = (torch.get_rng_state(),
                                  torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None)

    def draw(self, fn: Callable[[], Any]) -> list[Any]:
        """``fn()`` for every member in its own random stream; members whose streams are equal draw once."""
        drawn: dict[bytes, tuple] = {}
        out = []
        for b in range(self.B):
            key = self.rng_key(b)
            if key not in drawn:
                with self.rng(b):
                    value = fn()
                drawn[key] = (value, self.rng_states[b])
            value, self.rng_states[b] = drawn[key]
            out.append(value)
        return out

    def replayed_loss(self, x: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Per member (B,): the stream's loss on a replayed batch (B, k, ...), each sample through its own task's
        head and gates, averaged over the k samples (clbench.core.buffer.replayed_loss, batched)."""
        k = task_ids.shape[1]
        gates = [self.adapter.gates(j) for j in range(len(self.data))]
        if all(d["head"] is None for d in self.data) and all(gate is None for gate in gates):
            return self.per_sample_loss(self.net.forward(x), y).mean(1)  # every task reads the same outputs
        total, plain = torch.zeros(self.B, device=self.dev), None
        for j in torch.unique(task_ids).tolist():
            if gates[j] is None:  # ungated tasks share one forward and differ in the head only
                plain = self.net.forward(x) if plain is None else plain
                out = self.head(plain, j)
            else:
                out = self.predict(x, j, gates[j])
            total = total + (self.per_sample_loss(out, y) * (task_ids == j)).sum(1) / k
        return total

    def predict(self, x: torch.Tensor, j: int, gates=None, sharing: Sharing | None = None,
                capture: list | None = None) -> torch.Tensor:
        return self.head(self.net.forward(x, self.adapter.gates(j) if gates is None else gates, sharing, capture), j)

    def head(self, out: torch.Tensor, j: int) -> torch.Tensor:
        """All output units (B, N, outputs) -> task j's head."""
        head = self.data[j]["head"]
        if head is None:
            return out
        return out.gather(2, head[:, None, :].expand(-1, out.shape[1], -1))

    def per_sample_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "ce":
            return F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none").view(out.shape[:2])
        return ((out - y) ** 2).mean(2)

    @torch.no_grad()
    def evaluate(self) -> np.ndarray:
        row = []
        for j in range(len(self.data)):
            d = self.data[j]
            gates = self.adapter.gates(j)
            total = torch.zeros(self.B, device=self.dev, dtype=torch.float64)
            n = d["test_x"].n
            folded = (None if d["eval_sharing"] is None  # once a task, not once a chunk
                      else self.net.folded_first(None if gates is None else gates[0], d["input_order"]))
            for start in range(0, n, 2048):
                part = slice(start, start + 2048)
                if folded is not None:
                    pred = self.head(self.net.forward(d["test_x"].scaled()[:, part], gates, d["eval_sharing"],
                                                      first_weight=folded), j)
                else:
                    x = d["test_x"].x[:, part] if d["sharing"] is not None else self.member_rows(d, "test_x", part)
                    pred = self.predict(x, j, gates, d["sharing"])
                y = d["test_y"][:, part]
                total += ((pred.argmax(2) == y).sum(1) if self.loss_kind == "ce"
                          else ((pred - y) ** 2).mean(2).sum(1))
            row.append(total / max(n, 1))
        return torch.stack(row, 1).cpu().numpy()

    def hook(self, b: int, name: str, *args) -> Any:
        """Run member b's own hook on its own model, loaded with its current weights."""
        strategy = self.members[b].strategy
        self.net.load(b, strategy.model)
        with self.rng(b):
            return getattr(strategy, name)(*args)


def _batch_sharing(rows: list[int], seeds: list[int], dev: torch.device) -> dict[str, Any]:
    """Members with the same input row and seed draw the same batch order (their generators are seeded
    alike and drawn in lockstep), so each such set reads one gathered batch."""
    keys: dict[tuple[int, int], int] = {}
    first, batch_of = [], []
    for b, key in enumerate(zip(rows, seeds)):
        if key not in keys:
            keys[key] = len(first)
            first.append(b)
        batch_of.append(keys[key])
    sharing = Sharing.of(batch_of, dev)
    if sharing is None:  # too little to share: one gathered batch per member
        first = list(range(len(rows)))
    return {"first": torch.tensor(first, device=dev), "rows": torch.tensor([rows[b] for b in first], device=dev),
            "sharing": sharing}


def _signature(member: Member, model: nn.Module) -> str:
    s, stream = member.strategy, member.stream
    shapes = [(tuple(t.train_x.shape), tuple(t.train_y.shape), tuple(t.test_x.shape), tuple(t.test_y.shape),
               str(t.train_y.dtype), t.head is None) for t in stream.tasks]
    settings = {k: v for k, v in s.settings().items() if k != "lr"}  # members may train at different rates
    return json.dumps([type(s).__module__, type(s).__name__, adapter_for(s).signature(s), settings, shapes,
                       stream.loss, stream.scenario, [tuple(p.shape) for p in model.parameters()],
                       [type(m).__name__ for m in model]], default=str)


def run_batched(members: list[Member], *, model_name: str | None = None, model_args: dict[str, Any] | None = None,
                device: str | torch.device = "auto", memory_mb: float | None = None, max_members: int | None = None,
                eval_every: int | None = None, eval_samples: int = continual.EVAL_SAMPLES,
                final_only: bool = False) -> list[Result | ClbenchError]:
    """Train every member, batching compatible ones; returns per member its Result (or the error its run raised).

    Members are grouped by what must match (stream shapes, strategy class and its non-numeric settings,
    training settings, model); each group runs in batches that fit ``memory_mb`` (default
    $CLBENCH_BATCH_MEMORY_MB, else 2048) and hold at most ``max_members``. A member that cannot be
    batched (see :func:`batchable`) raises; use ``clbench.run`` for it. ``eval_every``/``eval_samples``: continual
    evaluation of every member, as ``clbench.run`` takes them (clbench.batched.continual); ``final_only``
    as ``clbench.run`` takes it (rows 0 and T of R only). A member that diverges gets the engine's
    TrainingDiverged and stops where it diverged (see _run_group).
    """
    eval_every, eval_samples = continual.check_options(eval_every, eval_samples)
    dev = resolve_device(device)
    budget = float(memory_mb or env_number("CLBENCH_BATCH_MEMORY_MB", DEFAULT_MEMORY_MB)) * 2**20
    models, groups = [], {}
    for k, m in enumerate(members):
        why = batchable(m.stream, m.strategy)
        seed_torch(m.seed, dev)  # the engine's order: seed, model, strategy setup
        model = stream_model(m.stream, model_name, model_args)
        why = why or model_problem(model)
        if why:
            raise ClbenchError(f"member {k} cannot run batched: {why}; run it with clbench.run")
        model = m.strategy.setup(model.to(dev), m.stream)
        checked_settings(m.strategy)
        m._rng = (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
        models.append(model)
        groups.setdefault(_signature(m, model), []).append(k)
    results: list[Result | ClbenchError | None] = [None] * len(members)
    for indices in groups.values():
        for chunk in _chunks(indices, members, models, budget, max_members, eval_samples if eval_every else 0):
            for k, r in zip(chunk, _run_group([members[k] for k in chunk], [models[k] for k in chunk], dev,
                                              eval_every, eval_samples, final_only)):
                results[k] = r
    return results


def member_bytes(m: Member, model: nn.Module, seen: set[int], eval_samples: int = 0) -> tuple[float, set[int]]:
    """Estimated memory of one member of a batch that already holds the tasks and images in ``seen`` (ids),
    and the ids it adds; ``eval_samples``: the test samples a task of its continual evaluation (0: none)."""
    cost = 8 * count_parameters(model) * 4 + adapter_for(m.strategy)(None).bytes_per_member(m.strategy, m.stream, model)
    cost += StackedCurves.bytes_per_member(m.stream.tasks, eval_samples) if eval_samples else 0
    new: set[int] = set()
    for t in m.stream.tasks:
        if id(t) in seen | new:
            continue
        new.add(id(t))
        cost += 4 * (t.train_y.numel() + t.test_y.numel())
        if type(t.transform) is not PixelPermutation:
            cost += 4 * (t.train_x.numel() + t.test_x.numel())
            continue
        for x, scaled in ((t.train_x, False), (t.test_x, True)):  # images held once, as stored (PermutedInputs)
            if id(x) not in seen | new:
                new.add(id(x))
                cost += x.numel() * (x.element_size() + 4 * scaled)
    return cost, new


def _chunks(indices: list[int], members: list[Member], models: list[nn.Module], budget: float,
            max_members: int | None, eval_samples: int = 0) -> Iterator[list[int]]:
    """Consecutive runs of members whose estimated memory fits the budget (at least one member each)."""
    chunk, used, seen = [], 0.0, set()
    for k in indices:
        cost, new = member_bytes(members[k], models[k], seen, eval_samples)
        if chunk and (used + cost > budget or (max_members and len(chunk) >= max_members)):
            yield chunk
            chunk, used, seen = [], 0.0, set()
            cost, new = member_bytes(members[k], models[k], seen, eval_samples)
        chunk.append(k)
        used, seen = used + cost, seen | new
    if chunk:
        yield chunk


def _run_group(members: list[Member], models: list[nn.Module], dev: torch.device, eval_every: int | None = None,
               eval_samples: int = continual.EVAL_SAMPLES, final_only: bool = False) -> list[Result | ClbenchError]:
    """Train ``members`` in lockstep. A diverged member stops there, as its own run would: once every member
    has, the batch stops; when only some have, they are dropped at the task boundary and the rest go on as a
    smaller batch (rebuilt from their weights, strategy objects, batch-order generators and random streams, so
    nothing of theirs changes), provided their batched form keeps no state of its own (Adapter.state_in_members)
    and no continual evaluation is recorded."""
    n, T = len(members), len(members[0].stream.tasks)
    raw = np.full((n, T + 1, T), np.nan)  # from here on, members are indexed as the caller gave them
    curves: list[list[list[float]]] = [[] for _ in range(n)]
    failed: dict[int, ClbenchError] = {}
    generators = [torch.Generator(device=dev).manual_seed(m.seed) for m in members]
    settings = members[0].strategy.settings()
    bs = settings["batch_size"]
    adapter_class = adapter_for(members[0].strategy)
    start = time.perf_counter()
    recorder, global_step, first, active = None, 0, 0, list(range(n))
    while True:
        g = Group([members[k] for k in active], [models[k] for k in active], dev)
        ids = [active[b] for b in g.order]  # group position -> the caller's index
        g.adapter = adapter = adapter_class(g)
        B = g.B
        lrs = [members[k].strategy.settings()["lr"] for k in ids]
        gens = [generators[k] for k in ids]
        all_full = not adapter.order_matters and all(bs >= d["train_x"].n for d in g.data)

        def result(k: int, complete: bool) -> Result:
            m = members[k]
            config = run_config(m.stream, m.strategy, m.strategy.settings(), dev, m.seed, config=m.config)
            return make_result(raw[k], m.stream, m.strategy, models[k], config, m.seed, curves[k],
                               (time.perf_counter() - start) / n, dev, complete, extra={"batched_members": n},
                               continual_curves=recorder.to_dict(ids.index(k)) if recorder else None)

        def check_row(i: int) -> None:  # members diverge independently (see clbench.core.engine.run)
            finite = torch.stack([torch.isfinite(p.detach().reshape(B, -1)).all(1) for p in g.net.params]).all(0)
            finite = finite.tolist()
            for b, k in enumerate(ids):
                why = None if i == 0 or finite[b] else "a weight became NaN or infinite"
                why = why or score_problem(raw[k, i], members[k].stream.loss, raw[k, 0] if i else None)
                if why and k not in failed:
                    raw[k, i] = np.nan  # the partial result keeps the rows before the divergence
                    failed[k] = diverged(why, max(i - 1, 0), lrs[b], result(k, complete=False))

        adapter.refresh()
        if first == 0:
            recorder = StackedCurves(g, eval_every, eval_samples) if eval_every else None  # the engine's steps, rows
            raw[ids, 0] = g.evaluate()
            check_row(0)
            if recorder:
                recorder.record(0, 0)
        regroup = False
        for i in range(first, T):
            for b in range(B):
                g.hook(b, "before_task", g.tasks[b][i])
            adapter.refresh()
            seen = g.tasks[0][: i + 1]
            train_on = [next(j for j, s in enumerate(seen) if s is t)
                        for t in members[0].strategy.train_tasks(g.tasks[0][i], seen)]
            optimizer = (make_optimizer(settings["optimizer"], g.net.params, lrs[0]) if len(set(lrs)) == 1
                         else MemberOptimizer(settings["optimizer"], g.net.params, lrs))
            steps = max(math.ceil(g.data[t]["train_x"].n / bs) for t in train_on)
            task_end = global_step + settings["epochs"] * steps
            if recorder:
                recorder.start_task(global_step)
            gates = {t: adapter.gates(t) for t in train_on}
            batches = {t: _batch_sharing(g.data[t]["rows"], [members[k].seed for k in ids], dev) for t in train_on}
            for k in ids:
                curves[k].append([])  # one list of epoch losses per task, as the engine records
            for epoch in range(settings["epochs"]):
                # the generators serve batch orders only: with every task of the stream full batch, no order is read
                orders = {t: None if all_full else torch.stack([
                    torch.randperm(g.data[t]["train_x"].n, device=dev, generator=gen) for gen in gens])
                    for t in train_on}
                epoch_loss = torch.zeros(B, device=dev)
                for step in range(steps):
                    for p in g.net.params:
                        p.grad = None
                    penalty = adapter.penalty()  # once a step (a quadratic pull leaves its gradient in .grad)
                    loss = torch.zeros(B, device=dev)
                    for t in train_on:
                        d, order = g.data[t], orders[t]
                        if bs >= d["train_x"].n and not adapter.order_matters:
                            # full batch (e.g. teacher-student exact mode): the mean loss does not depend on the
                            # order, so skip the gather (sums differ from the engine's in rounding only)
                            x, y = (d["train_x"].all(), d["train_y"]) if d["sharing"] is not None else g.full(t)
                            sharing = d["sharing"]
                        else:
                            idx = order[:, (step * bs) % order.shape[1]:][:, :bs]
                            batch = batches[t]  # members with the same data and seed draw the same batches
                            x = d["train_x"].take(batch["rows"], idx[batch["first"]])
                            y = d["train_y"][g.member_index, idx]
                            sharing = batch["sharing"]
                        out = g.net.forward(x, gates[t], sharing)
                        loss = loss + adapter.incoming_loss(out, y, t)
                        loss = adapter.extra_loss(x, y, t, loss, out, sharing)
                    loss = loss / len(train_on)  # as the engine: the mean over the tasks trained on, penalty once
                    if penalty is not None:
                        loss = loss + penalty
                    loss.sum().backward()  # members do not interact: each gets its own loss's gradient
                    adapter.after_backward()
                    optimizer.step()
                    adapter.after_step()
                    epoch_loss += loss.detach()
                    global_step += 1
                    if recorder and recorder.due(global_step, task_end):
                        recorder.record(global_step, i)
                mean_loss = (epoch_loss / steps).tolist()
                for b, k in enumerate(ids):
                    curves[k][-1].append(mean_loss[b])
                    if k not in failed and not math.isfinite(mean_loss[b]):
                        failed[k] = diverged(f"the training loss became {mean_loss[b]} in epoch {epoch + 1}", i,
                                             lrs[b], result(k, complete=False))
            adapter.before_after_task()
            if not adapter.after_task(i):
                for b, k in enumerate(ids):
                    if k in failed:
                        continue
                    try:
                        g.hook(b, "after_task", g.tasks[b][i])
                    except ClbenchError as e:
                        failed[k] = e
            adapter.refresh()
            if recorder:
                recorder.record(global_step, i)
            if not final_only or i == T - 1:
                raw[ids, i + 1] = g.evaluate()
                check_row(i + 1)
            lost = sum(k in failed for k in ids)
            if i < T - 1 and (lost == B or (lost and recorder is None and state_in_members(adapter_class))):
                regroup = True
                break
        for b, k in enumerate(ids):  # the weights reached, into each member's own model
            g.net.load(b, models[k])
            members[k]._rng = g.rng_states[b]
        active, first = [k for k in ids if k not in failed], i + 1
        if not regroup or not active:
            break
    if hasattr(adapter, "finish"):
        adapter.finish()
    return [failed[k] if k in failed else result(k, complete=True) for k in range(n)]


def run_seeds(stream: Stream, seeds: list[int], *, model_name: str | None = None,
              model_args: dict[str, Any] | None = None, epochs: int | None = None, lr: float | None = None,
              batch_size: int | None = None, optimizer: str | None = None, device: str = "auto"
              ) -> list[dict[str, Any]]:
    """Finetune on ``stream`` for every seed at once (run_batched with one finetune member per seed); returns per
    seed ``{"seed", "R", "metrics", "wall_time_s"}``."""
    from clbench.core.registry import check_arguments, lookup

    if not seeds:
        raise ClbenchError("run_seeds needs at least one seed")
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer)
    finetune = lookup("strategy", "finetune")
    members = [Member(stream, finetune(**check_arguments("strategy", "finetune", finetune, settings)), seed)
               for seed in seeds]
    out = []
    for seed, result in zip(seeds, run_batched(members, model_name=model_name, model_args=model_args, device=device)):
        if isinstance(result, Exception):
            raise result
        out.append({"seed": seed, "R": result.R, "metrics": result.metrics, "wall_time_s": result.wall_time_s})
    return out
