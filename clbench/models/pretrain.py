"""Pretrain a small timm ViT on CPU, so L2P runs end to end offline.

``pretrain(...)`` trains a timm VisionTransformer classifier on a dataset the
user names and saves ``{"state_dict": ..., "clbench": metadata}``, which L2P
loads strictly into the timm model the metadata names (see ``strategies/l2p.py``). Datasets: ``synthetic-digits``
(MNIST-format 28 x 28 digits drawn by this module: stroke templates under
random affine maps and stroke widths; no download, no overlap with any image
stream), or any registered stream (the union of its tasks' training data,
optionally restricted to some classes, e.g. a class set disjoint from the one
L2P is evaluated on). Inputs are the stream's model inputs (synthetic digits:
pixels scaled to [0, 1], like the MNIST-family streams).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clbench.core.errors import ClbenchError
from clbench.core.io import write_or_rescue

BASE_MODEL = "vit_tiny_patch16_224"  # timm's ViT-Ti; its size arguments are overridden below


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 24) -> list[tuple[float, float]]:
    t = np.radians(np.linspace(a0, a1, n))
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))


# Each digit: polylines in the unit box (x right, y down).
DIGIT_STROKES: dict[int, list[list[tuple[float, float]]]] = {
    0: [_arc(0.5, 0.5, 0.33, 0.48, 0, 360)],
    1: [[(0.3, 0.2), (0.55, 0.0), (0.55, 1.0)]],
    2: [_arc(0.5, 0.3, 0.32, 0.28, 180, 380) + [(0.1, 1.0), (0.92, 1.0)]],
    3: [_arc(0.5, 0.26, 0.28, 0.25, -160, 90), _arc(0.5, 0.74, 0.32, 0.26, -90, 160)],
    4: [[(0.7, 1.0), (0.7, 0.0), (0.05, 0.7), (0.95, 0.7)]],
    5: [[(0.85, 0.0), (0.25, 0.0), (0.2, 0.45)] + _arc(0.5, 0.7, 0.33, 0.3, -130, 150)],
    6: [[(0.75, 0.0), (0.22, 0.62)], _arc(0.5, 0.72, 0.28, 0.27, 0, 360)],
    7: [[(0.08, 0.0), (0.92, 0.0), (0.38, 1.0)]],
    8: [_arc(0.5, 0.25, 0.24, 0.24, 0, 360), _arc(0.5, 0.73, 0.3, 0.27, 0, 360)],
    9: [_arc(0.5, 0.28, 0.28, 0.27, 0, 360), [(0.78, 0.3), (0.62, 1.0)]],
}


def _templates(size: int = 28) -> torch.Tensor:
    """The 10 digit templates drawn once (PIL), 16 x 20 px in the middle of a size x size canvas."""
    from PIL import Image, ImageDraw

    out = []
    for d in range(10):
        img = Image.new("L", (size * 4, size * 4))
        draw = ImageDraw.Draw(img)
        for line in DIGIT_STROKES[d]:
            pts = [(4 * (size / 2 + (x - 0.5) * 16), 4 * (size / 2 + (y - 0.5) * 20)) for x, y in line]
            draw.line(pts, fill=255, width=8, joint="curve")
        out.append(torch.from_numpy(np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255))
    return torch.stack(out)[:, None]


def synthetic_digits(n: int, seed: int = 0, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MNIST-format digits (uint8, n x 1 x size x size) and labels 0-9, deterministic in ``seed``.

    Random rotation (+-20 deg), scale (0.8-1.15), shear, translation (+-3 px),
    stroke width (dilation) and pixel noise applied to stroke templates, vectorised.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    angle, scale, shear = torch.deg2rad(u(-20, 20)), u(0.8, 1.15), u(-0.3, 0.3)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, u(-0.2, 0.2)], 1),
                         torch.stack([sin, cos, u(-0.2, 0.2)], 1)], 1)
    x = _templates(size)[y]
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    thick = torch.rand(n, generator=g) < 0.5
    x = torch.where(thick[:, None, None, None], F.max_pool2d(x, 3, 1, 1) * 0.5 + x * 0.5, x)
    x = (x * u(0.7, 1.0)[:, None, None, None] + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), y


def _dataset(dataset: str, dataset_args: dict[str, Any], classes: list[int] | None, samples: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Float inputs, labels 0..K-1, and a description of the data."""
    if dataset == "synthetic-digits":
        x, y = synthetic_digits(samples, seed)
        x, info = x.float() / 255, {"dataset": dataset, "samples": samples, "data_seed": seed}
    else:
        from clbench.core.registry import check_arguments, lookup, names

        if dataset not in names("stream"):
            raise ClbenchError(f"unknown dataset {dataset!r}: use synthetic-digits or a stream name "
                               f"({', '.join(names('stream'))})")
        builder = lookup("stream", dataset)
        check_arguments("stream", dataset, builder, dataset_args)
        stream = builder(**dataset_args)
        x = torch.cat([t.inputs(t.train_x) for t in stream.tasks])
        y = torch.cat([t.train_y if t.head is None else t.head[t.train_y] for t in stream.tasks])
        info = {"dataset": dataset, "dataset_args": dataset_args}
    if y.dtype.is_floating_point or y.ndim != 1:
        raise ClbenchError(f"pretraining needs a classification dataset (integer labels); {dataset!r} has targets "
                           f"of shape {tuple(y.shape[1:])} and type {y.dtype}")
    if classes is not None:
        keep = torch.isin(y, torch.tensor(classes))
        if not keep.any():
            raise ClbenchError(f"no training sample has a label in classes={classes}; pick labels the dataset has")
        x, y = x[keep], y[keep]
    labels, y = torch.unique(y, return_inverse=True)
    if len(labels) < 2:
        raise ClbenchError(f"pretraining needs >= 2 classes; {dataset!r} gives {len(labels)}")
    info.update(classes=labels.tolist(), samples=len(y))
    return x, y, info


