"""Objectives against exact answers (write-up eq. 1-3 and 8, the IW bound, bits/dim, free bits).

A linear-Gaussian model x = W z + b + s * noise, z ~ N(0, I), has log p(x) and p(z|x) in closed form, so the
bounds can be checked against the truth:
    log p(x) = log N(x; b, W W^T + s^2 I),   p(z|x) = N(m, S),  S = (I + W^T W / s^2)^-1,  m = S W^T (x - b) / s^2,
    log p(x) - ELBO = KL(q(z|x) || p(z|x)).
Monte Carlo checks use tolerances of >= 5 computed standard errors; everything here is float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

from hvae.distributions import DiagonalGaussian
from hvae.likelihoods import Gaussian
from hvae.objectives import (ElboObjective, IwaeObjective, bits_per_dim, elbo, elbo_terms, free_bits, iw_bound, kl_balance, level_rate,
                             log_importance_weights, log_weights_of_trace, nats_from_bits_per_dim,
                             )
from hvae.protocol import LatentVariableModel, Level, Trace

N_SIGMA = 5.0  # tolerance of every Monte Carlo check, in computed standard errors
F64 = torch.float64


class LinearGaussian:
    """x = W z + b + s * noise, z ~ N(0, I); encoder q(z|x) = N(A x + c, diag(exp(log_v))). Satisfies the protocol."""

    def __init__(self, W: Tensor, b: Tensor, s: float, A: Tensor, c: Tensor, log_v: Tensor):
        self.W, self.b, self.s, self.A, self.c, self.log_v = W, b, s, A, c, log_v
        self.data_shape = (W.shape[0],)

    @classmethod
    def with_best_diagonal_encoder(cls, W: Tensor, b: Tensor, s: float, mean_scale: float = 1.0,
                                   log_var_shift: float = 0.0) -> "LinearGaussian":
        """q with the exact posterior mean and the KL-optimal diagonal variance 1 / diag(S^-1), optionally
        spoilt (mean map scaled, log-variance shifted) to make the bounds loose."""
        precision = torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / s**2  # S^-1
        A = mean_scale * torch.linalg.solve(precision, W.T) / s**2  # S W^T / s^2
        return cls(W, b, s, A, -A @ b, -torch.log(torch.diagonal(precision)) + log_var_shift)

    # --- the protocol -------------------------------------------------------------------------------
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(x @ self.A.T + self.c, self.log_v.expand(x.shape[0], -1))

    def infer(self, x: Tensor, n_samples: int = 1) -> Trace:
        q = self.posterior(x)
        z = q.rsample(n_samples)  # [S, B, Dz]
        return Trace((Level(z, q, DiagonalGaussian.standard(q.mean), analytic_kl=True),))

    def decode(self, z1: Tensor) -> Gaussian:
        return Gaussian(z1 @ self.W.T + self.b, torch.tensor(math.log(self.s), dtype=z1.dtype), event_ndim=1)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        z = temperature * torch.randn(n, self.W.shape[1], dtype=self.W.dtype)
        return z @ self.W.T + self.b

    # --- closed forms -------------------------------------------------------------------------------
    def draw_data(self, n: int) -> Tensor:
        z = torch.randn(n, self.W.shape[1], dtype=self.W.dtype)
        return z @ self.W.T + self.b + self.s * torch.randn(n, self.W.shape[0], dtype=self.W.dtype)

    def log_marginal(self, x: Tensor) -> Tensor:
        """log N(x; b, W W^T + s^2 I): [B]."""
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def kl_to_exact_posterior(self, x: Tensor) -> Tensor:
        """KL(N(m_q, V) || N(m, S)) = 1/2 [tr(S^-1 V) + (m - m_q)^T S^-1 (m - m_q) - Dz - log|V| - log|S^-1|]: [B]."""
        precision = torch.eye(self.W.shape[1], dtype=self.W.dtype) + self.W.T @ self.W / self.s**2
        m = torch.linalg.solve(precision, self.W.T @ (x - self.b).T).T / self.s**2  # [B, Dz]
        q = self.posterior(x)
        v, d = q.log_var.exp(), q.mean - m
        trace_term = (torch.diagonal(precision) * v).sum(-1)
        quad = ((d @ precision) * d).sum(-1)
        return 0.5 * (trace_term + quad - v.shape[-1] - q.log_var.sum(-1) - torch.logdet(precision))

    def exact_elbo(self, x: Tensor) -> Tensor:
        """E_q[log N(x; Wz + b, s^2 I)] - KL(q || N(0, I)), both in closed form: [B]."""
        q = self.posterior(x)
        v = q.log_var.exp()
        resid = x - q.mean @ self.W.T - self.b
        spread = (v * self.W.pow(2).sum(0)).sum(-1)  # tr(W V W^T)
        rec = -0.5 * self.W.shape[0] * math.log(2 * math.pi * self.s**2) - (resid.pow(2).sum(-1) + spread) / (
            2 * self.s**2)
        kl = 0.5 * (q.mean.pow(2) + v - q.log_var - 1).sum(-1)
        return rec - kl


def general_weights(seed: int = 0) -> tuple[Tensor, Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64), 0.7


@pytest.fixture
def loose() -> LinearGaussian:
    """A correlated posterior and a spoilt diagonal q: every bound is strictly loose."""
    return LinearGaussian.with_best_diagonal_encoder(*general_weights(), mean_scale=0.8, log_var_shift=0.5)


@pytest.fixture
def exact() -> LinearGaussian:
    """W with orthogonal columns: p(z|x) is diagonal, and q is exactly p(z|x)."""
    q, _ = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64))
    W = q * torch.tensor([2.0, 0.5], dtype=F64)
    return LinearGaussian.with_best_diagonal_encoder(W, torch.linspace(-1, 1, 5, dtype=F64), 0.7)


def mean_and_se(t: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    return t.mean(dim), t.std(dim) / math.sqrt(t.shape[dim])


def per_sample_elbo(model, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(elbo_terms(...).elbo [B], the per-sample values it averages [S, B]) on one trace."""
    trace = model.infer(x, n)
    terms = elbo_terms(model, x, trace)
    samples = model.decode(trace.z1).log_prob(x) - terms.kl  # [S, B]
    return terms.elbo, samples


