"""Models: compositions of nets and distributions that satisfy the protocol (no loss, no loop)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .vae import VAE

__all__ = ["VAE", "build_model"]


def build_model(cfg, data_shape: Sequence[int]) -> nn.Module:
    """The model named by a ModelConfig, for data of shape [C, H, W]."""
    if cfg.name == "vae":
        return VAE(data_shape, cfg.latent_dim, cfg.hidden, cfg.arch, cfg.conv_channels, cfg.likelihood,
                   cfg.activation, cfg.variance)
    raise ValueError(f"unknown model {cfg.name!r}; choose 'vae'")
