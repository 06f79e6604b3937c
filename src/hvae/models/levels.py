"""Helpers shared by the models (vae.py, mhvae.py, ladder.py): per-level temperatures and latent sizes."""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence


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
