"""The model protocol that every objective and metric is written against (see docs/design).

A model's inference pass returns a `Trace`: for each latent level t = 1..T (level 1 nearest x) the
sample z_t drawn from the posterior q, the prior p that z_t is scored under, and whether the closed-form
KL(q || p) may stand in for the sampled log-ratio at that level. It may, only if p does not depend on
latents that q samples after z_t: true at every level of top-down (ladder) inference, and only at the
top level of the write-up's bottom-up Markovian HVAE (eq. 7).

A model with continuously many levels (a diffusion model) cannot list them; it offers instead a
`StochasticBoundModel.stochastic_bound`: per-example terms of a variational lower bound estimated with one
random draw (for VDM one (t, eps) per example) at each call. A model may offer both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from .distributions import DiagonalGaussian


class ElboTerms(NamedTuple):
    """Per-example terms in nats: reconstruction, kl (all levels) and elbo = reconstruction - kl: [B];
    kl_per_level: [T, B], level 1 (nearest x) first."""

    reconstruction: Tensor
    kl: Tensor
    elbo: Tensor
    kl_per_level: Tensor


@dataclass(frozen=True)
class Level:
    """One latent level: z [S, B, *event] drawn from q, scored under p; `analytic_kl` as above."""

    z: Tensor
    q: DiagonalGaussian
    p: DiagonalGaussian
    analytic_kl: bool = True


@dataclass(frozen=True)
class Trace:
    """The levels of one inference pass, level 1 (nearest x) first."""

    levels: tuple[Level, ...]

    @property
    def z1(self) -> Tensor:
        """The sample of the level the likelihood conditions on: [S, B, *event]."""
        return self.levels[0].z


@runtime_checkable
class LatentVariableModel(Protocol):
    """A model with explicit latent levels: infer, decode, sample (and the data shape they work on).

    What the ELBO terms (eq. 8), the importance-weighted bound, active units and KL per level need."""

    data_shape: tuple[int, ...]

    def infer(self, x: Tensor, n_samples: int = 1) -> Trace:
        """Sample z_1:T ~ q(z_1:T | x) with the reparameterization trick; report each level's q and p."""

    def decode(self, z1: Tensor):
        """p(x | z_1) as a likelihood object (log_prob, mean, sample). z1: [S, B, *event]."""

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """Draw z_T ~ p (std scaled by temperature), decode down the hierarchy; return the mean of p(x|z_1)."""


@dataclass(frozen=True)
class BoundTerms:
    """One draw of a stochastic lower bound, per example, nats: reconstruction, kl (>= 0 in expectation) and
    elbo = reconstruction - kl, each [B]; `extra` names the terms that kl splits into, each [B] (for VDM:
    prior_kl and diffusion, with kl = prior_kl + diffusion)."""

    reconstruction: Tensor
    kl: Tensor
    elbo: Tensor
    extra: Mapping[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class StochasticBoundModel(Protocol):
    """What the stochastic-bound metrics need: one unbiased draw of a variational lower bound per call."""

    data_shape: tuple[int, ...]

    def stochastic_bound(self, x: Tensor) -> BoundTerms:
        """A fresh draw (for VDM one t and one eps per example) of the bound's terms for x [B, *data]: BoundTerms
        of [B], nats; E[elbo] over the draws is the model's ELBO <= log p(x)."""


@runtime_checkable
class DiffusionModel(Protocol):
    """A variational diffusion model (VDM): the Markovian HVAE of eq. 6-8 whose latents z_t, t in [0, 1], have the
    data's shape and whose encoder is fixed, q(z_t | x) = N(alpha_t x, sigma_t^2 I) with the variance-preserving
    alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), gamma = -log SNR. What its bound (diffusion.py) needs.

    x, in the loop's input space (binarized {0, 1}, or 8-bit k/255), enters as the centres of its vocabulary's
    bins, c in [-1, 1] (likelihoods.bin_centres)."""

    data_shape: tuple[int, ...]
    vocab_size: int  # 2 (binarized images) or 256 (8-bit)
    timesteps: int  # T of the discrete-time model; 0: continuous time

    def gamma(self, t: Tensor) -> Tensor:
        """The noise schedule gamma(t) = -log SNR(t), increasing: t [B] in [0, 1] -> [B] (differentiable in t)."""

    def to_centres(self, x: Tensor) -> Tensor:
        """Data in the input space [B, *data] -> its bins' centres c [B, *data] in [-1, 1]."""

    def predict_x(self, z_t: Tensor, gamma_t: Tensor) -> Tensor:
        """The denoiser: x_hat = E[c | z_t] [B, *data] (bin-centre units) for z_t [B, *data], gamma_t [B]."""

    def decode(self, z0: Tensor):
        """p(x | z_0): the exact discrete likelihood over the vocabulary (likelihoods.BinnedGaussian) at gamma(0)."""
