"""The members' inputs, stored once per distinct tensor: dense stacks, or shared images with a pixel order
per member (permuted streams), gathered per batch."""
from __future__ import annotations

import torch

from clbench.batched.adapter import Member
from clbench.core.types import Task
from clbench.data.transforms import PixelPermutation


def take_rows(x: torch.Tensor, rows: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    """x (V, n, ...) at rows (K,) and samples ``index`` ((K, m), or one slice for all) -> (K, m, ...): whole
    samples copied by one index_select (faster than advanced indexing on two dimensions)."""
    n = x.shape[1]
    if isinstance(index, slice):
        index = torch.arange(n, device=x.device)[index].expand(len(rows), -1)
    flat = (rows[:, None] * n + index).reshape(-1)
    return x.reshape(-1, *x.shape[2:]).index_select(0, flat).view(*index.shape, *x.shape[2:])


class DenseInputs:
    """A task's distinct inputs, transformed and stacked: row r is x[r], (V, n, ...)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    @property
    def n(self) -> int:
        return self.x.shape[1]

    def take(self, rows: torch.Tensor, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """(K, m, ...): rows (K,) at samples ``index``, (K, m) or one slice for all."""
        return take_rows(self.x, rows, index)

    def all(self) -> torch.Tensor:
        return self.x


class PermutedInputs:
    """A task's distinct inputs when its transform is a pixel permutation (permuted MNIST): the stored images
    (uint8) once per distinct content, base (U, n, pixels), and each row's pixel order (V, pixels). A seed or
    (rho_a, rho_b) sweep then holds the images once per seed, not transformed once per task and member.
    Training batches are built as needed (the floats the transform gives); evaluation instead folds a row's
    order into the first layer's weights, so that all members read the shared images (see Group.evaluate)."""

    def __init__(self, base: torch.Tensor, base_of: list[int], perm: torch.Tensor, shape: tuple[int, ...],
                 cache: dict) -> None:
        self.base, self.perm, self.shape, self.cache = base, perm, shape, cache
        self.base_of = torch.tensor(base_of, device=base.device)
        self.inverse = perm.argsort(1)  # scaled(base) @ w[:, inverse]^T = (scaled(base)[:, perm]) @ w^T
        self._all: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.perm)

    @property
    def n(self) -> int:
        return self.base.shape[1]

    def take(self, rows: torch.Tensor, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        x = take_rows(self.base, self.base_of[rows], index)
        x = x.gather(2, self.perm[rows][:, None, :].expand(-1, x.shape[1], -1))
        return torch.div(x, 255).view(*x.shape[:2], *self.shape)  # PixelPermutation's floats: gather, then scale

    def all(self) -> torch.Tensor:
        if self._all is None:
            self._all = self.take(torch.arange(len(self), device=self.base.device))
        return self._all

    def scaled(self) -> torch.Tensor:
        """The images in model units, (U, n, pixels), in their stored pixel order (one copy for all tasks)."""
        key = ("scaled", id(self.base))
        if key not in self.cache:
            self.cache[key] = torch.div(self.base, 255)
        return self.cache[key]


class CanonicalOrder:
    """Maps each tensor to the first equal one seen (by object, else by a strided fingerprint, then compared in
    full), so that equal data held in separate streams is stored once."""

    def __init__(self) -> None:
        self.by_id: dict[int, torch.Tensor] = {}
        self.by_fingerprint: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if id(x) not in self.by_id:
            key = (tuple(x.shape), x.dtype, float(x.flatten()[::97].sum(dtype=torch.float64)))
            same = [y for y in self.by_fingerprint.setdefault(key, []) if torch.equal(x, y)]
            if not same:
                self.by_fingerprint[key].append(x)
            self.by_id[id(x)] = same[0] if same else x
        return self.by_id[id(x)]


@torch.no_grad()
def permuted_inputs(members: list[Member], j: int, dev: torch.device, cache: dict
                     ) -> tuple[list[int], PermutedInputs, PermutedInputs]:
    """distinct_inputs for tasks whose transform is a PixelPermutation: a base per distinct stored train and
    test images (by content), a row per distinct (train base, test base, pixel order). ``cache`` keeps the
    stacked bases from task to task (the tasks of a permuted stream share their images)."""
    canonical = cache.setdefault("canonical", CanonicalOrder())
    bases: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] = ({}, {})  # per split: id -> images, in order
    row_of: dict[tuple[int, int, bytes], int] = {}
    rows, base_of, perms = [], ([], []), []
    for member in members:
        task = member.stream.tasks[j]
        which = []
        for split, x in zip(bases, (task.train_x, task.test_x)):
            x = split.setdefault(id(canonical(x)), canonical(x))
            which.append(list(split).index(id(x)))
        key = (*which, task.transform.perm.cpu().numpy().tobytes())
        if key not in row_of:
            row_of[key] = len(perms)
            for of, base in zip(base_of, which):
                of.append(base)
            perms.append(task.transform.perm)
        rows.append(row_of[key])
    perm, shape = torch.stack(perms).to(dev), (1, *task.transform.shape)
    out = []
    for split, of in zip(bases, base_of):
        key = ("images", tuple(split))
        if key not in cache:
            cache[key] = torch.stack([x.to(dev).reshape(len(x), -1) for x in split.values()])
        out.append(PermutedInputs(cache[key], of, perm, shape, cache))
    return rows, out[0], out[1]


