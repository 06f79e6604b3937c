"""Network building blocks: MLPs, small conv stacks, residual cells, Gaussian heads with bounded variance.

No distributions or objectives here; models compose these with distributions.py.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
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


class OneChannelConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with one output channel, computed on a CPU as one matmul and a col2im (F.fold):
    [B, C, H, W] -> [B, 1, H', W'], the same parameters and result as the parent. oneDNN's kernel for one
    output channel is 1.3-1.7x slower to train and 2.3-3.3x slower to evaluate (BENCHMARKS.md, section 2b)."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or output_size is not None or self.groups != 1
                or any(op >= s for op, s in zip(self.output_padding, self.stride))):  # F.fold has no such blocks
            return super().forward(x, output_size)
        (h, w), (kh, kw) = x.shape[-2:], self.kernel_size
        out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, k, op in
               zip((h, w), self.stride, self.padding, self.dilation, (kh, kw), self.output_padding)]
        cols = torch.matmul(self.weight.flatten(1).t(), x.flatten(2))  # [B, kh*kw, H*W]
        y = F.fold(cols, out, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def conv_decoder(channels: Sequence[int], out_channels: int, act: str = "relu") -> nn.Sequential:
    """Mirror of conv_encoder with 4x4 stride-2 transposed convolutions (no activation on the output)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, (*channels[1:], out_channels)):
        deconv = OneChannelConvTranspose2d if c_out == 1 else nn.ConvTranspose2d
        layers += [deconv(c_in, c_out, 4, stride=2, padding=1), activation(act)]
    return nn.Sequential(*layers[:-1])


# Blocks for the hierarchical models (models/mhvae.py, models/ladder.py).

NORMS = ("none", "layer", "batch")


class FlatBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dim of [..., n] (statistics over all leading dims, e.g. samples and batch)."""

    def forward(self, h: Tensor) -> Tensor:
        return super().forward(h.reshape(-1, h.shape[-1])).reshape(h.shape)


def norm_layer(kind: str, n: int) -> nn.Module | None:
    """LayerNorm, BatchNorm (over all leading dims) or nothing, by name."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
    if kind == "none":
        return None
    return nn.LayerNorm(n) if kind == "layer" else FlatBatchNorm(n)


def normed_mlp(sizes: Sequence[int], act: str = "relu", final_act: bool = True, norm: str = "none") -> nn.Sequential:
    """Linear layers sizes[0] -> ... -> sizes[-1], each followed by [norm] + act (the last only if final_act).

    One size gives the identity ([..., n] -> [..., n]): a level with no hidden layers is linear in its inputs.
    """
    layers: list[nn.Module] = []
    for i, n_out in enumerate(sizes[1:]):
        layers.append(nn.Linear(sizes[i], n_out))
        if i < len(sizes) - 2 or final_act:
            layer = norm_layer(norm, n_out)
            layers += ([layer] if layer is not None else []) + [activation(act)]
    return nn.Sequential(*layers)


class GaussianMLP(nn.Module):
    """A diagonal Gaussian from a small MLP: [..., n_in] -> DiagonalGaussian over [..., n_out].

    hidden = () makes it linear: mean = W h + b, log_var = V h + c.
    """

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, act: str = "relu", norm: str = "none",
                 variance: str = "clamp"):
        super().__init__()
        self.trunk = normed_mlp([n_in, *hidden], act, final_act=True, norm=norm)
        self.head = GaussianHead(hidden[-1] if hidden else n_in, n_out, variance)

    def forward(self, h: Tensor) -> DiagonalGaussian:
        return self.head(self.trunk(h))
