"""Observation models p_theta(x|z): the reconstruction term log p(x|z) of eq. 3.

Every likelihood sums log-probabilities over the data dims and returns one value per example, in nats.
Parameters may carry leading sample dims ([S, B, *data]); x is [B, *data] and broadcasts.

- Bernoulli on logits l:   log p(x|z) = sum_i [x_i l_i - softplus(l_i)]        (binarized data)
- Gaussian:                log N(x; mu, s^2) with a fixed or learned log-scale   (continuous data)
- Discretized logistic:    mass of a logistic over the bin [x - 1/255, x + 1/255] (8-bit data in [-1, 1])
- Binned Gaussian (VDM's p(x|z_0)): P(x = k | z_0) = softmax_k[-(z_0/alpha_0 - c_k)^2 / (2 sigma_0^2/alpha_0^2)]
  over the V bin centres c_k = (2k + 1)/V - 1, exact when the data values are independent given z_0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .bins import bin_centres, bin_window, window_half_width
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


# The variational diffusion model's exact discrete likelihood. Data in the training loop's input space (binarized
# {0, 1}, or 8-bit k/255 in [0, 1]) is bin k = round(x (V - 1)) of a vocabulary of V values, represented in the
# latent space by the bin's centre c_k in [-1, 1].

VOCAB_SIZES = (2, 256)  # the vocabularies whose input-space encoding bin_index knows


def bin_index(x: Tensor, vocab_size: int) -> Tensor:
    """The bin k of input-space data: round(x (V - 1)), i.e. x for binarized {0, 1} data (V = 2) and x * 255 for
    8-bit data k/255 (V = 256). -> LongTensor shaped like x. x must lie on that grid; it is not checked (a check
    would synchronize with the device at every step)."""
    if vocab_size not in VOCAB_SIZES:
        raise ValueError(f"vocab_size {vocab_size} has no input-space encoding; use 2 (binarized data in {{0, 1}}) "
                         "or 256 (8-bit data k/255 in [0, 1])")
    # Why round, not a cast: (k/255) * 255 in float32 may land just below k, and a cast would truncate it to k - 1.
    return torch.round(x * (vocab_size - 1)).long()


def centres_of(x: Tensor, vocab_size: int) -> Tensor:
    """c = (2 bin_index(x) + 1) / V - 1: input-space data [B, *data] -> its bins' centres in [-1, 1], x's dtype."""
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return (2 * bin_index(x, vocab_size).to(dtype) + 1) / vocab_size - 1


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (autocast), float64 kept: the likelihood is never computed in 16 bits."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ChosenBinLogProb(torch.autograd.Function):
    """log softmax_k[l_k] at the chosen bin x, l_k = -((u - c_k) s)^2 / 2, elementwise: u, s, c_x [*] -> [*]; the
    bins' centres [V], or [*, W] per element (a window of the bins that hold the mass).

    Autograd would keep the [*, V] logits and softmax for backward (V times z_0's size each: 100 MB for 128 MNIST
    images at V = 256). The derivatives are two averages over the softmax p, d/du = s^2 E_p[c_x - c] and
    d/ds = s E_p[(u - c)^2 - (u - c_x)^2] = s E_p[(c_x - c)(2u - c - c_x)], so only those [*] are kept and the
    [*, V] tensors live during the forward alone. First derivatives only (nothing here needs second ones)."""

    @staticmethod
    def forward(ctx, u: Tensor, inv_std: Tensor, c_x: Tensor, centres: Tensor) -> Tensor:
        u_, s_, c_x_ = u.unsqueeze(-1), inv_std.unsqueeze(-1), c_x.unsqueeze(-1)
        p = (u_ - centres).mul_(s_).square_().mul_(-0.5)  # [*, V], the logits l_k
        lse = torch.logsumexp(p, dim=-1)  # [*]
        p.sub_(lse.unsqueeze(-1)).exp_()  # in place: the softmax over the bins
        gap = c_x_ - centres  # [*, V], c_x - c_k
        mean_gap = torch.linalg.vecdot(p, gap)
        mean_sq_diff = torch.linalg.vecdot(p, gap.mul_(2 * u_ - centres - c_x_))
        ctx.save_for_backward(inv_std, mean_gap, mean_sq_diff)
        return -0.5 * (inv_std * (u - c_x)).square() - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        inv_std, mean_gap, mean_sq_diff = ctx.saved_tensors
        return grad * inv_std.square() * mean_gap, grad * inv_std * mean_sq_diff, None, None


@dataclass(frozen=True)
class BinnedGaussian:
    """p(x = k | z_0) ∝ exp(-(z_0/alpha_0 - c_k)^2 / (2 sigma_0^2/alpha_0^2)), independent per data value (VDM).

    alpha_0^2 = sigmoid(-gamma_0), sigma_0^2 = sigmoid(gamma_0), so sigma_0^2/alpha_0^2 = exp(gamma_0).
    z0: [*lead, *data]; gamma0 broadcastable to z0 ([] or [*lead, 1, ..., 1]); x in the input space (bin_index).
    Computed in float32 (float64 kept) with autocast off, whatever the inputs' precision.
    """

    z0: Tensor
    gamma0: Tensor
    vocab_size: int
    event_ndim: int

    def _scaled(self) -> tuple[Tensor, Tensor]:
        """(u, s): u = z_0 / alpha_0 and s = alpha_0 / sigma_0 = exp(-gamma_0 / 2), broadcast to z0's shape."""
        dtype = _compute_dtype(self.z0)
        z0, gamma0 = self.z0.to(dtype), torch.as_tensor(self.gamma0, device=self.z0.device).to(dtype)
        u = z0 * torch.rsqrt(torch.sigmoid(-gamma0))
        return torch.broadcast_tensors(u, torch.exp(-0.5 * gamma0))

    def log_prob(self, x: Tensor) -> Tensor:
        """sum_i log softmax_k[-((u_i - c_k) s)^2 / 2] at k = bin_index(x_i): exact, per example. -> [*lead].

        The softmax runs over the bins around each u_i that hold its mass (bins.bin_window: every bin whose logit is
        within 50 of the top; 7 of 256 at gamma_0 = -13.3) when they are fewer than V: the same value to e^-50."""
        with torch.autocast(self.z0.device.type, enabled=False):
            u, s = self._scaled()
            centres = bin_centres(self.vocab_size, u.dtype, u.device)
            u, s, c_x = torch.broadcast_tensors(u, s, centres[bin_index(x, self.vocab_size)])  # x [B, *data] broadcasts
            half = window_half_width(1.0 / float(s.detach().min()), self.vocab_size)
            if 2 * half + 1 < self.vocab_size:  # the bins that hold the mass: [*, W], the same softmax to e^-50
                centres = bin_window(u.detach(), half, self.vocab_size)
            return sum_event(_ChosenBinLogProb.apply(u, s, c_x, centres), self.event_ndim)

    @property
    def logits(self) -> Tensor:
        """log p(x = k | z_0), normalized over the bins (as torch's Categorical): [*lead, *data, V]. Recomputed at
        each access (not cached: it is V times the size of z0)."""
        with torch.autocast(self.z0.device.type, enabled=False):
            u, s = self._scaled()
            centres = bin_centres(self.vocab_size, u.dtype, u.device)
            return torch.log_softmax(-0.5 * ((u.unsqueeze(-1) - centres) * s.unsqueeze(-1)).square(), dim=-1)

    @property
    def mean(self) -> Tensor:
        """E[k] / (V - 1) in the input space (V = 2: P(x = 1); V = 256: E[k] / 255): [*lead, *data]."""
        probs = self.logits.exp()
        k = torch.arange(self.vocab_size, dtype=probs.dtype, device=probs.device)
        return (probs @ k) / (self.vocab_size - 1)

    def sample(self) -> Tensor:
        """x = k / (V - 1), k ~ p(k | z_0), in the input space: [*lead, *data]."""
        logits = self.logits
        k = torch.distributions.Categorical(logits=logits, validate_args=False).sample()
        return k.to(logits.dtype) / (self.vocab_size - 1)
