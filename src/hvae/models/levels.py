"""Helpers shared by the models (vae.py, mhvae.py, ladder.py): the settings every model of today has,
per-level temperatures and latent sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar, Sequence

from ..errors import ConfigError
from ..likelihoods import KINDS
from ..nets import ACTIVATIONS, NORMS
from ..numerics import VARIANCES
from ..schema import option


@dataclass
class ModelOptions:
    """What the VAE, the MHVAE and the LadderVAE share: the size of z (level 1), the data-side MLP, the likelihood."""

    name: ClassVar[str]
    latent_dim: int = option(32, ge=1, help="D, the latent size (of every level unless latent_dims says otherwise)")
    hidden: list[int] = option([512, 256], each_ge=1, help="widths of the encoder x -> h (reversed: the decoder)")
    likelihood: str = option("bernoulli", choices=KINDS, help="p(x|z): bernoulli | gaussian | gaussian-learned | logistic")
    activation: str = option("relu", choices=tuple(ACTIVATIONS))
    variance: str = option("clamp", choices=VARIANCES, help="how a network's log-variance is bounded")


@dataclass
class HierarchyOptions:
    """The levels of a hierarchical model (level 1 nearest x)."""

    levels: int = option(2, ge=1, help="T, the number of latent levels")
    latent_dims: list[int] = option([], each_ge=1, help="D_1..D_T; empty: latent_dim at every level")
    level_hidden: list[int] = option([256], each_ge=1, help="widths of each level's small MLPs")
    norm: str = option("none", choices=NORMS, help="normalization in the level MLPs")

    def check(self) -> None:
        if self.latent_dims and len(self.latent_dims) != self.levels:
            raise ConfigError(f"model.latent_dims has {len(self.latent_dims)} sizes but model.levels is {self.levels}; "
                              "give one size per level (level 1, nearest x, first) or leave latent_dims empty")

    def dims(self) -> tuple[int, ...]:
        """D_1..D_T."""
        return level_sizes(self.latent_dims, self.levels, self.latent_dim)


def per_level(temperature: float | Sequence[float], n_levels: int) -> list[float]:
    """One temperature for every level (a number or a one-item sequence), or one per level (level 1, nearest
    x, first) -> list of T floats."""
    single = isinstance(temperature, Real) or getattr(temperature, "ndim", None) == 0  # numpy/torch scalars too
    temps = [float(temperature)] if single else [float(t) for t in temperature]
    if len(temps) == 1:
        temps = temps * n_levels
    if len(temps) != n_levels:
        raise ValueError(f"got {len(temps)} temperatures for {n_levels} levels; give one, or one per level "
                         "(level 1, nearest x, first)")
    if any(not math.isfinite(t) or t < 0 for t in temps):
        raise ValueError(f"temperatures must be finite and >= 0; got {temps}")
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
