"""Helpers shared by the hierarchical models (mhvae.py, ladder.py): per-level temperatures, latent sizes,
and the Gaussian of a level whose parameters depend on sampled latents.

A level's rate with a closed-form KL (eq. 3's prior-matching term, per level of eq. 8) is
E_{z_cond ~ q}[KL(q(z_t | z_cond) || p(z_t | z_cond))] when both q and p are conditioned on latents z_cond
sampled before z_t. Its Monte Carlo estimate averages the closed-form KL over the S samples of z_cond.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from ..distributions import DiagonalGaussian


@dataclass(frozen=True)
class ConditionalGaussian(DiagonalGaussian):
    """A DiagonalGaussian whose parameters carry the S samples it was conditioned on: mean [S, B, *event].

    kl() returns the rate per example, the closed-form KL averaged over those S samples: -> [B], nats.
    (objectives.level_rate expects a [B] rate from a level's closed-form KL.) log_prob and rsample are
    the DiagonalGaussian's: log_prob(z) with z [S, B, *event] -> [S, B].
    """

    @staticmethod
    def of(g: DiagonalGaussian) -> "ConditionalGaussian":
        return ConditionalGaussian(g.mean, g.log_var, g.event_ndim)

    def kl(self, other: DiagonalGaussian) -> Tensor:
        """mean_S KL(q(z_t | z_cond^s) || p(z_t | z_cond^s)): [S, B, *event] params -> [B], nats >= 0."""
        return super().kl(other).mean(0)


def per_level(temperature: float | Sequence[float], n_levels: int) -> list[float]:
    """One temperature for every level, or one per level (level 1, nearest x, first) -> list of T floats."""
    if isinstance(temperature, (int, float)):
        temps = [float(temperature)] * n_levels
    else:
        temps = [float(t) for t in temperature]
    if len(temps) != n_levels:
        raise ValueError(f"got {len(temps)} temperatures for {n_levels} levels; give one, or one per level "
                         "(level 1, nearest x, first)")
    if any(t < 0 for t in temps):
        raise ValueError(f"temperatures must be >= 0; got {temps}")
    return temps


def level_sizes(latent_dims: Sequence[int], levels: int, latent_dim: int) -> tuple[int, ...]:
    """D_1..D_T from a config: latent_dims if given (its length must be `levels`), else latent_dim each."""
    if levels < 1:
        raise ValueError(f"model.levels must be >= 1; got {levels}")
    dims = tuple(latent_dims) if latent_dims else (latent_dim,) * levels
    if len(dims) != levels:
        raise ValueError(f"model.latent_dims has {len(dims)} sizes but model.levels is {levels}; "
                         "give one size per level (level 1, nearest x, first) or leave latent_dims empty")
    if any(d < 1 for d in dims):
        raise ValueError(f"model.latent_dims must be >= 1 each; got {list(dims)}")
    return dims
