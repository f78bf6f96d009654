"""L2P, Learning to Prompt: a prompt pool on a frozen pretrained ViT.

Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022.
Algorithm (per batch)::

    q   = [CLS] feature of the frozen backbone on the raw input      (no prompts)
    idx = top-N keys by cosine(q, k_i), i = 1..M                      (per sample)
    z   = backbone([P_idx ; embedded patches])                        (prompts at the first block)
    y^  = head(mean of z over the N * L_p prompt positions)
    loss = CE(y^ with classes outside the current task masked, y) - lambda * sum_N cosine(q, k_idx)

Only prompts, keys and the linear head train; the backbone stays frozen.
Class-incremental: one head over all classes, masked during training only;
prompts are chosen per sample at test (no batch vote, which would leak the
task). Optional diversification (paper Eq. 4, ``diversify``): during
training, distances to prompts used often on earlier tasks are scaled by their
selection frequency. Backbone: a local checkpoint (``backbone_checkpoint``,
e.g. from ``clbench pretrain``; loaded strictly, every weight must match) or
timm's hub weights (``backbone_pretrained``, needs the network). The result
records the backbone and the prompt-selection histogram per task (training,
and test after the last task).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.core.errors import ClbenchError
from clbench.core.registry import register_strategy
from clbench.core.strategy import Strategy
from clbench.core.types import Stream, Task


def load_backbone(name: str | None, args: dict[str, Any] | None, checkpoint: str | None,
                  pretrained: bool) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen timm ViT (no classifier) and a description of where its weights came from."""
    from clbench.models.pretrain import checkpoint_metadata

    if checkpoint and pretrained:
        raise ClbenchError("give either backbone_checkpoint=PATH or backbone_pretrained=true, not both")
    if not checkpoint and not pretrained:
        raise ClbenchError("l2p needs a pretrained backbone: backbone_checkpoint=PATH (make one offline with "
                           "`clbench pretrain --output PATH`) or backbone_pretrained=true (timm hub, needs the network)")
    meta = checkpoint_metadata(checkpoint) if checkpoint else {}
    state = checkpoint_state(checkpoint) if checkpoint else None
    name = name or meta.get("backbone") or "vit_base_patch16_224.augreg_in21k"
    args = {**meta.get("backbone_args", {}), **(args or {})}
    if checkpoint:  # the architecture the metadata names, built without memory, must match the weights first:
        with torch.device("meta"):  # a small file naming a ViT-L must not cost gigabytes before it is refused
            load_checkpoint_strict(_build(name, args, False), state, checkpoint, name, load=False)
    model = _build(name, args, not checkpoint)
    if checkpoint:
        load_checkpoint_strict(model, state, checkpoint, name)
    model.requires_grad_(False).eval()
    source = {"source": "checkpoint" if checkpoint else "hub", "name": name, "args": args,
              "file": str(checkpoint) if checkpoint else None, "pretraining": meta or None}
    return model, source


def _build(name: str, args: dict[str, Any], pretrained: bool) -> nn.Module:
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **args)
    except Exception as e:  # noqa: BLE001 - timm raises many kinds; the user needs one line
        raise ClbenchError(f"cannot build the L2P backbone {name!r} ({type(e).__name__}: {e}); check backbone, "
                           "backbone_args and the checkpoint (a timm ViT state dict)") from None
    if not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
        raise ClbenchError(f"backbone {name!r} is not a timm VisionTransformer; use a vit_* model")
    return model


def checkpoint_state(path: str) -> dict[str, torch.Tensor]:
    """The ViT weights in a checkpoint (a state dict, or one under "state_dict" / "model"), checked to look like
    a ViT's before any backbone is built (a wrong file fails at once, not after building a ViT-B)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClbenchError(f"backbone checkpoint {path!r} holds no state dict of tensors; pass a timm ViT state "
                           "dict, e.g. one written by `clbench pretrain`")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "patch_embed.proj.weight" not in state:
        shown = ", ".join(list(state)[:4]) + (" ..." if len(state) > 4 else "")
        raise ClbenchError(f"backbone checkpoint {path!r} does not hold a timm ViT's weights (no "
                           f"patch_embed.proj.weight; its keys: {shown or 'none'}); pass a timm ViT state dict, e.g. "
                           "one written by `clbench pretrain`")
    return state


def load_checkpoint_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str, name: str,
                           load: bool = True) -> None:
    """Load ``state`` into ``model`` (the classifier head aside); any missing, unexpected or misshapen weight is an
    error, never a backbone left partly random. ``load=False`` only compares (e.g. with a model on the meta
    device, which has shapes but no memory)."""
    try:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)  # timm's own conversions (e.g. position-embedding size)
    except Exception:  # noqa: BLE001 - the comparison below says what does not fit
        pass
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("head.") or k in expected}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshapen:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if keys]
        raise ClbenchError(f"backbone checkpoint {path!r} does not match the backbone {name!r} "
                           f"({'; '.join(parts)}); pass backbone=NAME and backbone_args={{...}} for the architecture "
                           "it was saved from (a `clbench pretrain` checkpoint records them)")
    if load:
        model.load_state_dict(state, strict=True)


class PromptedViT(nn.Module):
    """Frozen ViT + prompt pool (M x L_p x D), keys (M x D) and a linear head over all classes."""

    def __init__(self, backbone: nn.Module, num_classes: int, pool_size: int, prompt_length: int, top_n: int,
                 normalize: tuple | None) -> None:
        super().__init__()
        self.backbone, self.top_n = backbone, top_n
        d = backbone.embed_dim
        self.prompts = nn.Parameter(torch.randn(pool_size, prompt_length, d) * 0.02)  # at the scale of ViT tokens
        self.keys = nn.Parameter(torch.empty(pool_size, d).uniform_(-1, 1))
        self.head = nn.Linear(d, num_classes)
        self.size = backbone.patch_embed.img_size
        self.in_chans = backbone.patch_embed.proj.in_channels
        self.normalize = normalize
        self.penalty_weights: torch.Tensor | None = None  # diversification during training

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in the backbone's format: channels repeated, resized, normalised as it was trained."""
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ClbenchError(f"backbone takes {self.in_chans} input channels, the stream gives {x.shape[1]}")
            x = x.expand(-1, self.in_chans, -1, -1)
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=tuple(self.size), mode="bilinear", align_corners=False)
        if self.normalize is not None:
            mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in self.normalize)
            x = (x - mean) / std
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = self.adapt(x)
        with torch.no_grad():
            q = F.normalize(vit.forward_head(vit.forward_features(x), pre_logits=True), dim=1)
        sim = q @ F.normalize(self.keys, dim=1).T                        # B x M cosine
        score = sim if self.penalty_weights is None or not self.training else -(1 - sim) * self.penalty_weights
        self.idx = score.topk(self.top_n, dim=1).indices                  # B x N, per sample
        self.matched = sim.gather(1, self.idx).sum(1).mean()              # surrogate: sum over N, mean over batch
        tokens = vit._pos_embed(vit.patch_embed(x))
        prompts = self.prompts[self.idx].flatten(1, 2)                    # B x N*L_p x D
        z = vit.norm(vit.blocks(vit.norm_pre(torch.cat([prompts, tokens], 1))))
        return self.head(z[:, : prompts.shape[1]].mean(1))


