"""Continual evaluation of a lockstep batch: every member's curves, as its own run records them.

The rules are the engine's (clbench.core.continual: when, which tasks, the scale, each member's subsample
drawn from its own seed); this module holds the members' subsamples and scores them together. Members with
the same test inputs of every task and the same seed read one copy of their subsamples; all tasks' subsets
go through the stacked model in one forward (chunked), unless the strategy gates by task (then one forward
per task); heads are selected afterwards. No gradient, and no host sync until the run ends.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from clbench.batched.stacked import Sharing
from clbench.core.continual import CHUNK_ELEMENTS, Curves, hits, subsamples

if TYPE_CHECKING:
    from clbench.batched.group import Group


class StackedCurves(Curves):
    """Rows of (B, T) scores, one per evaluation; ``to_dict(b)`` is member b's record (group order).

    Create it after the adapter's first ``refresh`` and before training.
    """

    def __init__(self, g: "Group", eval_every: int, eval_samples: int) -> None:
        self.g = g
        T, dev = len(g.data), g.dev
        seeds = [m.seed for m in g.members]
        picks = {s: subsamples([d["test_x"].n for d in g.data], eval_samples, s, dev) for s in dict.fromkeys(seeds)}
        keys = [(tuple(d["rows"][b] for d in g.data), seeds[b]) for b in range(g.B)]
        distinct = list(dict.fromkeys(keys))  # one copy per (test inputs of every task, seed)
        with torch.no_grad():
            self.x = torch.stack([torch.cat([d["test_x"].take(torch.tensor([rows[j]], device=dev), picks[s][j][None])[0]
                                             for j, d in enumerate(g.data)]) for rows, s in distinct])
            self.y = torch.stack([torch.cat([d["test_y"][b, picks[s][j]] for j, d in enumerate(g.data)])
                                  for b, s in enumerate(seeds)])
        self.sharing = Sharing.of([distinct.index(k) for k in keys], dev, least=1)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in picks[seeds[0]]])]).tolist()
        widest = max(max(p.shape[1:]) for p in g.net.params if p.dim() == 3)
        self.chunk = max(1, CHUNK_ELEMENTS // (g.B * widest))  # samples a forward holds for all members
        super().__init__(T, g.loss_kind, eval_every, eval_samples)

    @torch.no_grad()
    def raw(self, n: int) -> torch.Tensor:
        """Accuracy or mean squared error of tasks 0..n-1 on each member's subsamples, (B, n) float64."""
        g, at = self.g, self.offsets
        gates = [g.adapter.gates(j) for j in range(n)]
        spans = ([(0, at[n], None)] if all(x is None for x in gates)
                 else [(at[j], at[j + 1], gates[j]) for j in range(n)])
        out = torch.cat([g.net.forward(self.x[:, a:min(a + self.chunk, stop)], gate, self.sharing)
                         for start, stop, gate in spans for a in range(start, stop, self.chunk)], 1)
        return torch.stack([hits(g.head(out[:, at[j]:at[j + 1]], j), self.y[:, at[j]:at[j + 1]], self.loss).mean(1)
                            for j in range(n)], 1)

    @staticmethod
    def bytes_per_member(tasks: list, eval_samples: int) -> int:
        """The most a member's subsamples take (float32, none shared), for the batch's memory estimate."""
        return sum(4 * min(len(t.test_x), eval_samples) * int(np.prod(t.inputs(t.test_x[:1]).shape[1:]))
                   for t in tasks)
