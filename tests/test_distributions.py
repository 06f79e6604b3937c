"""DiagonalGaussian against torch.distributions, Monte Carlo and hand-derived gradients (write-up eq. 3-5,
the reparameterization trick). Statistical checks use tolerances of >= 5 computed standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.distributions import Independent, Normal, kl_divergence

from hvae.distributions import DiagonalGaussian

N_SIGMA = 5.0  # tolerance of every Monte Carlo check, in computed standard errors
SETTINGS = settings(derandomize=True, deadline=None, max_examples=40)
D = 3


def vectors(lo: float, hi: float, n: int = D):
    return arrays(np.float64, (n,), elements=st.floats(lo, hi, allow_nan=False, allow_infinity=False))


def torch_normal(g: DiagonalGaussian) -> Independent:
    return Independent(Normal(g.mean, g.std), g.event_ndim)


def gaussian(mean: np.ndarray, log_var: np.ndarray) -> DiagonalGaussian:
    return DiagonalGaussian(torch.from_numpy(mean), torch.from_numpy(log_var))


def mean_and_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over dim 0 and its standard error."""
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])


# --- log_prob -----------------------------------------------------------------------------------------

@SETTINGS
@given(mean=vectors(-5, 5), log_var=vectors(-8, 6), z=vectors(-10, 10))
def test_log_prob_matches_torch_normal(mean, log_var, z):
    g = gaussian(mean, log_var)
    z = torch.from_numpy(z)
    torch.testing.assert_close(g.log_prob(z), torch_normal(g).log_prob(z), rtol=1e-10, atol=1e-10)


def test_log_prob_sums_over_event_dims_and_broadcasts_sample_dim():
    mean, log_var = torch.randn(4, 2, 3, 5, dtype=torch.float64), torch.randn(4, 2, 3, 5, dtype=torch.float64)
    g = DiagonalGaussian(mean, log_var, event_ndim=3)
    z = torch.randn(7, 4, 2, 3, 5, dtype=torch.float64)  # [S, B, *event]
    lp = g.log_prob(z)
    assert lp.shape == (7, 4)
    torch.testing.assert_close(lp, torch_normal(g).log_prob(z))


# --- closed-form KL -----------------------------------------------------------------------------------

@SETTINGS
@given(m_q=vectors(-4, 4), lv_q=vectors(-6, 4), m_p=vectors(-4, 4), lv_p=vectors(-6, 4))
def test_kl_matches_torch_kl_divergence(m_q, lv_q, m_p, lv_p):
    q, p = gaussian(m_q, lv_q), gaussian(m_p, lv_p)
    expected = kl_divergence(torch_normal(q), torch_normal(p))
    torch.testing.assert_close(q.kl(p), expected, rtol=1e-9, atol=1e-10)
    assert q.kl(p) >= 0


@SETTINGS
@given(m_q=vectors(-4, 4), lv_q=vectors(-6, 4))
def test_kl_standard_matches_torch_and_explicit_standard_normal(m_q, lv_q):
    q = gaussian(m_q, lv_q)
    standard = DiagonalGaussian.standard(q.mean)
    explicit = DiagonalGaussian(torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64))
    expected = kl_divergence(torch_normal(q), Independent(Normal(torch.zeros(D, dtype=torch.float64), 1.0), 1))
    torch.testing.assert_close(q.kl_standard(), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(q.kl(standard), q.kl_standard())  # the is_standard shortcut
    torch.testing.assert_close(q.kl(explicit), q.kl_standard(), rtol=1e-9, atol=1e-10)  # the general formula


@settings(derandomize=True, deadline=None, max_examples=20)
@given(m_q=vectors(-3, 3), lv_q=vectors(-3, 2), m_p=vectors(-3, 3), lv_p=vectors(-3, 2))
def test_kl_matches_monte_carlo_estimate(m_q, lv_q, m_p, lv_p):
    # KL(q || p) = E_q[log q(z) - log p(z)]: the closed form must lie within 5 SE of the sample mean.
    torch.manual_seed(0)
    q, p = gaussian(m_q, lv_q), gaussian(m_p, lv_p)
    z = q.rsample(20_000)
    mc, se = mean_and_se(q.log_prob(z) - p.log_prob(z))
    assert abs(mc - q.kl(p)) <= N_SIGMA * se + 1e-9


def test_kl_is_zero_for_identical_gaussians_and_per_example():
    mean, log_var = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    q = DiagonalGaussian(mean, log_var)
    kl = q.kl(DiagonalGaussian(mean.clone(), log_var.clone()))
    assert kl.shape == (6,)
    torch.testing.assert_close(kl, torch.zeros(6, dtype=torch.float64))


# --- rsample ------------------------------------------------------------------------------------------

def test_rsample_shapes_and_dtype():
    g = DiagonalGaussian(torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64))
    assert g.rsample(7).shape == (7, 5, 3)  # [S, B, D]
    assert g.rsample(1).shape == (1, 5, 3)
    assert g.rsample().shape == (5, 3)  # no sample dim when n_samples is None
    assert g.rsample(2).dtype == torch.float64
    image = DiagonalGaussian(torch.zeros(4, 2, 3, 3), torch.zeros(4, 2, 3, 3), event_ndim=3)
    assert image.rsample(6).shape == (6, 4, 2, 3, 3)


