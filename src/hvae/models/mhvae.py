"""The write-up's Markovian hierarchical VAE (seed eq. 6-8), level 1 nearest x, z_0 = x.

Generative (eq. 6, whose p(x|z_t) means p(x|z_1)):
    p(x, z_1:T) = p(z_T) p(x|z_1) prod_{t=2..T} p(z_{t-1}|z_t),   p(z_T) = N(0, I)
Inference (eq. 7), bottom-up:
    q(z_1:T|x) = q(z_1|x) prod_{t=2..T} q(z_t|z_{t-1})
ELBO (eq. 8), computed by objectives.py from the Trace: log p(x|z_1) - sum_t rate_t with
    rate_t = log q(z_t|z_{t-1}) - log p(z_t|z_{t+1}) at the sample, t < T (Monte Carlo, may be < 0),
    rate_T = KL(q(z_T|z_{T-1}) || N(0, I)) in closed form.
The closed form is valid only at the top: p(z_t|z_{t+1}) depends on z_{t+1}, which q samples after z_t.

Every conditional is a diagonal Gaussian from a small MLP. q(z_1|x) and p(x|z_1) are the VAE's networks
under the VAE's parameter names, so with T = 1 this is exactly the VAE (same weights, same noise, same ELBO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..distributions import DiagonalGaussian
from ..likelihoods import channels_per_pixel, decode_likelihood
from ..nets import GaussianHead, GaussianMLP, mlp
from ..protocol import Level, Trace
from .levels import HierarchyOptions, ModelOptions, per_level


@dataclass
class MHVAEConfig(HierarchyOptions, ModelOptions):
    """`model.name: mhvae`: the write-up's Markovian HVAE, MLPs only."""

    name: ClassVar[str] = "mhvae"

    def build(self, data_shape: Sequence[int]) -> "MHVAE":
        return MHVAE(data_shape, self.dims(), hidden=self.hidden, level_hidden=self.level_hidden,
                     likelihood=self.likelihood, activation=self.activation, variance=self.variance, norm=self.norm)