# --- the test model itself --------------------------------------------------------------------------

def test_linear_gaussian_satisfies_protocol_and_its_closed_forms_agree(loose):
    assert isinstance(loose, LatentVariableModel)
    x = loose.draw_data(16)
    # log p(x) - ELBO = KL(q || p(z|x)), here with every term in closed form: an identity up to rounding.
    torch.testing.assert_close(loose.log_marginal(x) - loose.exact_elbo(x), loose.kl_to_exact_posterior(x),
                               rtol=1e-10, atol=1e-10)
    assert (loose.kl_to_exact_posterior(x) > 0.01).all()


# --- ELBO (eq. 1-3) ---------------------------------------------------------------------------------

def test_elbo_terms_shapes_and_elbo_is_reconstruction_minus_kl(loose):
    x = loose.draw_data(6)
    terms = elbo(loose, x, n_samples=3)
    for t in (terms.reconstruction, terms.kl, terms.elbo):
        assert t.shape == (6,)
    assert terms.kl_per_level.shape == (1, 6)
    assert torch.equal(terms.elbo, terms.reconstruction - terms.kl)
    torch.testing.assert_close(terms.kl, terms.kl_per_level.sum(0))
    torch.testing.assert_close(terms.kl, loose.posterior(x).kl_standard())  # closed form at the one level


def test_elbo_estimate_is_unbiased_and_below_log_likelihood(loose):
    x = loose.draw_data(32)
    est, samples = per_sample_elbo(loose, x, 20_000)
    torch.testing.assert_close(est, samples.mean(0))
    _, se = mean_and_se(samples)
    assert ((est - loose.exact_elbo(x)).abs() <= N_SIGMA * se).all()
    assert (est <= loose.log_marginal(x) + N_SIGMA * se).all()


def test_gap_between_log_likelihood_and_elbo_is_kl_to_exact_posterior(loose):
    x = loose.draw_data(32)
    est, samples = per_sample_elbo(loose, x, 20_000)
    _, se = mean_and_se(samples)
    gap = loose.log_marginal(x) - est
    assert ((gap - loose.kl_to_exact_posterior(x)).abs() <= N_SIGMA * se).all()


