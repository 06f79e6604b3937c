"""bins.py against brute force over all V bins, in float64: the Gaussian's mean over the bin grid (window softmax
and corrected midpoint rule) and the windowed exact likelihood of the VDM (likelihoods.BinnedGaussian)."""

from __future__ import annotations

import math

import pytest
import torch

from hvae.bins import NARROW_STDS, bin_centres, bin_window, grid_gaussian_mean, window_half_width
from hvae.likelihoods import BinnedGaussian

V = 256
SPACING = 2 / V
F64 = torch.float64


def brute_mean(m: torch.Tensor, precision: torch.Tensor, vocab: int = V) -> torch.Tensor:
    """E[c] under softmax_k(-precision/2 (c_k - m)^2) over all V bins, by autograd-able brute force."""
    c = bin_centres(vocab, m.dtype)
    return (torch.softmax(-0.5 * precision.unsqueeze(-1) * (c - m.unsqueeze(-1)) ** 2, -1) * c).sum(-1)


# std from far below a bin to far above the grid's width; modes inside, at and far beyond the edges
STDS_IN_BINS = [0.01, 0.3, 1.0, 3.0, NARROW_STDS - 0.1, NARROW_STDS + 0.1, 6.0, 10.0, 30.0, 100.0, 1000.0, 5000.0]


@pytest.mark.parametrize("std_bins", STDS_IN_BINS)
def test_grid_gaussian_mean_is_the_mean_over_all_bins(std_bins):
    m = torch.linspace(-3, 3, 2401, dtype=F64)
    precision = torch.full_like(m, 1 / (std_bins * SPACING) ** 2)
    exact = brute_mean(m, precision)
    # float64: the window softmax is exact (its tail holds < e^-18 of the mass); the corrected midpoint rule's
    # O(d^4) remainder and an edge window's tail leave < 3e-7 (the largest seen over this grid: 3.0e-7).
    torch.testing.assert_close(grid_gaussian_mean(m, precision, V), exact, rtol=0, atol=5e-7)
    # float32 inputs: rounding of m and the logits adds ~1e-7
    torch.testing.assert_close(grid_gaussian_mean(m.float(), precision.float(), V).double(), exact, rtol=0,
                               atol=1e-6)


def test_grid_gaussian_mean_gradients_are_those_of_the_mean_over_all_bins():
    torch.manual_seed(0)
    m = (1.5 * torch.randn(400, dtype=F64)).requires_grad_()
    log_std_bins = torch.empty(400, dtype=F64).uniform_(math.log(0.3), math.log(3000))
    precision = (1 / (log_std_bins.exp() * SPACING) ** 2).requires_grad_()
    weights = torch.randn(400, dtype=F64)
    got = torch.autograd.grad((grid_gaussian_mean(m, precision, V) * weights).sum(), (m, precision))
    want = torch.autograd.grad((brute_mean(m, precision) * weights).sum(), (m, precision))
    # d/dm = P Var[c]; d/dP = -Cov(c, (c - m)^2) / 2: the midpoint rule's remainder is smooth, so its derivatives
    # are of its order too. Relative to each derivative's scale.
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max().item())


def test_grid_gaussian_mean_stays_within_the_centres_and_is_finite_at_extremes():
    m = torch.tensor([-1e4, -5.0, -1.0, 0.0, 1.0, 5.0, 1e4]).repeat(3)
    precision = torch.tensor([1e-6] * 7 + [1.0] * 7 + [1e12] * 7)
    x = grid_gaussian_mean(m.requires_grad_(), precision.requires_grad_(), V)
    c = bin_centres(V)
    assert torch.isfinite(x).all() and x.min() >= c[0] and x.max() <= c[-1]
    x.sum().backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(precision.grad).all()


def test_bin_window_holds_the_nearest_bin_and_stays_on_the_grid():
    u = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.3, 0.999, 1.0, 2.0])
    c = bin_centres(V)
    for half in (1, 3, 30, 200):
        w = bin_window(u, half, V)
        assert w.shape == (len(u), min(2 * half + 1, V))
        nearest = c[(u.unsqueeze(-1) - c).abs().argmin(-1)]
        assert ((w - nearest.unsqueeze(-1)).abs() < 1e-6).any(-1).all()  # the nearest bin is in the window
        assert w.min() >= c[0] - 1e-6 and w.max() <= c[-1] + 1e-6
        torch.testing.assert_close(w.diff(dim=-1), torch.full_like(w[:, 1:], SPACING))  # consecutive bins


@pytest.mark.parametrize("gamma0", [-13.3, -9.0, -6.0, -3.0])
def test_binned_gaussian_on_a_window_is_the_softmax_over_all_bins(gamma0):
    torch.manual_seed(1)
    half = window_half_width(math.exp(gamma0 / 2), V)
    if gamma0 < -3:  # these widths use a window (7 of 256 bins at -13.3); -3 uses all bins
        assert 2 * half + 1 < V
    x = torch.randint(0, V, (64, 10)).to(F64) / (V - 1)
    c = bin_centres(V, F64)[torch.round(x * (V - 1)).long()]
    alpha, sigma = math.sqrt(torch.sigmoid(torch.tensor(-gamma0)).item()), math.sqrt(
        torch.sigmoid(torch.tensor(gamma0)).item())
    z0 = (alpha * c + sigma * torch.randn_like(c) * 3).requires_grad_()  # 3 sigma: some far in their tails
    gam = torch.tensor(gamma0, dtype=F64, requires_grad=True)
    got = BinnedGaussian(z0, gam, V, 1).log_prob(x)
    # brute force: the log-softmax over all V bins of -(z_0/alpha_0 - c_k)^2 alpha_0^2 / (2 sigma_0^2)
    u, s = z0 * torch.rsqrt(torch.sigmoid(-gam)), torch.exp(-0.5 * gam)
    logits = torch.log_softmax(-0.5 * ((u.unsqueeze(-1) - bin_centres(V, F64)) * s) ** 2, -1)
    want = logits.gather(-1, torch.round(x * (V - 1)).long().unsqueeze(-1)).squeeze(-1).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    for g, w in zip(torch.autograd.grad(got.sum(), (z0, gam)), torch.autograd.grad(want.sum(), (z0, gam))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