def test_rsample_temperature_zero_gives_the_mean():
    g = DiagonalGaussian(torch.randn(5, 3), torch.randn(5, 3))
    assert torch.equal(g.rsample(4, temperature=0.0), g.mean.expand(4, 5, 3))
    assert torch.equal(g.rsample(temperature=0.0), g.mean)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_rsample_moments_match_mean_and_temperature_scaled_std(temperature):
    mean = torch.tensor([-1.0, 0.0, 2.5], dtype=torch.float64)
    log_var = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    g = DiagonalGaussian(mean, log_var)
    n = 40_000
    z = g.rsample(n, temperature=temperature)  # [n, 3]
    sd = temperature * g.std
    m, se_m = mean_and_se(z)
    assert torch.all((m - mean).abs() <= N_SIGMA * se_m)
    # Var of the sample variance of a Gaussian is 2 sd^4 / (n - 1).
    var_hat = z.var(0)
    assert torch.all((var_hat - sd**2).abs() <= N_SIGMA * math.sqrt(2 / (n - 1)) * sd**2)


# --- reparameterized gradients -------------------------------------------------------------------------

def per_sample_gradients(mean: torch.Tensor, log_var: torch.Tensor, f, n: int):
    """Gradients of f(z), z = mean + sigma * eps, w.r.t. mean and log_var, one row per sample: [n, D] each.

    Each sample gets its own copy of the parameters, so autograd hands back per-sample gradients.
    """
    m = mean.detach().expand(n, -1).clone().requires_grad_()
    lv = log_var.detach().expand(n, -1).clone().requires_grad_()
    z = DiagonalGaussian(m, lv).rsample()  # [n, D]
    f(z).sum().backward()
    return m.grad, lv.grad


CASES = [
    # f(z), E_q[f] per dim, d/dmean, d/dlog_var (s2 = sigma^2)
    ("square", lambda z: z**2, lambda mu, s2: mu**2 + s2, lambda mu, s2: 2 * mu, lambda mu, s2: s2),
    ("sin", torch.sin, lambda mu, s2: torch.sin(mu) * torch.exp(-s2 / 2),
     lambda mu, s2: torch.cos(mu) * torch.exp(-s2 / 2),
     lambda mu, s2: -0.5 * s2 * torch.sin(mu) * torch.exp(-s2 / 2)),
]


@pytest.mark.parametrize("name,f,expect,d_mean,d_log_var", CASES, ids=[c[0] for c in CASES])
def test_reparameterized_gradient_matches_analytic_gradient(name, f, expect, d_mean, d_log_var):
    # E[z^2] = mu^2 + sigma^2 and E[sin z] = sin(mu) exp(-sigma^2 / 2): their gradients are known exactly.
    mean = torch.tensor([-1.2, 0.3, 0.9], dtype=torch.float64)
    log_var = torch.tensor([-1.0, 0.2, 0.7], dtype=torch.float64)
    s2 = log_var.exp()
    g_mean, g_log_var = per_sample_gradients(mean, log_var, f, 50_000)
    for grads, exact in ((g_mean, d_mean(mean, s2)), (g_log_var, d_log_var(mean, s2))):
        est, se = mean_and_se(grads)
        assert torch.all((est - exact).abs() <= N_SIGMA * se + 1e-12), (est, exact, se)
    # The value itself, as a sanity check on the analytic expectation used above.
    z = DiagonalGaussian(mean, log_var).rsample(50_000)
    est, se = mean_and_se(f(z))
    assert torch.all((est - expect(mean, s2)).abs() <= N_SIGMA * se)


def test_reparameterized_gradient_matches_finite_differences_with_common_noise():
    # With the noise held fixed (same seed), the Monte Carlo estimate is a smooth deterministic function of
    # (mean, log_var); its autograd gradient must equal central finite differences of that same function.
    mean = torch.tensor([0.4, -0.7], dtype=torch.float64)
    log_var = torch.tensor([0.3, -0.5], dtype=torch.float64)

    def estimate(m: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(123)
        z = DiagonalGaussian(m, lv).rsample(256)
        return (torch.sin(z) * z**2).sum(-1).mean()

    params = (mean.clone().requires_grad_(), log_var.clone().requires_grad_())
    assert torch.autograd.gradcheck(estimate, params, eps=1e-6, atol=1e-8, rtol=1e-6)
