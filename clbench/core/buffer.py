"""Reservoir sampling on the device, written once for every memory method and both loops.

Vitter (1985), "Random sampling with a reservoir": the n-th sample seen (0-based) goes to a uniformly drawn
slot in [0, n] and is kept if that slot is below the buffer size, so every sample seen so far is kept with
equal probability size / n_seen. A batch is added in one vectorised step; when two samples of one batch draw
the same slot the later one wins, exactly as when they are added one by one (deterministic for any thread
count, unlike index assignment with repeated indices).
"""
from __future__ import annotations

import torch


def reservoir_slots(seen: int, n: int, size: int, device: torch.device | str) -> torch.Tensor:
    """Slots (n,) for the next ``n`` samples after ``seen`` were offered; ``>= size`` means "not kept".

    Draws ``n`` numbers from the global torch generator (one ``torch.rand`` call), so a run's random stream is
    the same whichever loop adds the samples.
    """
    index = torch.arange(seen, seen + n, device=device)
    return torch.where(index < size, index, (torch.rand(n, device=device) * (index + 1)).long())


def last_writers(slots: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Who writes where when ``slots`` (..., n) are written in order, the later sample winning a shared slot.

    Returns index tensors ``(*leading, slot, sample)``: for every slot written, the leading indices (e.g. the
    member of a batched run), the slot and the sample that ends up there.
    """
    lead, n = slots.shape[:-1], slots.shape[-1]
    flat = slots.reshape(-1, n)
    rows = flat.shape[0]
    last = torch.full((rows, size), -1, dtype=torch.long, device=slots.device)
    row, sample = (flat < size).nonzero(as_tuple=True)
    last.view(-1).scatter_reduce_(0, row * size + flat[row, sample], sample, reduce="amax")
    row, slot = (last >= 0).nonzero(as_tuple=True)
    sample = last[row, slot]
    leading = torch.unravel_index(row, lead) if lead else ()
    return (*leading, slot, sample)