def pretrain(
    output: str | Path,
    dataset: str = "synthetic-digits",
    dataset_args: dict[str, Any] | None = None,
    classes: list[int] | None = None,
    samples: int = 10000,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    patch_size: int = 4,
    embed_dim: int = 64,
    depth: int = 3,
    num_heads: int = 4,
    seed: int = 0,
    device: str = "cpu",
    log=print,
) -> dict[str, Any]:
    """Train a tiny ViT classifier on ``dataset`` and save it to ``output``; returns the saved metadata."""
    import timm

    check_settings(samples=samples, epochs=epochs, batch_size=batch_size, lr=lr, patch_size=patch_size,
                   embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    torch.manual_seed(seed)
    x, y, info = _dataset(dataset, dict(dataset_args or {}), classes, samples, seed)
    if x.ndim != 4 or x.shape[-1] != x.shape[-2] or x.shape[-1] % patch_size:
        raise ClbenchError(f"pretraining needs square images whose side is a multiple of patch_size={patch_size}; "
                           f"got inputs of shape {tuple(x.shape[1:])}")
    args = dict(img_size=x.shape[-1], patch_size=patch_size, in_chans=x.shape[1], embed_dim=embed_dim, depth=depth,
                num_heads=num_heads)
    try:
        model = timm.create_model(BASE_MODEL, pretrained=False, num_classes=len(info["classes"]), **args).to(device)
    except Exception as e:  # noqa: BLE001 - timm's assertions on sizes; the user needs one line
        raise ClbenchError(f"cannot build the ViT to pretrain ({type(e).__name__}: {e}); check --patch-size, "
                           "--embed-dim, --depth and --heads") from None
    held = torch.randperm(len(y))[: max(1, len(y) // 10)]
    train = torch.ones(len(y), dtype=torch.bool)
    train[held] = False
    xt, yt = x[train].to(device), y[train].to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(yt) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    for epoch in range(epochs):
        order, total = torch.randperm(len(yt), device=device), 0.0
        for i in range(0, len(yt), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: training loss {total / len(yt):.4f}")
        if not math.isfinite(total) or any(not torch.isfinite(p).all() for p in model.parameters()):
            raise ClbenchError(f"pretraining diverged in epoch {epoch + 1} (training loss {total / len(yt):.4g}, or a "
                               f"weight became NaN or infinite) with lr={lr:g}; lower --lr. No checkpoint was written")
    model.eval()
    with torch.inference_mode():
        acc = (model(x[held].to(device)).argmax(1) == y[held].to(device)).float().mean().item()
    log(f"held-out accuracy {acc:.3f} on {len(held)} samples")
    meta = {"backbone": BASE_MODEL, "backbone_args": args, **info, "epochs": epochs, "lr": lr, "seed": seed,
            "heldout_accuracy": acc, "input": "the dataset's model inputs (synthetic digits: pixels / 255)"}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "clbench": meta}
    write_or_rescue(output, lambda f: torch.save(checkpoint, f), "the checkpoint")
    return meta


def check_settings(**settings: float) -> None:
    """One ClbenchError naming the first pretraining setting out of range (as the CLI spells it)."""
    option = lambda k: "--" + {"num_heads": "heads"}.get(k, k).replace("_", "-")  # noqa: E731
    for k in ("samples", "epochs", "batch_size", "patch_size", "embed_dim", "depth", "num_heads"):
        if int(settings[k]) != settings[k] or settings[k] < (10 if k == "samples" else 1):
            raise ClbenchError(f"{option(k)} must be an integer >= {10 if k == 'samples' else 1}, got {settings[k]}")
    if not (math.isfinite(settings["lr"]) and settings["lr"] > 0):
        raise ClbenchError(f"--lr must be a finite number > 0, got {settings['lr']}")
    if settings["embed_dim"] % settings["num_heads"]:
        raise ClbenchError(f"--embed-dim {settings['embed_dim']} must be a multiple of --heads {settings['num_heads']} "
                           "(each head gets embed_dim / heads dimensions)")


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata ``pretrain`` stored in a checkpoint ({} for a plain state dict)."""
    if not Path(path).is_file():
        raise ClbenchError(f"backbone checkpoint {str(path)!r} not found; make one with `clbench pretrain --output {path}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise ClbenchError(f"cannot read backbone checkpoint {str(path)!r} ({type(e).__name__}: {e}); "
                           "pass a torch state dict file, e.g. one written by `clbench pretrain`") from None
    return dict(ckpt.get("clbench", {})) if isinstance(ckpt, dict) else {}
