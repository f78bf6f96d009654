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

WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
if "torch" not in sys.modules and not any(k in os.environ for k in WAIT_SETTINGS):
    # OpenMP threads wait for each other at the end of every parallel operation. Spinning long (libgomp's
    # default) makes small-tensor training many times slower on a machine whose cores other processes keep
    # busy; sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes it 2-3x slower on a quiet one. A short spin
    # before sleeping keeps most of both (docs/performance.md, "On a busy machine"): 100,000 spins in
    # libgomp (torch's OpenMP on Linux); other OpenMP runtimes sleep at once (KMP_BLOCKTIME=0). Set before
    # torch loads its OpenMP runtime; a user's own setting of any of these wins.
    os.environ["GOMP_SPINCOUNT"] = "100000"
    os.environ["KMP_BLOCKTIME"] = "0"

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
