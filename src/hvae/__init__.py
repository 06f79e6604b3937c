"""hvae: variational autoencoders, from the VAE to hierarchical VAEs, correct to the equation."""

__version__ = "0.1.0"

from .checkpoint import load
from .distributions import DiagonalGaussian
from .likelihoods import Bernoulli, DiscretizedLogistic, Gaussian
from .models import VAE, LadderVAE, MHVAE, build_model
from .objectives import (ElboTerms, TrainingObjective, bits_per_dim, elbo, iw_bound, log_importance_weights,
                         training_objective)
from .protocol import Level, Trace

__all__ = ["load", "DiagonalGaussian", "Bernoulli", "DiscretizedLogistic", "Gaussian", "VAE", "MHVAE", "LadderVAE", "build_model",
           "ElboTerms", "TrainingObjective", "bits_per_dim", "elbo", "iw_bound", "log_importance_weights",
           "training_objective", "Level", "Trace"]