class MHVAE(nn.Module):
    """T Markov levels. data_shape: [C, H, W] (or [D]); latent_dims: D_1..D_T; z_t: [S, B, D_t]."""

    def __init__(self, data_shape: Sequence[int] = (1, 28, 28), latent_dims: Sequence[int] = (32, 32),
                 hidden: Sequence[int] = (512, 256), level_hidden: Sequence[int] = (256,),
                 likelihood: str = "bernoulli", activation: str = "relu", variance: str = "clamp",
                 norm: str = "none"):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.latent_dims = tuple(latent_dims)
        self.likelihood = likelihood
        n_data, k, d = math.prod(self.data_shape), channels_per_pixel(likelihood), self.latent_dims
        # Level 1: the VAE's q(z_1|x) and p(x|z_1), same module names (T = 1 loads a VAE's state dict).
        self.encoder = nn.Sequential(nn.Flatten(), mlp([n_data, *hidden], activation, final_act=True))
        self.head = GaussianHead(hidden[-1] if hidden else n_data, d[0], variance)
        self.decoder = mlp([d[0], *reversed(hidden), k * n_data], activation)
        # up[i]: q(z_{i+2} | z_{i+1});  down[i]: p(z_{i+1} | z_{i+2})  (i = 0..T-2).
        self.up = nn.ModuleList(GaussianMLP(d[i], level_hidden, d[i + 1], activation, norm, variance)
                                for i in range(len(d) - 1))
        self.down = nn.ModuleList(GaussianMLP(d[i + 1], level_hidden, d[i], activation, norm, variance)
                                  for i in range(len(d) - 1))

    @property
    def n_levels(self) -> int:
        return len(self.latent_dims)

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z_1|x) (eq. 7, first factor). x: [B, *data] -> Gaussian over [B, D_1]."""
        return self.head(self.encoder(x))

    def infer(self, x: Tensor, n_samples: int = 1) -> Trace:
        """z_1 ~ q(z_1|x), then z_t ~ q(z_t|z_{t-1}) up the chain (eq. 7); each z_t scored under
        p(z_t|z_{t+1}) (eq. 6), the top under N(0, I). z_t: [S, B, D_t]."""
        qs = [self.posterior(x)]  # [B, D_1]
        zs = [qs[0].rsample(n_samples)]  # [S, B, D_1]
        for up in self.up:
            qs.append(up(zs[-1]))  # q(z_t | z_{t-1}): [S, B, D_t]
            zs.append(qs[-1].rsample())
        priors = [down(z) for down, z in zip(self.down, zs[1:])]  # p(z_{t-1} | z_t), t = 2..T
        levels = [Level(z, q, p, analytic_kl=False) for z, q, p in zip(zs, qs, priors)]
        # The top: for T > 1, q(z_T | z_{T-1}) carries the S samples of z_{T-1}; level_rate averages its KL.
        top_q = qs[-1]
        levels.append(Level(zs[-1], top_q, DiagonalGaussian.standard(top_q.mean), analytic_kl=True))
        return Trace(tuple(levels))

    def decode(self, z1: Tensor):
        """p(x|z_1). z1: [*lead, D_1] -> likelihood with parameters [*lead, k*C, H, W]."""
        return decode_likelihood(self.decoder, z1, self.likelihood, self.data_shape)

    def encode_levels(self, x: Tensor) -> list[Tensor]:
        """The bottom-up chain of posterior means: z_1 = E q(z_1|x), z_t = E q(z_t|z_{t-1}). -> T x [B, D_t]."""
        zs = [self.posterior(x).mean]
        for up in self.up:
            zs.append(up(zs[-1]).mean)
        return zs

    def encode(self, x: Tensor) -> Tensor:
        """E_q[z_1 | x]: [B, D_1] (what decode takes)."""
        return self.posterior(x).mean

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of p(x | z_1 = E_q[z_1]): [B, *data]."""
        return self.decode(self.encode(x)).mean

    def descend(self, z: Tensor, from_level: int, temperature: float | Sequence[float] = 1.0) -> Tensor:
        """Given z_t at level t = from_level, draw z_{t-1}, ..., z_1 from p(z_{s-1}|z_s), each std scaled by
        its level's temperature (level 1 first; 0 gives the conditional mean). z: [n, D_t] -> z_1 [n, D_1]."""
        temps = per_level(temperature, self.n_levels)
        for t in range(from_level, 1, -1):
            z = self.down[t - 2](z).rsample(temperature=temps[t - 2])
        return z

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0) -> Tensor:
        """z_T ~ N(0, t_T^2 I), then down the chain (eq. 6) with per-level temperatures; the mean of
        p(x|z_1): [n, *data]. `temperature`: one float, or T floats (level 1 first)."""
        temps = per_level(temperature, self.n_levels)
        weight = self.head.linear.weight  # z_T on the model's device, in its dtype
        z_top = DiagonalGaussian.standard(torch.empty(n, self.latent_dims[-1], device=weight.device, dtype=weight.dtype))
        z = z_top.rsample(temperature=temps[-1])
        return self.decode(self.descend(z, self.n_levels, temps)).mean

    def resample_lower(self, x: Tensor, keep: int, temperature: float | Sequence[float] = 1.0,
                       use_mean: bool = True) -> Tensor:
        """Encode x, keep the top `keep` levels' posterior values (means, or samples if not use_mean) and
        redraw the levels below from the prior; the mean of p(x|z_1): [B, *data].

        In the Markov chain only the lowest kept level, z_{T-keep+1}, reaches the levels below it.
        keep = T keeps z_1 (a reconstruction); keep = 0 ignores x (a sample).
        """
        if not 0 <= keep <= self.n_levels:
            raise ValueError(f"keep must be in 0..{self.n_levels}; got {keep}")
        if keep == 0:
            return self.sample(len(x), temperature)
        if use_mean:
            zs = self.encode_levels(x)
        else:
            zs = [lvl.z[0] for lvl in self.infer(x, 1).levels]
        t = self.n_levels - keep + 1  # the lowest kept level
        return self.decode(self.descend(zs[t - 1], t, temperature)).mean
