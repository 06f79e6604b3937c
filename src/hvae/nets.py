"""Network building blocks: MLPs, small conv stacks, residual cells, Gaussian heads with bounded variance.

No distributions or objectives here; models compose these with distributions.py.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .distributions import DiagonalGaussian
from .numerics import bounded_log_var

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(sizes: Sequence[int], act: str = "relu", final_act: bool = False, norm: bool = False) -> nn.Sequential:
    """Linear layers sizes[0] -> ... -> sizes[-1] with `act` between them (and after the last if final_act)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_act:
            if norm:
                layers.append(nn.LayerNorm(n_out))
            layers.append(activation(act))
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Linear map to (mean, log_var) of a diagonal Gaussian: [..., n_in] -> DiagonalGaussian over [..., n_out]."""

    def __init__(self, n_in: int, n_out: int, variance: str = "clamp"):
        super().__init__()
        self.linear = nn.Linear(n_in, 2 * n_out)
        self.variance = variance

    def forward(self, h: Tensor) -> DiagonalGaussian:
        mean, raw = self.linear(h).chunk(2, dim=-1)
        return DiagonalGaussian(mean, bounded_log_var(raw, self.variance))


class ResidualCell(nn.Module):
    """x + f(x) with f = norm-act-conv3x3-norm-act-conv3x3 (pre-activation); the last conv starts small."""

    def __init__(self, channels: int, act: str = "silu"):
        super().__init__()
        self.f = nn.Sequential(
            nn.BatchNorm2d(channels), activation(act), nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels), activation(act), nn.Conv2d(channels, channels, 3, padding=1),
        )
        with torch.no_grad():
            self.f[-1].weight.mul_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


def conv_encoder(in_channels: int, channels: Sequence[int], act: str = "relu") -> nn.Sequential:
    """Stride-2 4x4 convolutions: [B, C, H, W] -> [B, channels[-1], H / 2^n, W / 2^n]."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
    return nn.Sequential(*layers)


def conv_decoder(channels: Sequence[int], out_channels: int, act: str = "relu") -> nn.Sequential:
    """Mirror of conv_encoder with 4x4 stride-2 transposed convolutions (no activation on the output)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, (*channels[1:], out_channels)):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
    return nn.Sequential(*layers[:-1])
