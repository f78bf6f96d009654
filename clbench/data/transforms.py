"""Per-task input transforms that run on the device, vectorised over the batch.

Each transform maps a batch of stored (compact, uint8) inputs to float model
inputs and has ``.to(device)`` so the engine can move its tensors once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PixelPermutation:
    """uint8 images (B, H, W) -> float (B, 1, H, W) in [0, 1] with pixels gathered by ``perm``."""

    def __init__(self, perm: torch.Tensor, shape: tuple[int, int] = (28, 28)) -> None:
        self.perm, self.shape = perm.long(), shape

    def to(self, device) -> "PixelPermutation":
        return PixelPermutation(self.perm.to(device), self.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1)  # gather: the same copy as index_select on dim 1, ~10x faster on uint8 rows
        flat = torch.gather(flat, 1, self.perm.expand(len(flat), -1))
        return flat.float().div_(255).view(len(x), 1, *self.shape)


class Normalize:
    """uint8 images (B, C, H, W) -> float, scaled to [0, 1] then standardised per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def to(self, device) -> "Normalize":
        out = Normalize((0.0,), (1.0,))
        out.mean, out.std = self.mean.to(device), self.std.to(device)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean) / self.std


class Scale:
    """uint8 images -> float in [0, 1], with a channel axis added to (B, H, W) input."""

    def to(self, device) -> "Scale":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        return x.unsqueeze(1) if x.dim() == 3 else x


class RandomCropFlip:
    """Training augmentation on float (B, C, H, W): random crop after zero padding, random horizontal flip.

    One gather for the whole batch: no per-sample Python.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding, self.flip = padding, flip

    def to(self, device) -> "RandomCropFlip":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (B, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * p + 1, (B, 1, 1), device=x.device)
        rows = (torch.arange(H, device=x.device).view(1, H, 1) + dy).expand(B, H, W)
        cols = torch.arange(W, device=x.device).view(1, 1, W) + dx
        if self.flip:
            flip = torch.rand(B, 1, 1, device=x.device) < 0.5
            cols = torch.where(flip, cols.flip(-1), cols)
        cols = cols.expand(B, H, W)
        index = (rows * (W + 2 * p) + cols).view(B, 1, H * W).expand(B, C, H * W)
        return padded.view(B, C, -1).gather(2, index).view(B, C, H, W)