@register_strategy("l2p")
class L2P(Strategy):
    """Learning to Prompt: prompt pool with keys on a frozen ViT, class-masked training (Wang et al. 2022)."""

    scenarios = ("class",)
    train_defaults = {"optimizer": "adam"}

    def __init__(self, pool_size: int = 10, prompt_length: int = 5, top_n: int = 5, key_weight: float = 0.1,
                 diversify: bool = True, backbone: str | None = None, backbone_args: dict | None = None,
                 backbone_checkpoint: str | None = None, backbone_pretrained: bool = False, **train) -> None:
        super().__init__(**train)
        if not 1 <= int(top_n) <= int(pool_size) or int(prompt_length) < 1:
            raise ClbenchError(f"l2p needs 1 <= top_n <= pool_size and prompt_length >= 1; got "
                               f"top_n={top_n}, pool_size={pool_size}, prompt_length={prompt_length}")
        if backbone_args is not None and not isinstance(backbone_args, dict):
            raise ClbenchError(f"backbone_args must be a dict, e.g. {{'img_size': 28}}; got {backbone_args!r}")
        self.pool_size, self.prompt_length, self.top_n = int(pool_size), int(prompt_length), int(top_n)
        self.key_weight, self.diversify = float(key_weight), bool(diversify)
        self.backbone_spec = (backbone, backbone_args, backbone_checkpoint, bool(backbone_pretrained))
        self.train_counts: dict[int, torch.Tensor] = {}
        self.test_counts: dict[int, torch.Tensor] = {}

    def setup(self, model: nn.Module, stream: Stream) -> nn.Module:
        super().setup(model, stream)
        if stream.loss != "ce":
            raise ClbenchError("l2p is for classification streams (loss 'ce')")
        backbone, self.backbone_source = load_backbone(*self.backbone_spec)
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        normalize = (cfg["mean"], cfg["std"]) if self.backbone_source["source"] == "hub" and "mean" in cfg else None
        device = next(model.parameters()).device
        self.model = PromptedViT(backbone, stream.num_outputs, self.pool_size, self.prompt_length, self.top_n,
                                 normalize).to(device)
        return self.model

    def before_task(self, task: Task) -> None:
        classes = task.classes if task.classes is not None else torch.unique(task.train_y).tolist()
        self.mask = torch.full((self.stream.num_outputs,), float("-inf"), device=task.train_y.device)
        self.mask[torch.as_tensor(classes, device=self.mask.device)] = 0.0
        if self.diversify and self.train_counts:
            h = torch.stack(list(self.train_counts.values())).sum(0).float()
            self.model.penalty_weights = h / h.sum() + 1e-3 / self.pool_size  # Eq. 4; ties go to similarity

    def forward(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        logits = self.model(x)
        counts = self.train_counts if self.model.training else self.test_counts
        new = torch.bincount(self.model.idx.flatten(), minlength=self.pool_size)
        counts[task.id] = counts[task.id] + new if task.id in counts else new
        return logits

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        logits = self.forward(x, task) + self.mask                         # classes outside the task: -inf
        return self.task_loss(logits, y) - self.key_weight * self.model.matched

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.model.prompts, self.model.keys, *self.model.head.parameters()]

    def after_task(self, task: Task) -> None:
        self.test_counts = {}  # the engine's evaluation after this task fills it again

    def extra_results(self) -> dict[str, Any]:
        hist = lambda counts: {str(k): v.tolist() for k, v in sorted(counts.items())}  # noqa: E731
        return {"l2p_backbone": self.backbone_source, "l2p_prompt_histogram_train": hist(self.train_counts),
                "l2p_prompt_histogram_test": hist(self.test_counts)}
