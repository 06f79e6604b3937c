"""Network building blocks: MLPs, small conv stacks, residual cells, Gaussian heads with bounded variance, and the
noise-level embeddings and small U-Net of a denoiser.

No distributions or objectives here; models compose these with distributions.py.
"""

from __future__ import annotations

import math
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


# Blocks for denoisers conditioned on a noise level (models/vdm.py).


def sinusoidal_embedding(g: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """[sin(scale g f_j), cos(scale g f_j)], f_j = 10000^(-j / (dim/2 - 1)) (the Transformer's): g [B] -> [B, dim].

    scale 1000: g in [0, 1] then spans the frequencies as a step index in 0..1000 would (VDM, DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=g.device) / max(half - 1, 1))
    angles = scale * g.float()[:, None] * freqs  # [B, half]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


def fourier_features(z: Tensor, start: int = 6, stop: int = 8) -> Tensor:
    """sin and cos of 2^k 2 pi z, k = start..stop-1, along dim 1: [B, C, ...] -> [B, 2 (stop - start) C, ...].

    Why: on 8-bit data scaled to [-1, 1] the bins are 2^-7 apart, so 2^6 and 2^7 cycles per unit make the fine
    detail that decides the bin visible to a smooth network (VDM's Fourier features)."""
    w = 2 * math.pi * 2.0 ** torch.arange(start, stop, dtype=z.dtype, device=z.device)  # [F]
    h = (z.unsqueeze(2) * w.view(1, 1, -1, *[1] * (z.dim() - 2))).flatten(1, 2)  # [B, C * F, ...]
    return torch.cat([h.sin(), h.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide `channels`."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class EmbeddingResBlock(nn.Module):
    """x + f(x, e): norm-act-conv3x3, plus a per-channel projection of e, norm-act-conv3x3 (zero-initialized, so
    the block starts as its skip path); a 1x1 conv on the skip path when the channels change.
    x [B, c_in, H, W], e [B, n_emb] -> [B, c_out, H, W]."""

    def __init__(self, c_in: int, c_out: int, n_emb: int, act: str = "silu"):
        super().__init__()
        self.f1 = nn.Sequential(group_norm(c_in), activation(act), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Linear(n_emb, c_out)
        self.f2 = nn.Sequential(group_norm(c_out), activation(act), nn.Conv2d(c_out, c_out, 3, padding=1))
        nn.init.zeros_(self.f2[-1].weight)
        nn.init.zeros_(self.f2[-1].bias)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.f1(x) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.f2(h)


class UNet(nn.Module):
    """A small conv U-Net conditioned on a vector: [B, c_in, H, W], e [B, n_emb] -> [B, c_out, H, W].

    One EmbeddingResBlock per resolution on the way down (channels[i] at H / 2^i), one in the middle, one per
    resolution on the way up taking the skip of its resolution; stride-2 convs down, nearest x2 + conv up; the
    output conv is zero-initialized (the net starts at 0). H and W must be divisible by 2^(len(channels) - 1).
    e passes through a two-layer MLP first, shared by all blocks."""

    def __init__(self, c_in: int, c_out: int, channels: Sequence[int], n_emb: int, act: str = "silu"):
        super().__init__()
        ch, n_cond = list(channels), 4 * n_emb
        self.cond = mlp([n_emb, n_cond, n_cond], act, final_act=True)
        self.conv_in = nn.Conv2d(c_in, ch[0], 3, padding=1)
        self.down = nn.ModuleList(EmbeddingResBlock(a, b, n_cond, act) for a, b in zip([ch[0], *ch[:-1]], ch))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in ch[:-1])
        self.mid = EmbeddingResBlock(ch[-1], ch[-1], n_cond, act)
        self.upsample = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                                    nn.Conv2d(b, a, 3, padding=1)) for a, b in zip(ch[:-1], ch[1:]))
        self.up = nn.ModuleList(EmbeddingResBlock(2 * c, c, n_cond, act) for c in ch)
        self.out = nn.Sequential(group_norm(ch[0]), activation(act), nn.Conv2d(ch[0], c_out, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        e, h, skips = self.cond(e), self.conv_in(x), []
        for i, block in enumerate(self.down):  # h: [B, channels[i], H / 2^i, W / 2^i]
            h = block(h, e)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, e)
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):
                h = self.upsample[i](h)  # [B, channels[i + 1], ...] -> [B, channels[i], 2x]
            h = self.up[i](torch.cat([h, skips[i]], dim=1), e)
        return self.out(h)
