"""Models: compositions of nets and distributions that satisfy the protocol (no loss, no loop)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nets import NORMS
from .ladder import LadderVAE
from .levels import level_sizes
from .mhvae import MHVAE
from .vae import VAE

__all__ = ["VAE", "MHVAE", "LadderVAE", "build_model", "build_checked"]

MODELS = ("vae", "mhvae", "ladder")


def build_model(cfg, data_shape: Sequence[int]) -> nn.Module:
    """The model named by a ModelConfig, for data of shape [C, H, W]."""
    if cfg.name == "vae":
        return VAE(data_shape, cfg.latent_dim, cfg.hidden, cfg.arch, cfg.conv_channels, cfg.likelihood,
                   cfg.activation, cfg.variance)
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; choose one of {', '.join(MODELS)}")
    if cfg.name == "mhvae" and cfg.arch != "mlp":
        raise ValueError(f"model 'mhvae' has only the 'mlp' arch; got model.arch={cfg.arch!r}")
    if cfg.norm not in NORMS:
        raise ValueError(f"unknown model.norm {cfg.norm!r}; choose one of {', '.join(NORMS)}")
    dims = level_sizes(cfg.latent_dims, cfg.levels, cfg.latent_dim)
    common = dict(hidden=cfg.hidden, level_hidden=cfg.level_hidden, likelihood=cfg.likelihood,
                  activation=cfg.activation, variance=cfg.variance, norm=cfg.norm)
    if cfg.name == "mhvae":
        return MHVAE(data_shape, dims, **common)
    return LadderVAE(data_shape, dims, posterior=cfg.posterior, skip=cfg.skip, arch=cfg.arch,
                     conv_channels=cfg.conv_channels, **common)


def build_checked(cfg, data_shape: Sequence[int]) -> nn.Module:
    """build_model, then score two blank inputs, so that a bad config value (a name only a forward pass reads, an
    empty or negative size) fails here, as one ValueError line, and not mid-run. Leaves the RNG streams as found."""
    from ..objectives import elbo

    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = build_model(cfg, data_shape)
            elbo(model, torch.zeros(2, *data_shape))
    except (ValueError, IndexError, TypeError, RuntimeError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return model