def test_analytic_kl_and_monte_carlo_kl_agree_in_expectation(loose):
    x = loose.draw_data(16)
    trace = loose.infer(x, 50_000)
    level = trace.levels[0]
    log_ratio = level.q.log_prob(level.z) - level.p.log_prob(level.z)  # [S, B]
    mc, se = mean_and_se(log_ratio)
    torch.testing.assert_close(level_rate(level, analytic_kl=False), mc)
    assert ((level_rate(level) - mc).abs() <= N_SIGMA * se).all()
    # With the sampled rate, the ELBO is exactly the mean log importance weight on the same samples.
    torch.testing.assert_close(elbo_terms(loose, x, trace, analytic_kl=False).elbo,
                               log_weights_of_trace(loose, x, trace).mean(0))


def test_level_that_forbids_closed_form_kl_uses_the_sampled_log_ratio(loose):
    x = loose.draw_data(4)
    level = loose.infer(x, 3).levels[0]
    sampled = Level(level.z, level.q, level.p, analytic_kl=False)
    expected = (level.q.log_prob(level.z) - level.p.log_prob(level.z)).mean(0)
    torch.testing.assert_close(level_rate(sampled, analytic_kl=True), expected)


# --- importance-weighted bound ------------------------------------------------------------------------

def test_iw_bound_rises_with_k_towards_log_likelihood_and_stays_below(loose):
    # One set of K = 1000 weights, split into K/k disjoint groups of k: the mean of L_k over the groups
    # estimates E[L_k] without bias, and sharing samples across k makes the differences far less noisy.
    x, big_k = loose.draw_data(512), 1000
    log_w = log_importance_weights(loose, x, big_k, chunk_size=250)  # [K, B]
    log_px = loose.log_marginal(x)
    gaps = {}
    for k in (1, 10, 100, 1000):
        groups = log_w.reshape(big_k // k, k, -1).transpose(0, 1).reshape(k, -1)  # [k, (K / k) * B]
        gaps[k] = log_px - iw_bound(groups).reshape(big_k // k, -1).mean(0)  # [B]
        gap, se = mean_and_se(gaps[k])
        assert gap >= -N_SIGMA * se, k  # below log p(x)
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        diff, se = mean_and_se(gaps[small] - gaps[large])
        assert diff > N_SIGMA * se, (small, large)  # strictly tighter
    assert gaps[1000].mean() < 0.05 * gaps[1].mean()


def test_iw_bound_with_one_sample_is_the_log_weight(loose):
    x = loose.draw_data(5)
    log_w = log_importance_weights(loose, x, 1)
    assert log_w.shape == (1, 5)
    assert torch.equal(iw_bound(log_w), log_w[0])
    torch.manual_seed(7)
    one = log_importance_weights(loose, x, 1)[0]
    torch.manual_seed(7)
    torch.testing.assert_close(one, elbo(loose, x, n_samples=1, analytic_kl=False).elbo)


def test_iw_bound_is_a_stable_log_mean_exp():
    log_w = torch.tensor([[1000.0, -1000.0], [1000.0 + math.log(3), -1000.0]], dtype=F64)  # [K=2, B=2]
    torch.testing.assert_close(iw_bound(log_w), torch.tensor([1000.0 + math.log(2), -1000.0], dtype=F64))
    small = torch.randn(7, 3, dtype=F64)
    torch.testing.assert_close(iw_bound(small), small.exp().mean(0).log())


@pytest.mark.parametrize("k", [1, 10, 1000])
def test_exact_posterior_closes_every_gap(exact, k):
    # q = p(z|x): log w = log p(x) at every sample, so every bound equals log p(x) up to rounding.
    x = exact.draw_data(8)
    log_px = exact.log_marginal(x)
    torch.testing.assert_close(exact.kl_to_exact_posterior(x), torch.zeros(8, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(iw_bound(log_importance_weights(exact, x, k)), log_px, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(elbo(exact, x, k, analytic_kl=False).elbo, log_px, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(exact.exact_elbo(x), log_px, rtol=1e-10, atol=1e-9)


def test_exact_posterior_elbo_with_closed_form_kl_is_unbiased(exact):
    # With the closed-form KL the per-sample terms are no longer constant; only their mean is log p(x).
    x = exact.draw_data(16)
    est, samples = per_sample_elbo(exact, x, 20_000)
    _, se = mean_and_se(samples)
    assert ((est - exact.log_marginal(x)).abs() <= N_SIGMA * se).all()


# --- chunked log importance weights ---------------------------------------------------------------

def test_chunked_log_weights_have_the_same_shape_and_distribution(loose):
    # Chunking changes how the random draws are grouped, so the values differ; compare distributions.
    x = loose.draw_data(32)
    k = 50
    whole = log_importance_weights(loose, x, k)
    chunked = log_importance_weights(loose, x, k, chunk_size=7)
    assert whole.shape == chunked.shape == (k, 32)
    diff = chunked.mean(0) - whole.mean(0)  # [B]: paired by example
    se = ((chunked.var(0) + whole.var(0)) / k).sqrt()
    assert (diff.abs() <= N_SIGMA * se).all()
    pooled, pooled_se = mean_and_se(diff)
    assert pooled.abs() <= N_SIGMA * pooled_se


def test_chunked_log_weights_equal_unchunked_when_draws_cannot_matter(loose, exact):
    x = exact.draw_data(4)
    torch.testing.assert_close(log_importance_weights(exact, x, 50, chunk_size=7),
                               log_importance_weights(exact, x, 50), rtol=1e-10, atol=1e-9)
    x = loose.draw_data(4)
    torch.manual_seed(3)
    one_chunk = log_importance_weights(loose, x, 50, chunk_size=50)
    torch.manual_seed(3)
    assert torch.equal(one_chunk, log_importance_weights(loose, x, 50))  # chunk >= k: the same single draw


# --- bits per dim ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dequantized", [False, True])
def test_bits_per_dim_round_trip_and_known_values(dequantized):
    nats = torch.tensor([0.0, 123.4, 5000.0], dtype=F64)
    bpd = bits_per_dim(nats, 784, dequantized)
    torch.testing.assert_close(nats_from_bits_per_dim(bpd, 784, dequantized), nats)
    offset = 8.0 if dequantized else 0.0
    assert bits_per_dim(784 * math.log(2), 784, dequantized) == pytest.approx(1.0 + offset)
    assert bits_per_dim(0.0, 10, dequantized) == offset


# --- training-loss pieces ------------------------------------------------------------------------------

def test_free_bits_replaces_levels_below_threshold_by_a_constant_without_gradient():
    kl = torch.tensor([[0.1, 0.5, 1.6],     # level 1: batch mean 0.73 < 1, although one example is above
                       [0.2, 2.0, 3.5]],    # level 2: batch mean 1.9 >= 1
                      dtype=F64, requires_grad=True)
    out = free_bits(kl, 1.0)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[0], torch.ones(3, dtype=F64))
    torch.testing.assert_close(out[1], kl[1])
    (grad,) = torch.autograd.grad(out.sum(), kl)
    torch.testing.assert_close(grad, torch.tensor([[0.0] * 3, [1.0] * 3], dtype=F64))
    assert free_bits(kl, 0.0) is kl


def test_training_objective_single_sample_is_the_elbo_path(loose):
    x = loose.draw_data(8)
    torch.manual_seed(11)
    surrogate, terms = ElboObjective()(loose, x, 1.0)
    torch.manual_seed(11)
    reference = elbo(loose, x)
    assert surrogate.shape == (8,)
    torch.testing.assert_close(surrogate, reference.elbo)
    for got, want in zip(terms, reference):
        torch.testing.assert_close(got, want)


def test_training_objective_beta_and_free_bits(loose):
    x = loose.draw_data(8)
    torch.manual_seed(5)
    objective = ElboObjective(beta=0.25)
    surrogate, terms = objective(loose, x, objective.kl_weight(0, 1))
    torch.testing.assert_close(surrogate, terms.reconstruction - 0.25 * terms.kl)
    threshold = terms.kl.mean().item() + 1.0  # above the batch-mean KL: the rate becomes the constant
    surrogate, terms = ElboObjective(free_bits=threshold)(loose, x, 1.0)
    torch.testing.assert_close(surrogate, terms.reconstruction - threshold)


def test_kl_balance_weights_levels_by_kl_per_latent_value_and_passes_no_gradient():
    kl = torch.tensor([[4.0, 6.0], [1.0, 1.0], [0.0, 0.02]], dtype=F64, requires_grad=True)  # [T=3, B=2]
    sizes = torch.tensor([48.0, 8.0, 16.0])
    w = kl_balance(kl, sizes)
    # by hand: alpha = sizes / 24 = (2, 1/3, 2/3); (mean KL + 0.01) / alpha = (2.505, 3.03, 0.03); / their mean
    raw = torch.tensor([5.01 / 2, 1.01 * 3, 0.02 * 1.5], dtype=F64)
    torch.testing.assert_close(w, (raw / raw.mean()).unsqueeze(1))
    torch.testing.assert_close(w.mean(), torch.tensor(1.0, dtype=F64))
    (grad,) = torch.autograd.grad((w * kl).sum(), kl)  # the weights are constants to the gradient
    torch.testing.assert_close(grad, w.expand_as(kl))


def test_balanced_objective_reweights_levels_only_while_the_kl_weight_warms_up():
    from hvae.models import LadderVAE

    torch.manual_seed(0)
    model = LadderVAE((1, 6, 6), (5, 4, 3), hidden=(24, 16), level_hidden=(12,))
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.4))
    objective = ElboObjective(warmup_epochs=1.0, balance=True)
    torch.manual_seed(5)
    surrogate, terms = objective(model, x, 0.5)
    w = kl_balance(terms.kl_per_level, torch.tensor([5.0, 4.0, 3.0]))
    assert (w - 1).abs().max() > 0.01  # the levels' KLs differ, so the weights do
    torch.testing.assert_close(surrogate, terms.reconstruction - 0.5 * (w * terms.kl_per_level).sum(0))
    torch.manual_seed(5)
    surrogate, terms = objective(model, x, 1.0)  # warm-up over: the plain ELBO
    torch.testing.assert_close(surrogate, terms.elbo)


def test_training_objective_importance_weighted_is_the_iw_bound(loose):
    x = loose.draw_data(8)
    torch.manual_seed(2)
    surrogate, terms = IwaeObjective(k=5)(loose, x)
    torch.manual_seed(2)
    torch.testing.assert_close(surrogate, iw_bound(log_importance_weights(loose, x, 5)))
    torch.testing.assert_close(terms.elbo, terms.reconstruction - terms.kl)


class _Evaluable(LinearGaussian):
    def eval(self):  # evaluate() puts a torch module in eval mode; this model has no such mode
        return self


def test_evaluate_reports_the_exact_log_likelihood_of_a_model_with_an_exact_posterior(exact):
    """With q = p(z|x) every importance weight is p(x): `hvae eval`'s iw_nll must be -mean log p(x) to rounding
    (any sign, mean-for-sum or log k slip shows), bits/dim that over D ln 2, and the ELBO within MC error of it."""
    from hvae.evaluate import evaluate

    model = _Evaluable(exact.W, exact.b, exact.s, exact.A, exact.c, exact.log_v)
    torch.manual_seed(123)  # not evaluate's seed: its noise must not replay the latents that drew the data
    x = model.draw_data(250)  # three batches of 100, the last one partial
    result = evaluate(model, x, k=37, progress=False)
    nll = -model.log_marginal(x).mean().item()
    assert result["iw_nll"] == pytest.approx(nll, abs=1e-9)
    assert result["bits_per_dim"] == pytest.approx(nll / (5 * math.log(2)), abs=1e-12)
    assert result["elbo"] == pytest.approx(-nll, abs=0.3)  # KL to the exact posterior is 0
    assert result["n_images"] == 250 and result["k"] == 37


def test_evaluate_iw_nll_lies_between_log_likelihood_and_elbo_for_a_loose_posterior(loose):
    from hvae.evaluate import evaluate

    model = _Evaluable(loose.W, loose.b, loose.s, loose.A, loose.c, loose.log_v)
    torch.manual_seed(123)  # not evaluate's seed (see above)
    x = model.draw_data(200)
    result = evaluate(model, x, k=500, progress=False)
    nll, exact_neg_elbo = -model.log_marginal(x).mean().item(), -model.exact_elbo(x).mean().item()
    assert exact_neg_elbo - nll > 0.05  # the bound is loose enough for the check to mean something
    assert nll - 0.01 < result["iw_nll"] < nll + 0.5 * (exact_neg_elbo - nll)  # k = 500 closes most of the gap
    assert result["elbo"] == pytest.approx(-exact_neg_elbo, abs=0.3)
