"""Observation models p_theta(x|z): the reconstruction term log p(x|z) of eq. 3.

Every likelihood sums log-probabilities over the data dims and returns one value per example, in nats.
Parameters may carry leading sample dims ([S, B, *data]); x is [B, *data] and broadcasts.

- Bernoulli on logits l:   log p(x|z) = sum_i [x_i l_i - softplus(l_i)]        (binarized data)
- Gaussian:                log N(x; mu, s^2) with a fixed or learned log-scale   (continuous data)
- Discretized logistic:    mass of a logistic over the bin [x - 1/255, x + 1/255] (8-bit data in [-1, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .numerics import LOG_2PI, sum_event

KINDS = ("bernoulli", "gaussian", "gaussian-learned", "logistic")


@dataclass(frozen=True)
class Bernoulli:
    """p(x|z) = prod_i Bern(x_i; sigmoid(l_i)). logits: [S?, B, *data]."""

    logits: Tensor
    event_ndim: int

    def log_prob(self, x: Tensor) -> Tensor:
        """sum_i x_i l_i - softplus(l_i) (= -BCE with logits), per example: -> [S?, B]."""
        return sum_event(x * self.logits - F.softplus(self.logits), self.event_ndim)

    @property
    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)

    def sample(self) -> Tensor:
        return torch.bernoulli(self.mean)


@dataclass(frozen=True)
class Gaussian:
    """p(x|z) = N(x; loc, exp(2 log_scale)). loc, log_scale: [S?, B, *data] (log_scale may broadcast)."""

    loc: Tensor
    log_scale: Tensor
    event_ndim: int

    def log_prob(self, x: Tensor) -> Tensor:
        """-1/2 sum_i [log 2pi + 2 log s_i + (x_i - mu_i)^2 / s_i^2], per example: -> [S?, B]."""
        sq = ((x - self.loc) * torch.exp(-self.log_scale)).pow(2)
        return -0.5 * sum_event(LOG_2PI + 2.0 * self.log_scale + sq, self.event_ndim)

    @property
    def mean(self) -> Tensor:
        return self.loc

    def sample(self) -> Tensor:
        return self.loc + torch.exp(self.log_scale) * torch.randn_like(self.loc)


@dataclass(frozen=True)
class DiscretizedLogistic:
    """8-bit data scaled to [-1, 1]: P(x) = CDF(x + 1/255) - CDF(x - 1/255), edge bins open-ended.

    This is a probability mass over the 256 bins (PixelCNN++), so no dequantization offset is added.
    """

    loc: Tensor
    log_scale: Tensor
    event_ndim: int

    def log_prob(self, x: Tensor) -> Tensor:
        """log of the bin mass, summed over data dims: -> [S?, B]. x must lie on the 256-level grid."""
        centered = x - self.loc
        inv_s = torch.exp(-self.log_scale)
        plus, minus = inv_s * (centered + 1.0 / 255), inv_s * (centered - 1.0 / 255)
        log_cdf_plus = F.logsigmoid(plus)
        log_one_minus_cdf_min = F.logsigmoid(-minus)
        # Interior bins: log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log(1 - exp(log sigmoid(b) - log sigmoid(a))),
        # taken on the side of the loc away from saturation (a = plus, b = minus left of it; mirrored right of it),
        # so the mass stays exact in the far tails, where the plain difference of sigmoids underflows.
        right = centered > 0
        a, b = torch.where(right, -minus, plus), torch.where(right, -plus, minus)
        log_sig_a = F.logsigmoid(a)
        log_mass = log_sig_a + torch.log((-torch.expm1(F.logsigmoid(b) - log_sig_a)).clamp_min(1e-30))
        # Bins narrow against the scale (half-width below 0.005 scales): the difference above cancels in float32,
        # while the density at the centre times the width is exact to about 1e-6 nats there.
        mid = inv_s * centered
        log_pdf_mid = mid - self.log_scale - 2.0 * F.softplus(mid) - math.log(127.5)
        inner = torch.where(inv_s * (1.0 / 255) < 5e-3, log_pdf_mid, log_mass)
        log_p = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner))
        return sum_event(log_p, self.event_ndim)

    @property
    def mean(self) -> Tensor:
        return self.loc.clamp(-1.0, 1.0)

    def sample(self) -> Tensor:
        u = torch.rand_like(self.loc).clamp(1e-5, 1 - 1e-5)
        x = self.loc + torch.exp(self.log_scale) * (torch.log(u) - torch.log1p(-u))
        return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def channels_per_pixel(kind: str) -> int:
    """How many decoder outputs each data value needs: 1 (logits / fixed-scale mean) or 2 (loc, scale)."""
    if kind not in KINDS:
        raise ValueError(f"unknown likelihood {kind!r}; choose one of {', '.join(KINDS)}")
    return 2 if kind in ("gaussian-learned", "logistic") else 1


def make_likelihood(kind: str, params: Tensor, event_ndim: int, fixed_log_scale: float = 0.0):
    """Build p(x|z) from decoder outputs. params: [S?, B, C * k, ...] with k = channels_per_pixel(kind).

    The split is along the channel dim -event_ndim (data shape [C, H, W] or [D]).
    """
    channels_per_pixel(kind)  # rejects an unknown kind with the list of valid ones
    if kind == "bernoulli":
        return Bernoulli(params, event_ndim)
    if kind == "gaussian":
        return Gaussian(params, torch.full((), fixed_log_scale, dtype=params.dtype, device=params.device), event_ndim)
    loc, raw_scale = params.chunk(2, dim=-event_ndim)
    log_scale = raw_scale.clamp(-7.0, 5.0)  # why: bounded scale, never an unbounded exp
    cls = Gaussian if kind == "gaussian-learned" else DiscretizedLogistic
    return cls(loc, log_scale, event_ndim)


def decode_likelihood(decoder: Callable[[Tensor], Tensor], z: Tensor, kind: str, data_shape: Sequence[int]):
    """p(x|z) from a decoder network over flat rows: z [*lead, D] -> decoder [N, D] -> [N, k*C, H, W] ->
    a likelihood with parameters [*lead, k*C, H, W] (k = channels_per_pixel(kind); data shape [C, H, W] or [D])."""
    lead = z.shape[:-1]
    out = decoder(z.reshape(-1, z.shape[-1]))
    params = out.reshape(*lead, channels_per_pixel(kind) * data_shape[0], *data_shape[1:])
    return make_likelihood(kind, params, len(data_shape))
