"""hvae: variational autoencoders, from the VAE to hierarchical VAEs and the variational diffusion model, correct to
the equation."""

__version__ = "0.1.0"

from .checkpoint import load
from .distributions import DiagonalGaussian
from .likelihoods import Bernoulli, DiscretizedLogistic, Gaussian
from .models import MODELS, VAE, VDM, LadderConfig, LadderVAE, MHVAE, MHVAEConfig, VAEConfig, VDMConfig, build_model
from .objectives import (OBJECTIVES, ElboObjective, ElboTerms, IwaeObjective, bits_per_dim, elbo, iw_bound,
                         log_importance_weights)
from .protocol import Level, Trace

__all__ = ["load", "DiagonalGaussian", "Bernoulli", "DiscretizedLogistic", "Gaussian", "VAE", "MHVAE", "LadderVAE",
           "VAEConfig", "MHVAEConfig", "LadderConfig", "VDM", "VDMConfig", "MODELS", "build_model", "ElboTerms",
           "ElboObjective", "IwaeObjective", "OBJECTIVES", "bits_per_dim", "elbo", "iw_bound",
           "log_importance_weights", "Level", "Trace", "train"]


def __getattr__(name: str):
    # hvae.train (loop.train) is imported on first use: `import hvae` stays free of Lightning Fabric.
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module 'hvae' has no attribute {name!r}")
