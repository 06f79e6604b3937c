"""p(x|z) objects (the reconstruction term of write-up eq. 3): closed forms, torch.distributions, normalization."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal
from torch.distributions import Bernoulli as TorchBernoulli

from hvae.likelihoods import KINDS, Bernoulli, DiscretizedLogistic, Gaussian, channels_per_pixel, make_likelihood

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 values of an 8-bit pixel scaled to [-1, 1]


def test_bernoulli_matches_direct_formula_and_torch():
    logits = 4 * torch.randn(3, 2, 5, 5, dtype=torch.float64)
    x = torch.bernoulli(torch.full((3, 2, 5, 5), 0.4, dtype=torch.float64))
    px = Bernoulli(logits, event_ndim=3)
    p = torch.sigmoid(logits)
    direct = (x * torch.log(p) + (1 - x) * torch.log1p(-p)).sum((1, 2, 3))
    lp = px.log_prob(x)
    assert lp.shape == (3,)
    torch.testing.assert_close(lp, direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lp, Independent(TorchBernoulli(logits=logits), 3).log_prob(x))
    torch.testing.assert_close(px.mean, p)


def test_bernoulli_is_stable_for_extreme_logits():
    logits = torch.tensor([[-200.0, 200.0, -200.0, 200.0]])
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    lp = Bernoulli(logits, event_ndim=1).log_prob(x)
    torch.testing.assert_close(lp, torch.tensor([-400.0]))  # the two right bits cost 0, the two wrong 200 each


def test_bernoulli_probabilities_of_all_outcomes_sum_to_one():
    logits = torch.randn(1, 3, dtype=torch.float64)
    outcomes = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.float64)
    total = Bernoulli(logits, event_ndim=1).log_prob(outcomes).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("scale_shape", [(4, 2, 6), ()], ids=["per-dim", "scalar"])
def test_gaussian_matches_torch_normal(scale_shape):
    loc = torch.randn(4, 2, 6, dtype=torch.float64)
    log_scale = torch.randn(scale_shape, dtype=torch.float64)
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    expected = Independent(Normal(loc, log_scale.exp().expand_as(loc)), 2).log_prob(x)
    torch.testing.assert_close(Gaussian(loc, log_scale, event_ndim=2).log_prob(x), expected, rtol=1e-10, atol=1e-10)


LOGISTIC_PARAMS = [(0.0, 0.0), (0.3, -3.0), (-0.77, -7.0), (0.999, -7.0), (-1.0, -7.0), (1.0, 5.0), (5.0, -7.0),
                   (-5.0, 2.0), (0.5, 5.0), (-0.2, 1.0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loc,log_scale", LOGISTIC_PARAMS)
def test_discretized_logistic_masses_over_256_values_sum_to_one(loc, log_scale, dtype):
    px = DiscretizedLogistic(torch.full((256,), loc, dtype=dtype), torch.full((256,), log_scale, dtype=dtype), 0)
    log_p = px.log_prob(GRID.to(dtype))  # one pixel evaluated at each of its 256 values
    assert torch.isfinite(log_p).all()
    assert (log_p <= 1e-6).all()
    # Why 1e-5 and not 1e-12: bins narrow against the scale use the density at the bin centre times the bin width
    # (exact to O(width^2)), and float32 rounds.
    assert abs(log_p.double().exp().sum().item() - 1.0) < 1e-5


def test_discretized_logistic_matches_logistic_cdf_differences():
    loc, log_scale = torch.tensor(0.1, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    px = DiscretizedLogistic(loc.expand(256), log_scale.expand(256), 0)
    s = log_scale.exp()
    cdf = lambda v: torch.sigmoid((v - loc) / s)  # noqa: E731
    upper = torch.where(GRID > 0.999, torch.ones_like(GRID), cdf(GRID + 1 / 255))
    lower = torch.where(GRID < -0.999, torch.zeros_like(GRID), cdf(GRID - 1 / 255))
    mass = upper - lower
    big = mass > 1e-5  # where the exact difference is used
    torch.testing.assert_close(px.log_prob(GRID)[big], mass[big].log(), rtol=1e-9, atol=1e-9)


def test_discretized_logistic_small_bin_masses_use_density_times_bin_width():
    # A very wide logistic (half a bin is 4e-6 scales) takes the midpoint branch; the density is nearly flat across
    # a bin there, so it must agree with the exact CDF difference (float64, no cancellation trouble at this size).
    loc, log_scale = torch.tensor(0.2, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float64)
    px = DiscretizedLogistic(loc.expand(256), log_scale.expand(256), 0)
    inner = GRID[1:-1]
    exact = torch.sigmoid((inner + 1 / 255 - loc) / log_scale.exp()) - torch.sigmoid((inner - 1 / 255 - loc) /
                                                                                        log_scale.exp())
    assert (exact < 1e-5).all()
    torch.testing.assert_close(px.log_prob(GRID)[1:-1], exact.log(), rtol=1e-6, atol=1e-6)


def _logistic_bin_log_mass_float64(loc: float, log_scale: float) -> torch.Tensor:
    """The reference: CDF differences in float64, on the side of loc where they do not saturate."""
    s, c = math.exp(log_scale), GRID - loc
    plus, minus = (c + 1 / 255) / s, (c - 1 / 255) / s
    inner = torch.where(c > 0, torch.sigmoid(-minus) - torch.sigmoid(-plus), torch.sigmoid(plus) - torch.sigmoid(minus))
    return torch.where(GRID < -0.999, torch.sigmoid(plus), torch.where(GRID > 0.999, torch.sigmoid(-minus), inner)).log()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-5)])
@pytest.mark.parametrize("log_scale", [-7.0, -6.0, -5.0, -4.0, -2.0, 0.0, 2.0, 7.0])
def test_discretized_logistic_bin_masses_are_exact_from_centre_to_far_tails(dtype, tol, log_scale):
    """Every bin with log mass above -60, narrow scales included, where the density at the bin centre times the
    width would be off by up to 2 nats (half a bin is 4.3 scales at log_scale -7)."""
    for loc in (-0.9, -0.03, 0.4, 1.0):
        reference = _logistic_bin_log_mass_float64(loc, log_scale)
        px = DiscretizedLogistic(torch.full((256,), loc, dtype=dtype), torch.full((256,), log_scale, dtype=dtype), 0)
        log_p = px.log_prob(GRID.to(dtype)).double()
        seen = reference > -60
        assert seen.sum() >= 3
        torch.testing.assert_close(log_p[seen], reference[seen], rtol=0, atol=tol)


@pytest.mark.parametrize("log_scale, pixel", [(-7.0, 130), (-7.0, 200), (-3.0, 40), (0.0, 128), (7.0, 90),
                                              (-2.0, 0), (-2.0, 255)])
def test_discretized_logistic_gradients_match_finite_differences(log_scale, pixel):
    """Each branch (exact log-space mass near and far from loc, density x width, the two edge bins) in float64."""
    x = torch.tensor([pixel / 127.5 - 1], dtype=torch.float64)
    loc = torch.tensor([0.03], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([log_scale], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, s: DiscretizedLogistic(m, s, 1).log_prob(x), (loc, ls))


def test_discretized_logistic_gradients_are_finite_in_every_branch():
    loc = torch.tensor([-0.03, 0.0, 0.5, 0.2, -0.4], dtype=torch.float32, requires_grad=True)
    log_scale = torch.tensor([-7.0, -7.0, 0.0, 7.0, -3.0], requires_grad=True)
    x = torch.tensor([0.0, 255.0, 153.0, 102.0, 242.0]) / 127.5 - 1  # edge bins, centre, wide and narrow tails
    DiscretizedLogistic(loc, log_scale, 1).log_prob(x).backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


def test_discretized_logistic_sums_over_data_dims_and_is_finite_far_from_loc():
    loc = torch.zeros(2, 3, 4, 4)
    x = torch.full((2, 3, 4, 4), 1.0)
    lp = DiscretizedLogistic(loc, torch.full_like(loc, -7.0), 3).log_prob(x)
    assert lp.shape == (2,) and torch.isfinite(lp).all()


@pytest.mark.parametrize("kind", KINDS)
def test_leading_sample_dims_broadcast_against_x(kind):
    s, b, data = 5, 3, (2, 4, 4)
    k = channels_per_pixel(kind)
    params = torch.randn(s, b, k * data[0], *data[1:], dtype=torch.float64)  # [S, B, k*C, H, W]
    x = (torch.randint(0, 256, (b, *data)) / 127.5 - 1).double()
    if kind == "bernoulli":
        x = (x > 0).double()
    px = make_likelihood(kind, params, event_ndim=3)
    lp = px.log_prob(x)  # x: [B, *data] broadcasts over S
    assert lp.shape == (s, b)
    per_sample = torch.stack([make_likelihood(kind, params[i], 3).log_prob(x) for i in range(s)])
    torch.testing.assert_close(lp, per_sample)
    assert px.mean.shape == (s, b, *data)
    assert px.sample().shape == (s, b, *data)


@pytest.mark.parametrize("kind,k,cls", [("bernoulli", 1, Bernoulli), ("gaussian", 1, Gaussian),
                                        ("gaussian-learned", 2, Gaussian), ("logistic", 2, DiscretizedLogistic)])
def test_make_likelihood_splits_channels(kind, k, cls):
    assert channels_per_pixel(kind) == k
    params = torch.randn(3, k * 2, 5)  # [B, k*C, D] with data shape [C, D] = [2, 5]
    px = make_likelihood(kind, params, event_ndim=2, fixed_log_scale=math.log(0.5))
    assert isinstance(px, cls)
    assert px.mean.shape == (3, 2, 5)
    if kind == "gaussian":
        torch.testing.assert_close(px.log_scale, torch.tensor(math.log(0.5)))
    if k == 2:
        torch.testing.assert_close(px.loc, params[:, :2])
        torch.testing.assert_close(px.log_scale, params[:, 2:].clamp(-7.0, 5.0))


def test_make_likelihood_bounds_the_learned_scale():
    params = torch.cat([torch.zeros(1, 1, 3), torch.tensor([[[-100.0, 0.0, 100.0]]])], dim=1)  # [B, 2, D]
    px = make_likelihood("logistic", params, event_ndim=2)
    assert px.log_scale.min() >= -7.0 and px.log_scale.max() <= 5.0


@pytest.mark.parametrize("call", [
    pytest.param(lambda: channels_per_pixel("poisson"), id="channels_per_pixel"),
    pytest.param(lambda: make_likelihood("poisson", torch.zeros(1, 2), 1), id="make_likelihood"),
])
def test_unknown_likelihood_kind_is_a_clear_error(call):
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'.*bernoulli"):
        call()