@torch.no_grad()
def distinct_inputs(members: list[Member], tasks: list[list[Task]], j: int, cache: dict | None = None
                     ) -> tuple[list[int], DenseInputs | PermutedInputs, DenseInputs | PermutedInputs]:
    """Task j's train and test inputs after the task transform, V rows of them, once per distinct content, and
    each member's row among them: members of a (rho_a, rho_b) grid with one seed and rho_a hold equal inputs
    in separate streams, a strength sweep's members of one seed the same stream. The transform writes in
    chunks straight into the stacked tensors (no second copy of them); pixel permutations are kept as the
    images and each row's order (PermutedInputs)."""
    if all(type(m.stream.tasks[j].transform) is PixelPermutation for m in members):
        return permuted_inputs(members, j, tasks[0][j].train_x.device, {} if cache is None else cache)
    objects: dict[int, int] = {}  # task object -> the first member holding it
    for b, member in enumerate(members):
        objects.setdefault(id(member.stream.tasks[j]), b)

    def stacked(split: str) -> torch.Tensor:  # room for every object; pages of unused rows are never touched
        task = tasks[next(iter(objects.values()))][j]
        x = getattr(task, f"{split}_x")
        probe = task.inputs(x[:1])
        return torch.empty((len(objects), len(x), *probe.shape[1:]), dtype=probe.dtype, device=probe.device)

    train, test = stacked("train"), stacked("test")
    row_of: dict[int, int] = {}
    by_fingerprint: dict[tuple, list[int]] = {}
    rows = 0
    for key, b in objects.items():
        task = tasks[b][j]
        for x, out in ((task.train_x, train[rows]), (task.test_x, test[rows])):
            for start in range(0, len(x), 4096):
                out[start:start + 4096] = task.inputs(x[start:start + 4096])
        # a cheap fingerprint (a strided sample); equal ones are then compared in full
        fingerprint = tuple(float(x[rows].flatten()[::97].sum(dtype=torch.float64)) for x in (train, test))
        same = [r for r in by_fingerprint.get(fingerprint, [])
                if torch.equal(train[r], train[rows]) and torch.equal(test[r], test[rows])]
        if same:
            row_of[key] = same[0]  # and the next object overwrites this row
        else:
            row_of[key] = rows
            by_fingerprint.setdefault(fingerprint, []).append(rows)
            rows += 1
    return [row_of[id(m.stream.tasks[j])] for m in members], DenseInputs(train[:rows]), DenseInputs(test[:rows])
