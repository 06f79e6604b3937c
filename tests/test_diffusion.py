"""The VDM bound (diffusion.py) and its exact discrete likelihood (likelihoods.BinnedGaussian), checked on the math:
per-step Gaussian KLs written from first principles, the discrete loss's limit, Gaussian data whose bound and
optimal denoiser are known in closed form, autograd slopes against analytic ones. No network: the models here are
small hand-written DiffusionModel stubs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from hvae import diffusion
from hvae.diffusion import (VdmObjective, VdmTerms, antithetic_times, diffusion_loss_continuous,
                            diffusion_loss_discrete, gamma_and_slope, noise_sq_err, prior_kl, vdm_bound, vdm_terms,
                            vp_alpha_sigma)
from hvae.likelihoods import BinnedGaussian, bin_centres, bin_index, centres_of
from hvae.objectives import ElboTerms
from hvae.protocol import BoundTerms, DiffusionModel

F64 = torch.float64


def col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] against like [B, *data]."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def linear(gamma_min: float, gamma_max: float):
    return lambda t: gamma_min + (gamma_max - gamma_min) * t


def smoothstep(gamma_min: float, gamma_max: float):
    """A monotone cubic with the same endpoints as `linear` and zero slope at both ends."""
    return lambda t: gamma_min + (gamma_max - gamma_min) * (3 * t**2 - 2 * t**3)


def equalizing(gamma_min: float, gamma_max: float):
    """softplus(-gamma(t)) linear in t. For data of unit variance and the optimal denoiser, E||eps - eps_hat||^2 =
    D sigmoid(-gamma), so 1/2 gamma' E||eps - eps_hat||^2 = -D/2 d/dt softplus(-gamma) is constant in t: no variance
    from t is left, only from eps (the schedule VDM learns to minimize variance does the same)."""
    lo, hi = F.softplus(torch.tensor(-gamma_min, dtype=F64)), F.softplus(torch.tensor(-gamma_max, dtype=F64))
    return lambda t: -torch.log(torch.expm1((1 - t) * lo + t * hi))


def smooth_denoiser(z_t, gamma_t):
    """Any smooth x_hat(z_t, gamma_t), not the optimal one."""
    return torch.tanh(z_t * (1 + torch.sigmoid(-col(gamma_t, z_t)))) * 0.6


class Stub:
    """A DiffusionModel: schedule gamma_fn, denoiser `predict`, the library's binned decoder at gamma(0)."""

    def __init__(self, gamma_fn=linear(-5.0, 5.0), predict=smooth_denoiser, vocab_size=2, timesteps=0,
                 data_shape=(6,)):
        self.gamma_fn, self.predict = gamma_fn, predict
        self.vocab_size, self.timesteps, self.data_shape = vocab_size, timesteps, data_shape

    def gamma(self, t):
        return self.gamma_fn(t)

    def to_centres(self, x):
        return centres_of(x, self.vocab_size)

    def predict_x(self, z_t, gamma_t):
        return self.predict(z_t, gamma_t)

    def decode(self, z0):
        gamma0 = self.gamma(torch.zeros((), dtype=z0.dtype, device=z0.device))
        return BinnedGaussian(z0, gamma0, self.vocab_size, len(self.data_shape))


def binary_data(n: int, d: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.4, dtype=dtype), generator=torch.Generator().manual_seed(seed))


# --- likelihoods: bins and the binned Gaussian p(x | z_0) ------------------------------------------------------

def test_bin_centres_and_input_space_round_trip():
    torch.testing.assert_close(bin_centres(2, F64), torch.tensor([-0.5, 0.5], dtype=F64))
    assert bin_centres(256, F64)[[0, -1]].tolist() == [-1 + 1 / 256, 1 - 1 / 256]
    k = torch.arange(256)
    x = k.float() / 255  # 8-bit data as the loop gives it, float32
    assert torch.equal(bin_index(x, 256), k)
    torch.testing.assert_close(centres_of(x, 256), bin_centres(256)[k], rtol=0, atol=1e-7)
    binary = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert torch.equal(bin_index(binary, 2), binary.long())
    assert centres_of(binary, 2).tolist() == [-0.5, 0.5, 0.5, -0.5]
    with pytest.raises(ValueError, match="vocab_size 3"):
        bin_index(x, 3)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("vocab_size", [2, 256])
