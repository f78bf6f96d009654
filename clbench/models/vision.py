"""Vision models for the image streams: the reduced ResNet-18 of CL papers and a small timm ViT."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clbench.core.registry import register_model


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model("resnet18-reduced")
def resnet18_reduced(input_shape: tuple[int, ...], num_outputs: int, width: int = 20) -> nn.Module:
    """Reduced ResNet-18 (widths 20-40-80-160) of GEM (Lopez-Paz & Ranzato 2017) and later CL papers."""
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_outputs)]
    return nn.Sequential(*layers)


@register_model("vit-tiny")
def vit_tiny(input_shape: tuple[int, ...], num_outputs: int, patch_size: int = 4, embed_dim: int = 64,
             depth: int = 3, num_heads: int = 4) -> nn.Module:
    """A small Vision Transformer from timm, sized for 28x28 / 32x32 images (CPU-friendly)."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=input_shape[-1],
                             in_chans=input_shape[0], patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, num_classes=num_outputs)
