"""The VAE of the write-up: q_phi(z|x) = N(mu_phi(x), sigma_phi(x)^2 I) (eq. 4), p(z) = N(0, I) (eq. 5),
p_theta(x|z) a likelihood from likelihoods.py. MLP (default 784-512-256 -> 32 -> 256-512-784) or conv nets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..distributions import DiagonalGaussian
from ..errors import ConfigError
from ..likelihoods import channels_per_pixel, decode_likelihood
from ..nets import GaussianHead, conv_decoder, conv_encoder, mlp
from ..protocol import Level, Trace
from ..schema import option
from .levels import ModelOptions, per_level


@dataclass
class VAEConfig(ModelOptions):
    """`model.name: vae`: one latent level, MLP or conv nets."""

    name: ClassVar[str] = "vae"
    arch: str = option("mlp", choices=("mlp", "conv"))
    conv_channels: list[int] = option([32, 64], each_ge=1, min_len=1, help="conv arch: channels per stride-2 stage")

    def build(self, data_shape: Sequence[int]) -> "VAE":
        return VAE(data_shape, self.latent_dim, self.hidden, self.arch, self.conv_channels, self.likelihood,
                   self.activation, self.variance)


class VAE(nn.Module):
    """One latent level. data_shape: [C, H, W] (or [D]); z: [S, B, latent_dim]."""

    def __init__(self, data_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 32,
                 hidden: Sequence[int] = (512, 256), arch: str = "mlp", conv_channels: Sequence[int] = (32, 64),
                 likelihood: str = "bernoulli", activation: str = "relu", variance: str = "clamp"):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        k = channels_per_pixel(likelihood)
        n_data = math.prod(self.data_shape)
        if arch == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), mlp([n_data, *hidden], activation, final_act=True))
            self.decoder = mlp([latent_dim, *reversed(hidden), k * n_data], activation)
            feat = hidden[-1] if hidden else n_data
        elif arch == "conv":
            c, h, w = self.data_shape
            down = 2 ** len(conv_channels)
            if h % down or w % down:
                raise ConfigError(f"model.arch conv needs H and W divisible by {down} (2^len(model.conv_channels)); "
                                  f"got {h}x{w}")
            self._grid = (conv_channels[-1], h // down, w // down)
            feat = math.prod(self._grid)
            self.encoder = nn.Sequential(conv_encoder(c, conv_channels, activation), nn.Flatten())
            self.decoder = nn.Sequential(
                nn.Linear(latent_dim, feat), nn.ReLU(), nn.Unflatten(1, self._grid),
                conv_decoder(list(reversed(conv_channels)), k * c, activation))
        else:
            raise ValueError(f"unknown arch {arch!r}; choose 'mlp' or 'conv'")
        self.head = GaussianHead(feat, latent_dim, variance)

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x) (eq. 4). x: [B, *data] -> Gaussian over [B, latent_dim]."""
        return self.head(self.encoder(x))

    def infer(self, x: Tensor, n_samples: int = 1) -> Trace:
        """z ~ q(z|x) by reparameterization, scored under p(z) = N(0, I). z: [S, B, D]."""
        q = self.posterior(x)
        z = q.rsample(n_samples)
        return Trace((Level(z, q, DiagonalGaussian.standard(q.mean), analytic_kl=True),))

    def decode(self, z1: Tensor):
        """p(x|z). z1: [*lead, D] -> likelihood with parameters [*lead, k*C, H, W]."""
        return decode_likelihood(self.decoder, z1, self.likelihood, self.data_shape)

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean E_q[z]: [B, D]."""
        return self.posterior(x).mean

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x | z = E_q[z]): [B, *data]."""
        return self.decode(self.encode(x)).mean

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0) -> Tensor:
        """z ~ N(0, t^2 I) (t = 0: z = 0), decoded to the mean of p(x|z): [n, *data]. One level: one t."""
        temperature = per_level(temperature, 1)[0]
        weight = self.head.linear.weight
        p = DiagonalGaussian.standard(torch.empty(n, self.latent_dim, device=weight.device, dtype=weight.dtype))
        return self.decode(p.rsample(temperature=temperature)).mean
