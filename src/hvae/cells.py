"""Convolutional cells of the spatial top-down hierarchy (models/spatial.py), in the styles of its anchors:

- residual    norm-act-conv3x3-norm-act-conv3x3 (pre-activation ResNet; the conv ladder's cell)
- bottleneck  norm-act-conv1x1 (C -> C/4)-norm-act-conv3x3-norm-act-conv3x3-norm-act-conv1x1 (C/4 -> C) (VDVAE)
- separable   norm-conv1x1 (C -> 6C)-norm-act-depthwise conv5x5-norm-act-conv1x1 (6C -> C)-norm (NVAE's
              generative cell: a wide receptive field for few parameters)

each as x + SE(f(x)), with an optional squeeze-excitation SE (Hu et al. 2018; NVAE puts one in every cell): a per-channel
gate sigmoid(W2 act(W1 mean_hw(f))). f's last layer starts at a tenth of its default scale, so that a deep stack
starts near the identity. [N, C, H, W] -> [N, C, H, W] throughout; no distributions here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .nets import activation

CELLS = ("residual", "bottleneck", "separable")
CONV_NORMS = ("none", "layer", "batch")
EXPAND = 6  # separable: channels of the depthwise conv per input channel (NVAE's)
SQUEEZE = 16  # squeeze-excitation: channel reduction of its hidden layer (at least 4 units)


def norm2d(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d (batch), GroupNorm with one group (layer: statistics over C, H, W per example) or nothing."""
    if kind not in CONV_NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(CONV_NORMS)}")
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(1, channels) if kind == "layer" else nn.Identity()


class SqueezeExcite(nn.Module):
    """x * sigmoid(W2 act(W1 mean_hw(x))), one gate in (0, 1) per example and channel: [N, C, H, W] -> same."""

    def __init__(self, channels: int, act: str = "silu"):
        super().__init__()
        hidden = max(4, channels // SQUEEZE)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), activation(act), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x.mean((2, 3)))[:, :, None, None]


def _branch(kind: str, c: int, act: str, norm: str) -> nn.Sequential:
    """The residual branch f of a cell of `kind` (module docstring) over c channels."""
    if kind == "residual":
        return nn.Sequential(norm2d(norm, c), activation(act), nn.Conv2d(c, c, 3, padding=1),
                             norm2d(norm, c), activation(act), nn.Conv2d(c, c, 3, padding=1))
    if kind == "bottleneck":
        m = max(1, c // 4)
        return nn.Sequential(norm2d(norm, c), activation(act), nn.Conv2d(c, m, 1),
                             norm2d(norm, m), activation(act), nn.Conv2d(m, m, 3, padding=1),
                             norm2d(norm, m), activation(act), nn.Conv2d(m, m, 3, padding=1),
                             norm2d(norm, m), activation(act), nn.Conv2d(m, c, 1))
    if kind == "separable":
        e = EXPAND * c
        return nn.Sequential(norm2d(norm, c), nn.Conv2d(c, e, 1),
                             norm2d(norm, e), activation(act), nn.Conv2d(e, e, 5, padding=2, groups=e),
                             norm2d(norm, e), activation(act), nn.Conv2d(e, c, 1), norm2d(norm, c))
    raise ValueError(f"unknown cell {kind!r}; choose one of {', '.join(CELLS)}")


class Cell(nn.Module):
    """x + SE(f(x)) (module docstring): [N, C, H, W] -> [N, C, H, W]."""

    def __init__(self, channels: int, kind: str = "residual", act: str = "silu", norm: str = "none", se: bool = False):
        super().__init__()
        self.f = _branch(kind, channels, act, norm)
        self.se = SqueezeExcite(channels, act) if se else nn.Identity()
        last = [m for m in self.f if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm))][-1]
        with torch.no_grad():
            last.weight.mul_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.se(self.f(x))


def cell_stack(n: int, channels: int, kind: str, act: str, norm: str, se: bool) -> nn.Sequential:
    """n Cells in a row (n = 0: the identity)."""
    return nn.Sequential(*(Cell(channels, kind, act, norm, se) for _ in range(n)))
