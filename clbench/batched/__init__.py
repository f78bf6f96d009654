"""Batched runs: many small runs trained in lockstep as one stacked model.

``run_batched(members)`` trains B members (each a stream, a strategy and a seed) at once. The members' models
(``linear`` or ``mlp``: Flatten, Linear and elementwise activations) are stacked into (B, out, in) weights and
every step is one batched matmul per layer for all members; each member keeps its own data (e.g. one cell of a
(rho_a, rho_b) grid), its own batch order, its own numeric strategy arguments and its own RNG stream, so every
member's R (and, with ``eval_every``, its curves) equals the engine's separate run up to float rounding.

A strategy batches when its file registers a batched form (``@batched_form(Strategy)`` on an
:class:`Adapter`, at the bottom of the strategy's file); :func:`batchable` says why a run cannot batch.

- :mod:`clbench.batched.stacked`: the stacked model and shared inputs;
- :mod:`clbench.batched.inputs`: the members' data, held once per distinct tensor;
- :mod:`clbench.batched.adapter`: what a batched form implements, and its registry;
- :mod:`clbench.batched.fisher`: the Fisher of every member at once;
- :mod:`clbench.batched.continual`: every member's continual-evaluation curves (``run_batched(eval_every=K)``);
- :mod:`clbench.batched.buffer`: every member's reservoir buffer at once;
- :mod:`clbench.batched.optim`: optimizers for members at different learning rates;
- :mod:`clbench.batched.group`: one lockstep batch, and :func:`run_batched`.
"""
from clbench.batched.adapter import (
           Adapter,
           Member,
           adapter_for,
           batchable,
           batched_form,
           has_batched_form,
           member_numbers,
)
from clbench.batched.buffer import ReservoirAdapter, StackedReservoir
from clbench.batched.group import Group, run_batched, run_seeds
from clbench.batched.stacked import Sharing, StackedLinear, StackedNet

__all__ = ["Adapter", "Group", "Member", "ReservoirAdapter", "Sharing", "StackedLinear", "StackedNet",
           "StackedReservoir", "adapter_for", "batchable", "batched_form", "member_numbers", "run_batched", "run_seeds"]
