"""Models: compositions of nets and distributions that satisfy the protocol (no loss, no loop).

Each model declares its config class beside its code (VAEConfig in vae.py, ...); the class's `build(data_shape)`
makes the model. A new model: one file with the model and its config, plus one line in MODELS.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .ladder import LadderConfig, LadderVAE
from .mhvae import MHVAE, MHVAEConfig
from .vae import VAE, VAEConfig
from .vdm import VDM, VDMConfig

__all__ = ["VAE", "MHVAE", "LadderVAE", "VAEConfig", "MHVAEConfig", "LadderConfig", "VDM", "VDMConfig", "MODELS",
           "build_model"]

MODELS: dict[str, type] = {"vae": VAEConfig, "mhvae": MHVAEConfig, "ladder": LadderConfig, "vdm": VDMConfig}


def build_model(cfg, data_shape: Sequence[int]) -> nn.Module:
    """The model a model config describes (`model` section of a Config), for data of shape [C, H, W]. The model
    keeps its config as `model.config` (what a run directory's config.json records)."""
    model = cfg.build(tuple(data_shape))
    model.config = cfg
    return model
