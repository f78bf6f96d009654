"""Several seeds of one finetune run in lockstep: a thin front to :mod:`clbench.batched.run`.

``run_seeds(stream, seeds)`` is ``run_batched`` with one finetune member per seed
(kept for existing callers; new code uses ``clbench.batched.run.run_batched``,
which also batches stream arguments, strategies and their numeric arguments).
"""
from __future__ import annotations

from typing import Any

from clbench.core.errors import ClbenchError
from clbench.core.types import Stream


def run_seeds(stream: Stream, seeds: list[int], *, model_name: str | None = None,
              model_args: dict[str, Any] | None = None, epochs: int | None = None, lr: float | None = None,
              batch_size: int | None = None, optimizer: str | None = None, device: str = "auto"
              ) -> list[dict[str, Any]]:
    """Finetune on ``stream`` for every seed at once; returns per seed ``{"seed", "R", "metrics", "wall_time_s"}``."""
    from clbench import make_strategy
    from clbench.batched.run import Member, run_batched

    if not seeds:
        raise ClbenchError("run_seeds needs at least one seed")
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer)
    members = [Member(stream, make_strategy("finetune", **settings), seed) for seed in seeds]
    out = []
    for seed, result in zip(seeds, run_batched(members, model_name=model_name, model_args=model_args, device=device)):
        if isinstance(result, Exception):
            raise result
        out.append({"seed": seed, "R": result.R, "metrics": result.metrics, "wall_time_s": result.wall_time_s})
    return out
