"""Small numerical helpers shared by distributions, likelihoods and objectives.

- log-mean-exp: log (1/K) sum_k exp(a_k), computed with logsumexp for stability.
- sums over event dimensions: the one reduction rule (sum over event dims, per example).
- bounded log-variance: variances never come from an unbounded exp of a network output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)
LOG_VAR_MIN = -14.0  # variance >= 8e-7: keeps log q finite when a posterior sharpens
LOG_VAR_MAX = 10.0
VARIANCES = ("clamp", "softplus")  # the kinds bounded_log_var knows


def sum_event(t: Tensor, event_ndim: int) -> Tensor:
    """Sum the trailing `event_ndim` dims: [..., *event] -> [...]."""
    if event_ndim == 0:
        return t
    return t.sum(dim=tuple(range(-event_ndim, 0)))


def log_mean_exp(a: Tensor, dim: int = 0) -> Tensor:
    """log (1/K) sum_k exp(a_k) along `dim`, stable for large |a|."""
    return torch.logsumexp(a, dim=dim) - math.log(a.shape[dim])


def vp_alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)), elementwise (any shape): a diffusion model's
    variance-preserving schedule at gamma = -log SNR; alpha^2 + sigma^2 = 1, SNR = alpha^2 / sigma^2 = exp(-gamma)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def bounded_log_var(raw: Tensor, kind: str = "softplus") -> Tensor:
    """Map an unconstrained network output to a log-variance in a safe range.

    softplus: var = softplus(raw) + 1e-6 (smooth, never 0); clamp: log_var = clamp(raw).
    """
    if kind == "softplus":
        return torch.log(F.softplus(raw) + 1e-6)
    if kind == "clamp":
        return raw.clamp(LOG_VAR_MIN, LOG_VAR_MAX)
    raise ValueError(f"unknown variance parameterization {kind!r}; use 'softplus' or 'clamp'")
