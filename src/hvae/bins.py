"""A Gaussian over the grid of V bin centres c_k = (2k + 1)/V - 1 in [-1, 1] (spacing d = 2/V), computed without
touching all V bins: what the VDM's exact likelihood p(x | z_0) and its x-prediction need on 8-bit data (V = 256),
where [batch, pixels, V] tensors made a training step 9.1 times slower (BENCHMARKS.md 9d).

    p_k = exp(-P/2 (c_k - m)^2) / sum_j exp(-P/2 (c_j - m)^2),  k = 0..V-1,  precision P > 0.

- bin_window: the W bins around the mode that hold all of its mass to float precision (the tail beyond them has
  logits at least WINDOW_LOGIT_GAP below the top: e^-50 of the mass), so a softmax over them is the softmax over all
  V bins. Used by likelihoods.BinnedGaussian.log_prob, where P = SNR(0) is one number for the whole batch.
- grid_gaussian_mean: E_p[c]. A narrow posterior (std < NARROW_STDS bins, or a mode beyond an edge with its mass
  within that many bins of it) by the softmax over its window of
  2 NARROW_HALF + 1 bins (>= 6 std each side: exact to ~1e-8); a wide one by the midpoint rule read backwards:
  sum_k h(c_k) d = int_{-1}^{1} h - d^2/24 [h'(1) - h'(-1)] + O(d^4) for h = the Gaussian density and c times it,
  closed forms in Phi and phi (error below 2e-6 from std = 5 bins on, where the O(d^4) term is largest).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WINDOW_LOGIT_GAP = 50.0  # bin_window's bins hold every bin whose logit is within this of the top one
NARROW_STDS = 5.0  # grid_gaussian_mean: std below this many bins -> the window softmax, else the closed form
NARROW_HALF = 30  # ... whose window is 2 * 30 + 1 bins: >= 6 std each side of the mode


def bin_centres(vocab_size: int, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """c_k = (2k + 1) / V - 1, k = 0..V-1: the V bin centres in [-1, 1] (V = 2: -0.5, 0.5). -> [V]."""
    k = torch.arange(vocab_size, dtype=dtype or torch.get_default_dtype(), device=device)
    return (2 * k + 1) / vocab_size - 1


def window_half_width(max_std: float, vocab_size: int) -> int:
    """Bins each side of the mode that bin_window needs for a Gaussian of std max_std (in c units): the bins whose
    logit -(c_k - m)^2 / (2 std^2) is within WINDOW_LOGIT_GAP of the top, plus one for the rounding of the mode."""
    spacing = 2.0 / vocab_size
    return math.ceil(math.sqrt(2 * WINDOW_LOGIT_GAP) * max_std / spacing) + 1


def bin_window(m: Tensor, half: int, vocab_size: int) -> Tensor:
    """The centres of 2 half + 1 consecutive bins around the one nearest m (shifted inside the grid at its edges):
    m [*] -> [*, min(2 half + 1, V)]. When m lies beyond an edge, the mass sits at that edge, which the window
    holds; so does any bin within half bins of the mode."""
    width = min(2 * half + 1, vocab_size)
    nearest = torch.round((m + 1) * (vocab_size / 2) - 0.5).clamp(0, vocab_size - 1)
    first = (nearest - half).clamp(0, vocab_size - width)
    k = first.unsqueeze(-1) + torch.arange(width, dtype=m.dtype, device=m.device)  # [*, W]
    return (2 * k + 1) / vocab_size - 1


def _window_mean(m: Tensor, precision: Tensor, vocab_size: int) -> Tensor:
    """E_p[c] by the softmax over the NARROW_HALF window around the mode: m, precision [N] -> [N]."""
    c = bin_window(m, NARROW_HALF, vocab_size)  # [N, W]
    p = torch.softmax(-0.5 * precision.unsqueeze(-1) * (c - m.unsqueeze(-1)).square(), dim=-1)
    return torch.linalg.vecdot(p, c)


def _closed_form_mean(m: Tensor, precision: Tensor, vocab_size: int) -> Tensor:
    """E_p[c] for a wide posterior, by the corrected midpoint rule (module docstring): m, precision [N] -> [N].

    With std = P^-1/2, a = (-1 - m)/std, b = (1 - m)/std, k = d^2/24 and Z = Phi(b) - Phi(a):
        sum_k p_k-weights d = Z + k (b phi(b) - a phi(a)) / std^2                                      (den)
        sum_k c_k weights d - m den = std (phi(a) - phi(b)) - k (phi(b) - phi(a)) / std
                                      + k ((1 - m) b phi(b) + (1 + m) a phi(a)) / std^2            (num)
    and E[c] = m + num / den. Why the reflection and the factor: the grid is symmetric, so the mean at m is minus the
    mean at -m; with m <= 0 only a can be positive, and for a > 0 (the mode below the grid) Z, phi(a) and phi(b)
    all carry exp(-a^2/2), which is divided out (Z through erfcx) so that no term underflows."""
    sign = torch.where(m > 0, -1.0, 1.0).to(m.dtype)
    m = m * sign  # <= 0
    std = torch.rsqrt(precision)
    a, b = (-1 - m) / std, (1 - m) / std  # b > 0, b > a
    a_pos = a.clamp(min=0)
    scale_a, scale_b = (torch.exp(-0.5 * (a.square() - a_pos.square())),
                        torch.exp(-0.5 * (b.square() - a_pos.square())))  # phi(.) sqrt(2 pi) / exp(-a_pos^2/2)
    phi_a, phi_b = scale_a / math.sqrt(2 * math.pi), scale_b / math.sqrt(2 * math.pi)
    r2 = math.sqrt(0.5)
    z_tail = 0.5 * (torch.special.erfcx(a_pos * r2) - torch.special.erfcx(b * r2) * scale_b)  # a >= 0
    z_mid = 0.5 * (torch.erf(b * r2) - torch.erf(a.clamp(max=0) * r2))  # a < 0
    z = torch.where(a > 0, z_tail, z_mid)
    k = (2.0 / vocab_size) ** 2 / 24
    den = z + k * (b * phi_b - a * phi_a) / std.square()
    num = (std * (phi_a - phi_b) - k * (phi_b - phi_a) / std
           + k * ((1 - m) * b * phi_b + (1 + m) * a * phi_a) / std.square())
    return sign * (m + num / den)


def grid_gaussian_mean(m: Tensor, precision: Tensor, vocab_size: int) -> Tensor:
    """E[c] under p_k proportional to exp(-precision/2 (c_k - m)^2) over the V bin centres: m, precision [*]
    (broadcast together; precision > 0) -> [*], within [c_0, c_{V-1}], differentiable in both.

    Each element takes the window softmax or the closed form by its std (module docstring); only the elements of
    each kind are computed, so a batch of mixed noise levels costs ~1/8 of the full V-bin softmax at V = 256. The
    closed form runs in float64: for std >> 1 its num and den are differences of nearly equal terms."""
    m, precision = torch.broadcast_tensors(m, precision)
    shape, m, precision = m.shape, m.reshape(-1), precision.reshape(-1)
    # The scale of the mass at its densest point: std, or for a mode beyond an edge, where the density decays from
    # the edge bin at the rate P (|m| - 1), the smaller 1 / (P (|m| - 1)).
    scale = NARROW_STDS * 2.0 / vocab_size
    beyond = (m.detach().abs() - 1).clamp(min=0)
    narrow = (precision.detach() * scale**2 > 1) | (precision.detach() * beyond * scale > 1)
    out = m.new_zeros(m.shape)
    out = out.masked_scatter(narrow, _window_mean(m[narrow], precision[narrow], vocab_size))
    wide = _closed_form_mean(m[~narrow].double(), precision[~narrow].double(), vocab_size)
    out = out.masked_scatter(~narrow, wide.to(m.dtype))
    half_bin = 1.0 / vocab_size
    return out.clamp(-1 + half_bin, 1 - half_bin).view(shape)