def test_binned_gaussian_sums_to_one_over_the_vocabulary(vocab_size, dtype, tol):
    values = (torch.arange(vocab_size, dtype=dtype) / (vocab_size - 1)).reshape(vocab_size, 1)  # every x of a pixel
    for gamma0 in (-13.3, -5.0, 0.0, 5.0):
        for z in (-1.7, -0.5, 0.003, 0.37, 0.999, 2.5):
            px = BinnedGaussian(torch.full((vocab_size, 1), z, dtype=dtype), torch.tensor(gamma0, dtype=dtype),
                                vocab_size, event_ndim=1)
            total = torch.logsumexp(px.log_prob(values), 0)
            assert abs(total.item()) < tol, (gamma0, z, total.item())


def test_binned_gaussian_with_two_bins_is_a_bernoulli():
    # log p(1)/p(0) = [(u - c_0)^2 - (u - c_1)^2] / (2 v) = u (c_1 - c_0) / v  (c_1^2 = c_0^2), with u = z_0/alpha_0
    # and v = sigma_0^2/alpha_0^2: the logit is alpha_0 z_0 (c_1 - c_0) / sigma_0^2 = alpha_0 z_0 / sigma_0^2.
    g = torch.Generator().manual_seed(3)
    z0 = 2 * torch.randn(4, 6, dtype=F64, generator=g)
    gamma0 = torch.tensor([-13.3, -4.0, 0.0, 5.0], dtype=F64).reshape(4, 1)
    x = binary_data(4, 6, seed=4)
    alpha_0, sigma_0 = vp_alpha_sigma(gamma0)
    c = bin_centres(2, F64)
    logits = alpha_0 * z0 * (c[1] - c[0]) / sigma_0**2
    expected = Independent(Bernoulli(logits=logits), 1).log_prob(x)
    px = BinnedGaussian(z0, gamma0, 2, event_ndim=1)
    torch.testing.assert_close(px.log_prob(x), expected, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(px.mean, torch.sigmoid(logits), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vocab_size,gamma0", [(2, 0.0), (256, -3.0)])
def test_binned_gaussian_mean_and_samples_agree(vocab_size, gamma0):
    torch.manual_seed(5)
    n_samples = 4000
    z0 = torch.linspace(-1.1, 1.1, 8, dtype=F64)
    px = BinnedGaussian(z0.expand(n_samples, 8), torch.tensor(gamma0, dtype=F64), vocab_size, event_ndim=1)
    x = px.sample()  # [S, 8] in the input space
    assert torch.equal(x * (vocab_size - 1), torch.round(x * (vocab_size - 1)))
    grid = torch.arange(vocab_size, dtype=F64) / (vocab_size - 1)
    probs = px.logits[0].exp()  # [8, V]
    mean = px.mean[0]
    torch.testing.assert_close(mean, probs @ grid)
    se = ((probs @ grid**2 - mean**2) / n_samples).sqrt()
    assert ((x.mean(0) - mean).abs() <= 5 * se + 1e-12).all(), ((x.mean(0) - mean) / se)


@pytest.mark.parametrize("vocab_size", [2, 256])
def test_binned_gaussian_gradients_are_finite_and_exact(vocab_size):
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, vocab_size, (3, 5), generator=g).double() / (vocab_size - 1)
    for gamma0 in (-13.3, 5.0):
        z0 = (2.4 * torch.rand(3, 5, dtype=F64, generator=g) - 1.2).requires_grad_()
        gam = torch.tensor(gamma0, dtype=F64, requires_grad=True)
        # the closed-form backward (nothing of shape [*, V] kept) against finite differences, in float64
        assert torch.autograd.gradcheck(lambda z, s: BinnedGaussian(z, s, vocab_size, 1).log_prob(x), (z0, gam))
        z32, g32 = z0.detach().float().requires_grad_(), gam.detach().float().requires_grad_()
        BinnedGaussian(z32, g32, vocab_size, 1).log_prob(x).sum().backward()
        assert torch.isfinite(z32.grad).all() and torch.isfinite(g32.grad)


def test_binned_gaussian_float32_matches_float64_at_the_sharpest_schedule_end():
    # At gamma_0 = -13.3 the softmax over the bins is nearly one-hot. Half the pixels ask for the bin z_0 sits in
    # (within a tenth of a bin width of its centre: p is one-hot there and the gradient in z_0 near 0), the rest for
    # any bin. Values and gradients in float32 must match float64's at the same (float32) inputs.
    g = torch.Generator().manual_seed(7)
    gamma0 = torch.tensor(-13.3)
    alpha0 = vp_alpha_sigma(gamma0.double())[0]
    for vocab_size in (256, 2):
        k = torch.randint(0, vocab_size, (4, 100), generator=g)
        jitter = (0.2 * torch.rand(4, 50, dtype=F64, generator=g) - 0.1) * 2 / vocab_size
        z0 = torch.cat([alpha0 * (bin_centres(vocab_size, F64)[k[:, :50]] + jitter),
                        2.2 * torch.rand(4, 50, dtype=F64, generator=g) - 1.1], 1).float().double()
        x = k.double() / (vocab_size - 1)
        results = []
        for dtype in (F64, torch.float32):
            z, gam = z0.to(dtype, copy=True).requires_grad_(), gamma0.to(dtype, copy=True).requires_grad_()
            lp = BinnedGaussian(z, gam, vocab_size, 1).log_prob(x.to(dtype))
            lp.sum().backward()
            assert lp.dtype == dtype
            results.append((lp.double(), z.grad.double(), gam.grad.double()))
        (lp64, dz64, dg64), (lp32, dz32, dg32) = results
        torch.testing.assert_close(lp32, lp64, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(dg32, dg64, rtol=1e-5, atol=0)
        torch.testing.assert_close(dz32, dz64, rtol=1e-5, atol=1e-3)


def test_binned_gaussian_keeps_nothing_of_vocabulary_size_for_backward():
    z0 = torch.randn(2, 3, 8, requires_grad=True)
    x = torch.randint(0, 256, (2, 3, 8)).float() / 255
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        BinnedGaussian(z0, torch.tensor(-6.0), 256, event_ndim=2).log_prob(x).sum().backward()
    assert saved and max(saved) <= z0.numel()


def test_binned_gaussian_is_float32_under_autocast_and_broadcasts_sample_dims():
    z0 = torch.randn(5, 3, 4)  # [S, B, D]
    x = torch.randint(0, 256, (3, 4)).float() / 255  # [B, D]
    reference = BinnedGaussian(z0.bfloat16().float(), torch.tensor(-2.0), 256, 1).log_prob(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = BinnedGaussian(z0.bfloat16(), torch.tensor(-2.0).bfloat16(), 256, 1).log_prob(x)
    assert lp.shape == (5, 3) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, reference)


# --- schedule helpers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,span,tol", [(F64, 30.0, 1e-12), (torch.float32, 15.0, 1e-5)])
def test_variance_preserving_alpha_sigma(dtype, span, tol):
    gamma = torch.linspace(-span, span, 1001, dtype=dtype)
    alpha, sigma = vp_alpha_sigma(gamma)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(gamma), rtol=0, atol=tol)
    torch.testing.assert_close(alpha**2 / sigma**2, torch.exp(-gamma), rtol=tol, atol=0)


def test_gamma_and_slope_match_analytic_slopes():
    t = torch.rand(50, dtype=F64)
    gamma, slope = gamma_and_slope(linear(-13.3, 5.0), t)
    torch.testing.assert_close(gamma, -13.3 + 18.3 * t)
    torch.testing.assert_close(slope, torch.full_like(t, 18.3))
    gamma, slope = gamma_and_slope(lambda u: 1 + 2 * u + 3 * u**2, t)
    torch.testing.assert_close(slope, 2 + 6 * t)


class Quadratic(nn.Module):
    """A learned schedule gamma(t) = w_0 + w_1 t + w_2 t^2 (increasing for the values used)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([-6.0, 9.0, 3.0], dtype=F64))

    def forward(self, t):
        return self.w[0] + self.w[1] * t + self.w[2] * t**2


def test_gamma_and_slope_are_the_same_under_no_grad_and_inference_mode():
    schedule = Quadratic()
    t = torch.rand(16, dtype=F64)
    gamma, slope = gamma_and_slope(schedule, t)
    assert slope.requires_grad  # the slope keeps its graph to the schedule's parameters
    with torch.no_grad():
        quiet = gamma_and_slope(schedule, t)
    with torch.inference_mode():
        t_inf = t.clone()  # an inference tensor, as evaluate() makes them
        inference = gamma_and_slope(schedule, t_inf)
    for g, s in (quiet, inference):
        assert torch.equal(g, gamma.detach()) and torch.equal(s, slope.detach())
        assert not g.requires_grad and not s.requires_grad


def test_schedule_parameters_are_trained_through_the_continuous_loss():
    # The slope enters the loss: its dependence on w (through create_graph) is checked against finite differences.
    schedule = Quadratic()
    x = binary_data(6, 6, seed=8)
    t, eps, eps0 = torch.rand(6, dtype=F64), torch.randn(6, 6, dtype=F64), torch.randn(6, 6, dtype=F64)

    def diffusion(w):
        model = Stub(lambda u: torch.func.functional_call(schedule, {"w": w}, (u,)))
        return vdm_terms(model, x, t=t, eps=eps, eps0=eps0).diffusion

    assert torch.autograd.gradcheck(diffusion, (schedule.w.detach().clone().requires_grad_(),))
    vdm_terms(Stub(schedule), x, t=t, eps=eps, eps0=eps0).elbo.sum().backward()
    assert torch.isfinite(schedule.w.grad).all() and (schedule.w.grad != 0).all()


def test_prior_kl_is_the_gaussian_kl_to_the_standard_normal():
    c = centres_of(torch.randint(0, 256, (3, 2, 4, 4)).double() / 255, 256)
    for gamma_1 in (torch.tensor(-5.0, dtype=F64), torch.tensor([0.0, 5.0, 13.3], dtype=F64)):
        alpha, sigma = vp_alpha_sigma(col(gamma_1.expand(3), c))
        expected = kl_divergence(Normal(alpha * c, sigma.expand_as(c)), Normal(0.0, 1.0)).sum((1, 2, 3))
        torch.testing.assert_close(prior_kl(c, gamma_1), expected, rtol=1e-9, atol=1e-12)
    # float32 stays accurate at a low-SNR end, where the KL is a small difference of terms near 1
    exact = prior_kl(c, torch.tensor(13.3, dtype=F64))
    assert (exact > 0).all()
    torch.testing.assert_close(prior_kl(c.float(), torch.tensor(13.3)).double(), exact, rtol=1e-5, atol=0)


# --- times -------------------------------------------------------------------------------------------------------

def test_antithetic_times_are_stratified_and_uniform():
    g = torch.Generator().manual_seed(9)
    for _ in range(20):
        t = antithetic_times(16, generator=g)
        assert torch.equal(torch.sort(torch.floor(t * 16)).values, torch.arange(16.0))  # one per stratum of 1/16
    draws = torch.stack([antithetic_times(8, generator=g) for _ in range(2000)])  # [2000, 8]
    batch_means = draws.mean(1)
    assert abs(batch_means.mean().item() - 0.5) < 5 * batch_means.std().item() / math.sqrt(2000)
    steps, n, reps = 10, 7, 3000
    discrete = torch.cat([antithetic_times(n, steps, generator=g) for _ in range(reps)])
    k = discrete * steps
    assert torch.equal(k, torch.round(k)) and k.min() >= 1 and k.max() <= steps  # t in {1/T, ..., 1}, never 0
    counts = torch.bincount(torch.round(k).long(), minlength=steps + 1)[1:].double()
    p = 1 / steps
    # binomial standard error: stratified counts vary less, so this is conservative
    assert ((counts - n * reps * p).abs() < 5 * math.sqrt(n * reps * p * (1 - p))).all(), counts


@pytest.mark.parametrize("steps", [0, 1000])
def test_antithetic_times_of_ranks_reproduce_the_one_process_times(steps):
    world, n = 3, 5
    one = antithetic_times(world * n, steps, torch.Generator().manual_seed(11))
    ranks = [antithetic_times(n, steps, torch.Generator().manual_seed(11), offset=r * n, total=world * n)
             for r in range(world)]
    assert torch.equal(torch.cat(ranks), one)


# --- the diffusion term ------------------------------------------------------------------------------------------

def test_discrete_loss_is_T_times_the_step_kl_from_first_principles():
    # For each t = i/T, with its own z_t, L_T(t) = T KL(q(z_s | z_t, x) || p(z_s | z_t)); averaged over the T values
    # of t that is the sum of the T per-step KLs: the discrete-time bound's diffusion term, exactly.
    steps, d = 8, 5
    model = Stub(linear(-6.0, 6.0), timesteps=steps, data_shape=(d,))
    x = binary_data(1, d, seed=12).expand(steps, d)
    t = torch.arange(1, steps + 1, dtype=F64) / steps
    eps = torch.randn(steps, d, dtype=F64, generator=torch.Generator().manual_seed(13))
    loss = vdm_terms(model, x, t=t, eps=eps).diffusion  # [T]

    c = centres_of(x, 2)
    a_t, s_t = (v.unsqueeze(1) for v in vp_alpha_sigma(model.gamma(t)))
    a_s, s_s = (v.unsqueeze(1) for v in vp_alpha_sigma(model.gamma(t - 1 / steps)))
    z_t = a_t * c + s_t * eps
    a_ts = a_t / a_s  # q(z_t | z_s) = N(a_ts z_s, s_ts^2)
    s_ts2 = s_t**2 - a_ts**2 * s_s**2
    var = s_ts2 * s_s**2 / s_t**2  # q(z_s | z_t, x) = N(mean(x), var), by Bayes' rule for two Gaussians
    mean = lambda data: a_ts * s_s**2 / s_t**2 * z_t + a_s * s_ts2 / s_t**2 * data  # noqa: E731
    x_hat = smooth_denoiser(z_t, model.gamma(t))
    kl = kl_divergence(Normal(mean(c), var.sqrt()), Normal(mean(x_hat), var.sqrt())).sum(1)  # [T]
    torch.testing.assert_close(loss, steps * kl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.mean(), kl.sum(), rtol=1e-9, atol=1e-12)


def test_discrete_loss_approaches_the_continuous_loss_as_T_grows():
    # Common random numbers: the same (x, eps) for every T, and every t of the grid {1/T..1} (exact average over t),
    # against the continuous loss integrated over t by the midpoint rule on 2^14 nodes. Given eps, each value is
    # deterministic, so the differences are not noise: they fall like 1/T (first-order sums of a smooth integrand).
    pairs, d = 6, 6
    gamma = linear(-7.0, 5.0)
    x = binary_data(pairs, d, seed=14)
    eps = torch.randn(pairs, d, dtype=F64, generator=torch.Generator().manual_seed(15))

    def mean_loss(model, t):  # [pairs] averaged over the nodes t
        rows = lambda v: v.repeat_interleave(len(t), 0)  # noqa: E731
        terms = vdm_terms(model, rows(x), t=t.repeat(pairs), eps=rows(eps))
        return terms.diffusion.reshape(pairs, len(t)).mean(1)

    nodes = 2**14
    exact = mean_loss(Stub(gamma, data_shape=(d,)), (torch.arange(nodes, dtype=F64) + 0.5) / nodes)
    errors = [(mean_loss(Stub(gamma, timesteps=steps, data_shape=(d,)),
                         torch.arange(1, steps + 1, dtype=F64) / steps) - exact).abs().max().item()
              for steps in (10, 100, 1000)]
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors
    assert 0.5 < (1000 * errors[2]) / (100 * errors[1]) < 2, errors  # T |L_T - L_inf| settles: first order in 1/T


class GaussianData:
    """c ~ N(m, s^2 I) in D dims, fed to the bound as it is (to_centres is the identity), with the Gaussian decoder
    p(c | z_0) = N(z_0 / alpha_0, sigma_0^2 / alpha_0^2) and the optimal denoiser E[c | z_t] by Gaussian conditioning:
    z_t = alpha c + sigma eps, so E[c | z_t] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (z_t - alpha m)."""

    vocab_size, timesteps = 0, 0

    def __init__(self, gamma_fn, dims: int, m: float = 0.5, s: float = 1.0):
        self.gamma_fn, self.data_shape, self.m, self.s = gamma_fn, (dims,), m, s

    def gamma(self, t):
        return self.gamma_fn(t)

    def to_centres(self, x):
        return x

    def predict_x(self, z_t, gamma_t):
        alpha2, sigma2 = torch.sigmoid(-gamma_t).unsqueeze(1), torch.sigmoid(gamma_t).unsqueeze(1)
        return self.m + alpha2.sqrt() * self.s**2 / (alpha2 * self.s**2 + sigma2) * (z_t - alpha2.sqrt() * self.m)

    def decode(self, z0):
        gamma0 = self.gamma(torch.zeros((), dtype=z0.dtype))
        return Independent(Normal(z0 / torch.sigmoid(-gamma0).sqrt(), torch.exp(0.5 * gamma0)), 1)

    def data(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.m + self.s * torch.randn(n, self.data_shape[0], dtype=F64, generator=g)

    def expected_diffusion(self) -> float:
        """E_c L_inf = D/2 int_{SNR(1)}^{SNR(0)} s^2 / (1 + v s^2) dv = D/2 log[(1 + s^2 SNR(0)) / (1 + s^2 SNR(1))]:
        the expected squared error of E[c | z_v] is the posterior variance s^2 / (1 + v s^2) per dim."""
        snr = torch.exp(-self.gamma(torch.tensor([0.0, 1.0], dtype=F64)))
        return 0.5 * self.data_shape[0] * math.log((1 + self.s**2 * snr[0]) / (1 + self.s**2 * snr[1]))

    def expected_gap(self) -> float:
        """E_c[log p(c) - ELBO(c)], p the data's density: the reconstruction term is -1/2 (log 2 pi + gamma_0 + 1) per
        dim, the prior KL 1/2 [alpha_1^2 (m^2 + s^2) + sigma_1^2 - log sigma_1^2 - 1], the diffusion term as above."""
        gamma_0, gamma_1 = self.gamma(torch.tensor([0.0, 1.0], dtype=F64)).tolist()
        a1, v1 = (torch.sigmoid(torch.tensor(g, dtype=F64)).item() for g in (-gamma_1, gamma_1))
        dims = self.data_shape[0]
        rec = -0.5 * dims * (math.log(2 * math.pi) + gamma_0 + 1)
        kl_1 = 0.5 * dims * (a1 * (self.m**2 + self.s**2) + v1 - math.log(v1) - 1)
        entropy = 0.5 * dims * (math.log(2 * math.pi * self.s**2) + 1)
        return -rec + kl_1 + self.expected_diffusion() - entropy


def mean_and_se(v: torch.Tensor) -> tuple[float, float]:
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


def test_continuous_loss_of_the_optimal_denoiser_depends_only_on_the_schedule_ends():
    # The expectation is the closed form above for every interior; a wrong slope (e.g. a missing chain rule) or a
    # wrong SNR weighting would move the cubic schedule's estimate and not the linear one's.
    estimates = []
    for shape in (linear, smoothstep, equalizing):
        model = GaussianData(shape(-6.0, 6.0), dims=4)
        terms = vdm_terms(model, model.data(100_000, seed=16), generator=torch.Generator().manual_seed(17))
        mean, se = mean_and_se(terms.diffusion)
        assert abs(mean - model.expected_diffusion()) < 5 * se, (shape.__name__, mean, se, model.expected_diffusion())
        estimates.append((mean, se))
    (m1, s1), (m2, s2), (m3, s3) = estimates
    assert abs(m1 - m2) < 5 * math.hypot(s1, s2) and abs(m1 - m3) < 5 * math.hypot(s1, s3)


def test_bound_of_gaussian_data_is_below_the_log_likelihood_and_tightens_as_the_ends_widen():
    # gap = log p(c) - ELBO(c) for c from the data: in expectation the KL from the data to the model's marginal plus
    # the bound's own gap, >= 0, and -> 0 as gamma_0 -> -inf and gamma_1 -> +inf (the optimal denoiser is exact).
    # The equalizing schedule leaves no variance from t (the expectation does not depend on the interior).
    gaps = []
    for width in (1.0, 2.0, 4.0):
        model = GaussianData(equalizing(-width, width), dims=8)
        c = model.data(400_000, seed=18)
        terms = vdm_terms(model, c, generator=torch.Generator().manual_seed(19))
        mean, se = mean_and_se(Normal(model.m, model.s).log_prob(c).sum(1) - terms.elbo)
        assert mean > 5 * se, (width, mean, se)
        assert abs(mean - model.expected_gap()) < 5 * se, (width, mean, se, model.expected_gap())
        gaps.append((mean, se))
    for (wide_mean, wide_se), (narrow_mean, narrow_se) in zip(gaps[1:], gaps):
        assert narrow_mean - wide_mean > 5 * math.hypot(wide_se, narrow_se), gaps


def test_noise_error_from_the_predicted_data_is_the_epsilon_error():
    g = torch.Generator().manual_seed(20)
    c, x_hat, eps = (torch.randn(4, 3, dtype=F64, generator=g) for _ in range(3))
    gamma_t = torch.tensor([-13.3, -1.0, 0.5, 6.0], dtype=F64)
    alpha, sigma = (col(v, c) for v in vp_alpha_sigma(gamma_t))
    z_t = alpha * c + sigma * eps
    eps_hat = (z_t - alpha * x_hat) / sigma
    torch.testing.assert_close(noise_sq_err(c, x_hat, gamma_t), (eps - eps_hat).square().sum(1))
    # and in float32 at high SNR with a good denoiser, where forming eps_hat loses ~1e-3 of the error's size
    close = (c + 1e-3 * torch.sigmoid(col(gamma_t, c)).sqrt() * x_hat).float().double()
    c32 = c.float().double()
    exact = noise_sq_err(c32, close, gamma_t.float().double())
    torch.testing.assert_close(noise_sq_err(c32.float(), close.float(), gamma_t.float()).double(), exact,
                               rtol=1e-6, atol=0)
    sq = noise_sq_err(c, x_hat, gamma_t)
    torch.testing.assert_close(diffusion_loss_continuous(sq, torch.full_like(sq, 3.0)), 1.5 * sq)
    torch.testing.assert_close(diffusion_loss_discrete(sq, gamma_t, gamma_t - 0.01, 100),
                               50 * math.expm1(0.01) * sq)


# --- the terms, the objective and the evaluation bound ----------------------------------------------------------

@pytest.mark.parametrize("vocab_size,steps", [(2, 0), (2, 10), (256, 0), (256, 1000)])
def test_vdm_terms_shapes_and_identities(vocab_size, steps):
    data_shape = (1, 4, 4)
    model = Stub(linear(-13.3, 5.0), vocab_size=vocab_size, timesteps=steps, data_shape=data_shape)
    assert isinstance(model, DiffusionModel)
    x = torch.randint(0, vocab_size, (5, *data_shape)).float() / (vocab_size - 1)
    terms = vdm_terms(model, x)
    assert isinstance(terms, VdmTerms)
    for name in ("reconstruction", "prior_kl", "diffusion", "kl", "elbo"):
        value = getattr(terms, name)
        assert value.shape == (5,) and value.dtype == torch.float32 and torch.isfinite(value).all(), name
    assert torch.equal(terms.kl, terms.prior_kl + terms.diffusion)
    assert torch.equal(terms.elbo, terms.reconstruction - terms.kl)
    assert (terms.reconstruction <= 0).all() and (terms.prior_kl > 0).all() and (terms.diffusion >= 0).all()


def test_objective_value_is_the_elbo_and_its_terms_are_the_bound():
    model = Stub(linear(-10.0, 6.0), data_shape=(6,))
    x = binary_data(7, 6, seed=21, dtype=torch.float32)
    objective = VdmObjective()
    assert objective.name == "vdm" and objective.kl_weight(0, 100) == 1.0 and objective.kl_weight(10**6, 100) == 1.0
    torch.manual_seed(22)
    value, logged = objective(model, x, kl_weight=1.0)
    torch.manual_seed(22)
    terms = vdm_terms(model, x)
    assert isinstance(logged, ElboTerms) and torch.equal(value, terms.elbo) and torch.equal(logged.elbo, terms.elbo)
    assert torch.equal(logged.reconstruction, terms.reconstruction) and torch.equal(logged.kl, terms.kl)
    assert torch.equal(logged.kl_per_level, torch.stack([terms.prior_kl, terms.diffusion]))


@pytest.mark.parametrize("steps", [0, 100])
def test_evaluation_bound_is_the_same_draw_under_inference_mode(steps):
    model = Stub(Quadratic(), timesteps=steps, data_shape=(6,))
    x = binary_data(9, 6, seed=23)
    trained = vdm_bound(model, x, generator=torch.Generator().manual_seed(24))
    with torch.inference_mode():
        evaluated = vdm_bound(model, x, generator=torch.Generator().manual_seed(24))
    assert isinstance(evaluated, BoundTerms) and set(evaluated.extra) == {"prior_kl", "diffusion"}
    for a, b in ((trained.elbo, evaluated.elbo), (trained.kl, evaluated.kl),
                 (trained.extra["diffusion"], evaluated.extra["diffusion"])):
        assert torch.equal(a.detach(), b)
    assert torch.equal(evaluated.elbo, evaluated.reconstruction - evaluated.kl)


def test_terms_are_float32_when_the_denoiser_runs_under_autocast():
    torch.manual_seed(25)
    net = nn.Linear(6, 6)
    model = Stub(linear(-13.3, 5.0), predict=lambda z, g: net(z), data_shape=(6,))
    x = binary_data(8, 6, seed=26, dtype=torch.float32)
    seed = lambda: torch.Generator().manual_seed(27)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16  # the network does run in 16 bits here
        terms = vdm_terms(model, x, generator=seed())
    plain = vdm_terms(model, x, generator=seed())
    for name in ("reconstruction", "prior_kl", "diffusion", "elbo"):
        assert getattr(terms, name).dtype == torch.float32, name
    torch.testing.assert_close(terms.reconstruction, plain.reconstruction)  # no network: identical
    torch.testing.assert_close(terms.prior_kl, plain.prior_kl)
    # only the denoiser's bf16 rounding (2^-8 relative) moves the diffusion term: by 0.3% here
    torch.testing.assert_close(terms.diffusion, plain.diffusion, rtol=0.02, atol=0)


def test_several_draws_per_example_are_stratified_in_time_and_average_the_bound():
    """vdm_bound(draws=m): the m times of one example fall one in each stratum of width 1/m, and the estimate is the
    mean of the m draws (the same draws as vdm_terms on the batch repeated m times)."""
    model, x = Stub(), binary_data(3, 6, seed=2)
    seen = {}
    real = diffusion.antithetic_times

    def spy(n, *args, **kwargs):
        seen["t"] = real(n, *args, **kwargs)
        return seen["t"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusion, "antithetic_times", spy)
        torch.manual_seed(4)
        bound = diffusion.vdm_bound(model, x, draws=5)
    t = seen["t"].reshape(5, 3)  # [draws, examples]
    for i in range(3):
        strata = torch.floor(torch.remainder(t[:, i] - t[0, i], 1.0) * 5 + 1e-6).long().sort().values
        assert strata.tolist() == [0, 1, 2, 3, 4]
    torch.manual_seed(4)
    terms = diffusion.vdm_terms(model, x.repeat(5, *([1] * (x.dim() - 1))))
    torch.testing.assert_close(bound.elbo, terms.elbo.reshape(5, 3).mean(0))
    torch.testing.assert_close(bound.extra["diffusion"], terms.diffusion.reshape(5, 3).mean(0))


def test_objective_draws_average_stratified_draws_of_the_bound_and_lower_its_variance():
    """objective.draws = m: the objective is vdm_bound(draws=m) (the same numbers, with gradients), whose estimate
    of the same mean has a smaller spread than one draw's: over 400 seeds, the means agree within 4 standard errors
    and the variance falls by more than 2x for m = 4 (stratifying t removes most of it)."""
    model, x = Stub(), binary_data(3, 6, seed=2)
    torch.manual_seed(7)
    objective, terms = VdmObjective(draws=4)(model, x)
    torch.manual_seed(7)
    bound = diffusion.vdm_bound(model, x, draws=4)
    torch.testing.assert_close(objective, bound.elbo)
    torch.testing.assert_close(terms.kl_per_level, torch.stack([bound.extra["prior_kl"], bound.extra["diffusion"]]))
    one, four = [], []
    for seed in range(400):
        torch.manual_seed(seed)
        one.append(VdmObjective()(model, x)[0])
        four.append(VdmObjective(draws=4)(model, x)[0])
    one, four = torch.stack(one), torch.stack(four)  # [400, B]
    se = (one.var(0) / 400 + four.var(0) / 400).sqrt()
    assert ((one.mean(0) - four.mean(0)).abs() < 4 * se).all()
    assert (four.var(0) < one.var(0) / 2).all()
