"""Diagonal Gaussians: the posterior q_phi(z|x) and prior p(z) of the write-up (eq. 4-5).

- Reparameterized sample (the reparameterization trick): z = mu + sigma * eps, eps ~ N(0, I).
- log N(z; mu, sigma^2 I) = -1/2 sum_d [log 2pi + log sigma_d^2 + (z_d - mu_d)^2 / sigma_d^2].
- Closed-form KL between diagonal Gaussians (the prior-matching term of eq. 3):
  KL(q || p) = 1/2 sum_d [log s_p^2 - log s_q^2 + (s_q^2 + (m_q - m_p)^2) / s_p^2 - 1],
  which for p = N(0, I) is 1/2 sum_d [m_q^2 + s_q^2 - log s_q^2 - 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .numerics import LOG_2PI, sum_event


@dataclass(frozen=True)
class DiagonalGaussian:
    """N(mean, exp(log_var) I) over the trailing `event_ndim` dims of `mean`.

    mean, log_var: [..., *event]; log_prob and kl return [...] in nats.
    """

    mean: Tensor
    log_var: Tensor
    event_ndim: int = 1
    is_standard: bool = False  # N(0, I): lets kl() take the cheaper closed form

    @staticmethod
    def standard(like: Tensor, event_ndim: int = 1) -> "DiagonalGaussian":
        """N(0, I) shaped like `like` (eq. 5). Zero tensors broadcast cheaply."""
        zeros = torch.zeros((), dtype=like.dtype, device=like.device).expand(like.shape)
        return DiagonalGaussian(zeros, zeros, event_ndim, is_standard=True)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.log_var)

    def rsample(self, n_samples: int | None = None, temperature: float = 1.0) -> Tensor:
        """z = mu + t * sigma * eps, eps ~ N(0, I): [S, *batch, *event] (no S dim if n_samples is None).

        Differentiable in mean and log_var (the reparameterization trick); t = 0 gives the mean.
        """
        shape = self.mean.shape if n_samples is None else (n_samples, *self.mean.shape)
        eps = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)
        if temperature == 1.0:
            return self.mean + self.std * eps
        return self.mean + (temperature * self.std) * eps

    def log_prob(self, z: Tensor) -> Tensor:
        """log N(z; mean, var I) summed over event dims. z: [S?, *batch, *event] -> [S?, *batch]."""
        sq = (z - self.mean).pow(2) * torch.exp(-self.log_var)
        return -0.5 * sum_event(LOG_2PI + self.log_var + sq, self.event_ndim)

    def kl(self, other: "DiagonalGaussian") -> Tensor:
        """KL(self || other) in closed form (eq. 3's prior-matching term). -> [*batch], nats >= 0."""
        if other.is_standard:
            return self.kl_standard()
        var_ratio = torch.exp(self.log_var - other.log_var)
        sq = (self.mean - other.mean).pow(2) * torch.exp(-other.log_var)
        return 0.5 * sum_event(var_ratio + sq - 1.0 - (self.log_var - other.log_var), self.event_ndim)

    def kl_standard(self) -> Tensor:
        """KL(self || N(0, I)) = 1/2 sum (mu^2 + sigma^2 - log sigma^2 - 1). -> [*batch], nats."""
        return 0.5 * sum_event(self.mean.pow(2) + torch.exp(self.log_var) - 1.0 - self.log_var, self.event_ndim)
