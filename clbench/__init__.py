"""clbench: continual-learning benchmarks with controllable task similarity.

Public API::

    from clbench import make_stream, make_strategy, run
    result = run(make_stream("teacher-student", rho_a=0.5, rho_b=0.5), make_strategy("ewc-full"))
"""
from __future__ import annotations

import os
import sys
from typing import Any

__version__ = "0.1.0"

if "torch" not in sys.modules:
    # OpenMP threads that spin at every barrier waiting for a descheduled sibling make small-tensor training
    # 10x+ slower on a machine whose cores other processes keep busy; sleeping waiters cost little when it is
    # quiet (docs/performance.md). Must be set before torch loads its OpenMP runtime; a user's own value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from clbench.core.engine import Result, TrainingDiverged, evaluate, run  # noqa: E402
from clbench.core.errors import ClbenchError  # noqa: E402
from clbench.core.registry import (  # noqa: E402
    build_model,  # noqa: E402
    load_plugin,
    register_model,
    register_strategy,
    register_stream,
)
from clbench.core.strategy import Strategy  # noqa: E402
from clbench.core.types import Stream, Task, TrainDefaults  # noqa: E402


def make_stream(name: str, **args: Any) -> Stream:
    """Build a registered stream by name, checking its arguments."""
    from clbench.core.registry import check_arguments, lookup

    builder = lookup("stream", name)
    return builder(**check_arguments("stream", name, builder, args))


def make_strategy(name: str, **args: Any) -> Strategy:
    """Build a registered strategy by name, checking its arguments."""
    from clbench.core.registry import check_arguments, lookup

    cls = lookup("strategy", name)
    return cls(**check_arguments("strategy", name, cls, args))


__all__ = [
    "ClbenchError", "Result", "Stream", "Strategy", "Task", "TrainDefaults", "TrainingDiverged",
    "build_model", "evaluate", "load_plugin", "make_strategy", "make_stream", "register_model",
    "register_strategy", "register_stream", "run", "__version__",
]
