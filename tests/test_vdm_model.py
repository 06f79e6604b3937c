"""The VDM as a model (models/vdm.py): its schedules, the x-prediction at initialization against the exact
posterior mean computed by brute force, the explicit levels of the discrete-time model against the closed-form
per-step terms, sampling and the protocols. The bound itself is tested with diffusion.py."""

from __future__ import annotations

import math

import pytest
import torch

from hvae.errors import ConfigError
from hvae.likelihoods import bin_centres
from hvae.models.vdm import VDM, VDMConfig, bin_posterior_mean, make_schedule
from hvae.numerics import vp_alpha_sigma as alpha_sigma
from hvae.nets import UNet
from hvae.protocol import DiffusionModel, LatentVariableModel
from hvae.schema import check_section

DATA = (1, 4, 4)
N_SIGMA = 5.0  # tolerance of the statistical checks, in computed standard errors
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


def tiny(vocab: int = 2, timesteps: int = 0, schedule: str = "learned", **kw) -> VDM:
    kw = {"hidden": (16,), "embedding": 8} | kw
    return VDM(kw.pop("data_shape", DATA), "bernoulli" if vocab == 2 else "categorical", schedule,
               GAMMA_MIN, GAMMA_MAX, timesteps, **kw)


def data(vocab: int, b: int, shape=DATA) -> torch.Tensor:
    """A batch in the loop's input space: binarized {0, 1} (V = 2) or k/255 (V = 256)."""
    return torch.randint(0, vocab, (b, *shape)).float() / (vocab - 1)


def perturb(model: VDM, scale: float = 0.3) -> VDM:
    """Give the zero-initialized last layers random weights, so that the net's correction is not zero."""
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if param.abs().max() == 0:
                param.normal_(0.0, scale)
    return model


def learned_schedules_step(schedule, steps: int = 5) -> None:
    """A few Adam steps that pull gamma towards a curve of other endpoints and shape."""
    opt = torch.optim.Adam(schedule.parameters(), lr=0.1)
    t = torch.linspace(0, 1, 33)
    for _ in range(steps):
        opt.zero_grad()
        ((schedule(t) - (-10.0 + 12.0 * t.sqrt())) ** 2).mean().backward()
        opt.step()


# 1. Schedules


@pytest.mark.parametrize("kind", ["fixed", "learned", "network"])
def test_schedules_are_variance_preserving_increasing_with_their_endpoints(kind):
    schedule = make_schedule(kind, GAMMA_MIN, GAMMA_MAX)
    if kind != "fixed":
        before = [p.detach().clone() for p in schedule.parameters()]
        learned_schedules_step(schedule)  # endpoints and shape moved away from the start
        assert all(not torch.equal(b, p) for b, p in zip(before, schedule.parameters()))
    t = torch.linspace(0, 1, 101)
    gamma = schedule(t)
    alpha, sigma = alpha_sigma(gamma.double())
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha**2 / sigma**2, torch.exp(-gamma.double()), rtol=1e-12, atol=0)
    assert gamma.dtype == torch.float32 and (gamma.diff() > 0).all()
    g0, g1 = (torch.as_tensor(g, dtype=torch.float32) for g in schedule.endpoints())
    ends = schedule(torch.tensor([0.0, 1.0]))
    if kind == "fixed":
        torch.testing.assert_close(ends, torch.tensor([GAMMA_MIN, GAMMA_MAX]), rtol=1e-6, atol=0)
    else:  # the learned endpoints are exactly gamma(0) and gamma(1), after updates as well
        assert torch.equal(ends, torch.stack([g0, g1]))
        assert abs(g0.item() - GAMMA_MIN) > 0.1 and abs(g1.item() - GAMMA_MAX) > 0.1


def test_network_schedule_starts_near_linear_and_is_bent_by_training():
    schedule = make_schedule("network", GAMMA_MIN, GAMMA_MAX)
    t = torch.linspace(0, 1, 11)
    linear = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t
    assert (schedule(t) - linear).abs().max() < 0.5  # the monotone net's nonlinear part is small at the start
    learned_schedules_step(schedule, 50)
    bent = schedule(t) - (schedule(t[:1]) + (schedule(t[-1:]) - schedule(t[:1])) * t)
    assert bent.abs().max() > 0.5  # its shape is learned, not only its endpoints


@pytest.mark.parametrize("kind", ["learned", "network"])
def test_learned_schedules_get_gradients_through_the_explicit_level_bound(kind):
    from hvae.objectives import elbo

    model = perturb(tiny(timesteps=3, schedule=kind))
    (-elbo(model, data(2, 4)).elbo.mean()).backward()
    for name, param in model.schedule.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


# 2. The x-prediction


def exact_posterior_mean(z: torch.Tensor, gamma: torch.Tensor, vocab: int) -> torch.Tensor:
    """E[c | z_t] for values independent and uniform over the V bins, by brute force in float64:
    p(c_k | z_t) proportional to N(z_t; alpha_t c_k, sigma_t^2)."""
    c = (2 * torch.arange(vocab, dtype=torch.float64) + 1) / vocab - 1
    alpha, sigma = (s.view(-1, *[1] * (z.dim() - 1), 1) for s in alpha_sigma(gamma.double()))
    log_lik = -((z.double().unsqueeze(-1) - alpha * c) ** 2) / (2 * sigma**2)
    return (torch.softmax(log_lik, dim=-1) * c).sum(-1)


@pytest.mark.parametrize("vocab", [2, 256])
def test_predict_x_at_initialization_is_the_exact_posterior_mean_over_the_bins(vocab):
    model = tiny(vocab, data_shape=(3, 4, 4))
    x = data(vocab, 7, (3, 4, 4))
    t = torch.tensor([0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 1.0])  # gamma from -13.3 (SNR 6e5) to 5
    z = torch.stack([model.encode(x[i:i + 1], float(t[i]))[0] for i in range(7)])  # z_t ~ q(z_t | x), t per row
    gamma = model.gamma(t)
    x_hat = model.predict_x(z, gamma)
    exact = exact_posterior_mean(z, gamma, vocab)
    # float32 against float64: z / alpha_t carries a rounding error of ~6e-8 that shifts the gap between two
    # neighbouring bins' logits by SNR (c_k - c_j) 6e-8 <= 6e5 (2/256) 6e-8 = 3e-4; a mean split between them
    # moves by <= 1/4 3e-4 (2/256) = 6e-7. Tolerance: ten times that.
    torch.testing.assert_close(x_hat.double(), exact, rtol=0, atol=1e-5)
    c = bin_centres(vocab)  # a mean over the bins: within their centres' range, up to rounding
    assert x_hat.min() >= c[0] - 1e-6 and x_hat.max() <= c[-1] + 1e-6
    if vocab == 2:  # at SNR 6e5 the posterior is sure of the bin (+-1/2, 1,000 sigma apart): x's own centre
        torch.testing.assert_close(x_hat[:2], model.to_centres(x[:2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("vocab", [2, 256])
def test_predict_x_stays_in_the_bins_range_with_any_correction(vocab):
    model = perturb(tiny(vocab), scale=10.0)
    z, gamma = 3 * torch.randn(16, *DATA), model.gamma(torch.rand(16))
    x_hat = model.predict_x(z, gamma)
    c = bin_centres(vocab)
    assert torch.isfinite(x_hat).all() and x_hat.min() >= c[0] - 1e-6 and x_hat.max() <= c[-1] + 1e-6
    assert (x_hat.double() - exact_posterior_mean(z, gamma, vocab)).abs().max() > 0.1  # the correction acts


def test_predict_x_runs_its_bin_posterior_in_float32_under_autocast():
    model = tiny(256, schedule="network")
    z, t = torch.randn(5, *DATA), torch.rand(5)
    reference = model.predict_x(z, model.gamma(t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gamma = model.gamma(t)
        x_hat = model.predict_x(z, gamma)
    assert gamma.dtype == torch.float32 and x_hat.dtype == torch.float32
    torch.testing.assert_close(x_hat, reference, rtol=0, atol=1e-6)  # zero correction: bf16 does not enter


# 3. Explicit levels (discrete T)


def test_infer_levels_are_the_discrete_time_steps_with_their_closed_form_kls():
    T, S, B = 3, 2, 5
    model = perturb(tiny(256, timesteps=T))
    x = data(256, B)
    trace = model.infer(x, n_samples=S)
    assert len(trace.levels) == T + 1 and all(level.z.shape == (S, B, *DATA) for level in trace.levels)
    c = model.to_centres(x).double()
    gamma = model.gamma(torch.arange(T + 1) / T).double()  # gamma(t_i), t_i = i / T; level i + 1 holds z_{t_i}
    snr = torch.exp(-gamma)
    # Top level: KL(N(alpha_1 c, sigma_1^2 I) || N(0, I)), in float64.
    a1, s1 = alpha_sigma(gamma[-1])
    top = 0.5 * (a1**2 * c**2 + s1**2 - torch.log(s1**2) - 1).sum((1, 2, 3))
    top_level = trace.levels[-1]
    # atol: sigma_1^2 - log sigma_1^2 - 1 ~ 2e-5 per value cancels in float32 with errors of ~6e-8 per value.
    torch.testing.assert_close(top_level.q.kl(top_level.p).double().expand(S, B), top.expand(S, B), rtol=1e-5,
                               atol=1e-6)
    for i in range(T):  # the step t_{i+1} -> t_i, scored at the z_{t_{i+1}} drawn above it
        level, z_t = trace.levels[i], trace.levels[i + 1].z
        with torch.no_grad():
            x_hat = model.predict_x(z_t.flatten(0, 1), gamma[i + 1].float().expand(S * B)).view_as(z_t).double()
        expected = 0.5 * (snr[i] - snr[i + 1]) * ((c - x_hat) ** 2).sum((2, 3, 4))
        torch.testing.assert_close(level.q.kl(level.p).double(), expected, rtol=1e-4, atol=1e-6)
        # q(z_s | z_t, x) against the textbook form: alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 -
        # alpha_{t|s}^2 sigma_s^2; mean (alpha_{t|s} sigma_s^2 z_t + alpha_s sigma_{t|s}^2 c) / sigma_t^2.
        (a_s, s_s), (a_t, s_t) = alpha_sigma(gamma[i]), alpha_sigma(gamma[i + 1])
        a_ts, var_ts = a_t / a_s, s_t**2 - (a_t / a_s) ** 2 * s_s**2
        mean = (a_ts * s_s**2 * z_t.double() + a_s * var_ts * c) / s_t**2
        torch.testing.assert_close(level.q.mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(level.q.log_var.double(), torch.log(var_ts * s_s**2 / s_t**2).expand_as(mean),
                                   rtol=1e-5, atol=1e-5)


def test_closed_form_kls_agree_with_the_sampled_log_ratio():
    # q and p of a level condition on the same z_t, so E[log q(z_s) - log p(z_s)] = the closed-form KL (STYLE.md).
    torch.manual_seed(1)
    model = perturb(tiny(2, timesteps=2, data_shape=(2,)))
    x = data(2, 1, (2,)).expand(4000, -1)
    with torch.no_grad():
        trace = model.infer(x)
    for level in trace.levels:
        log_ratio = (level.q.log_prob(level.z) - level.p.log_prob(level.z)).flatten()
        kl = level.q.kl(level.p).flatten()
        diff = log_ratio - kl  # mean 0; each draw's own z_t makes kl vary, the difference removes it
        se = diff.std() / math.sqrt(len(diff))
        assert abs(diff.mean()) < N_SIGMA * se + 1e-6


@pytest.mark.parametrize("schedule", ["fixed", "network"])
def test_explicit_level_elbo_is_in_expectation_the_discrete_time_bound(schedule):
    # objectives.elbo over the T + 1 levels and diffusion.vdm_terms (one step t per draw, times T) estimate the same
    # discrete-T VLB; their means over many draws agree within standard errors.
    from hvae.diffusion import vdm_terms
    from hvae.objectives import elbo

    model = perturb(tiny(256, timesteps=3, schedule=schedule, data_shape=(1, 2, 2)))
    x = data(256, 1, (1, 2, 2)).expand(10000, -1, -1, -1)
    with torch.no_grad():
        levels, bound = elbo(model, x).elbo.double(), vdm_terms(model, x).elbo.double()
    se = math.sqrt(levels.var() / len(levels) + bound.var() / len(bound))
    assert abs(levels.mean() - bound.mean()) < N_SIGMA * se


def test_infer_needs_a_discrete_t():
    with pytest.raises(ValueError, match="discrete T"):
        tiny(timesteps=0).infer(data(2, 2))


def test_protocols_and_evaluation_capabilities():
    for T, caps in ((0, {"stochastic_bound"}), (4, {"stochastic_bound", "explicit_levels"}),
                    (16, {"stochastic_bound", "explicit_levels"}), (17, {"stochastic_bound"})):
        model = tiny(timesteps=T)
        assert isinstance(model, DiffusionModel) and model.eval_capabilities == caps
        assert model.vocab_size == 2 and model.timesteps == T and model.data_shape == DATA
    assert isinstance(tiny(timesteps=4), LatentVariableModel)


# 4. Sampling


@pytest.mark.parametrize("vocab", [2, 256])
@pytest.mark.parametrize("steps", [1, 7, 64])
def test_sample_chain_and_reconstruct_shapes_and_range(vocab, steps):
    model = perturb(tiny(vocab))
    x = data(vocab, 3)
    outputs = {"sample": model.sample(2, steps=steps), "chain": model.denoising_chain(2, steps=steps, frames=5),
               "reconstruct": model.reconstruct(x, t=0.3, steps=steps)}
    shapes = {"sample": (2, *DATA), "chain": (2, 5, *DATA), "reconstruct": (3, *DATA)}
    for name, images in outputs.items():
        assert images.shape == shapes[name], name
        assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1, name


def test_temperature_zero_is_deterministic_and_defaults_follow_t():
    model = perturb(tiny(256, timesteps=5))
    torch.manual_seed(1)
    first = model.sample(3, temperature=0.0)
    torch.manual_seed(2)
    assert torch.equal(first, model.sample(3, temperature=0.0))
    assert not torch.equal(model.sample(3), model.sample(3))
    assert model.sample(2, steps=3).shape == (2, *DATA)  # any number of steps, T = 5 or not
    with pytest.raises(ValueError, match="steps"):
        model.sample(2, steps=0)


def test_reconstruct_from_a_low_noise_level_returns_the_binarized_image():
    model = tiny(2, schedule="fixed")
    x = data(2, 8)
    torch.testing.assert_close(model.reconstruct(x, t=0.1), x, rtol=0, atol=1e-3)  # SNR(0.1) ~ 1e5
    torch.testing.assert_close(model.reconstruct(x, t=0.0), x, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.reconstruct(x, t=1.5)


# 5. Denoisers and config


@pytest.mark.parametrize("channels", [1, 3])
def test_unet_output_shape_starts_at_zero_and_learns(channels):
    model = tiny(256, denoiser="unet", channels=(8, 16), data_shape=(channels, 28, 28), fourier=True)
    z = torch.randn(2, channels, 28, 28)
    g = torch.rand(2)
    out = model.denoiser(z, g)
    assert out.shape == (2, 2 * channels, 28, 28) and torch.equal(out, torch.zeros_like(out))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (-model.predict_x(z, model.gamma(g)).square().sum()).backward()
    opt.step()
    assert model.denoiser(z, g).abs().max() > 0


def test_unet_blocks_keep_each_resolution():
    net = UNet(3, 6, (8, 16, 32), n_emb=8)
    assert net(torch.randn(2, 3, 28, 28), torch.randn(2, 8)).shape == (2, 6, 28, 28)  # 28 -> 14 -> 7 and back


def test_config_builds_and_rejects_what_cannot_work():
    cfg = VDMConfig()
    check_section(cfg, "model")
    assert cfg.name == "vdm" and cfg.schedule == "learned" and cfg.timesteps == 0
    model = VDMConfig(hidden=[16], embedding=8, timesteps=2).build((1, 8, 8))
    assert isinstance(model, VDM) and model.timesteps == 2
    with pytest.raises(ConfigError, match="gamma_min must be < model.gamma_max"):
        check_section(VDMConfig(gamma_min=5.0, gamma_max=-5.0), "model")
    with pytest.raises(ConfigError, match="model.likelihood"):
        check_section(VDMConfig(likelihood="logistic"), "model")
    with pytest.raises(ConfigError, match="divisible by 8"):
        VDMConfig(denoiser="unet", channels=[8, 8, 8, 8], embedding=8).build((1, 28, 28))


def test_correction_bound_keeps_a_sure_base():
    torch.manual_seed(0)
    wild = perturb(tiny(2), scale=1e4)  # raw corrections of ~1e4
    bounded = tiny(2, correction_bound=20.0)
    bounded.load_state_dict(wild.state_dict())
    x = data(2, 8)
    z = torch.stack([wild.encode(x[i:i + 1], 0.3)[0] for i in range(8)])  # t = 0.3: SNR ~2400, base log-odds ~1200
    gamma, c = wild.gamma(torch.full((8,), 0.3)), wild.to_centres(x)
    assert (wild.predict_x(z, gamma) - c).abs().max() > 0.5  # unbounded: the correction flips sure values
    torch.testing.assert_close(bounded.predict_x(z, gamma), c, rtol=0, atol=1e-6)  # bounded: the base holds


@pytest.mark.parametrize("vocab", [2, 256])
def test_correction_bound_changes_little_where_the_correction_is_small(vocab):
    torch.manual_seed(0)
    calm = perturb(tiny(vocab), scale=1e-2)
    bounded = tiny(vocab, correction_bound=20.0)
    bounded.load_state_dict(calm.state_dict())
    z, gamma = torch.randn(8, *DATA), calm.gamma(torch.rand(8))
    a = calm.denoiser(z, torch.zeros(8))[:, :1]  # the raw corrections, for the tolerance
    # A tanh(a/A) = a - a^3/(3 A^2) + ...: x_hat moves by at most |dx_hat/da| <= 1 times that
    tol = (a.abs().max() ** 3 / (3 * 20.0**2)).item() * 10 + 1e-6
    torch.testing.assert_close(bounded.predict_x(z, gamma), calm.predict_x(z, gamma), rtol=0, atol=tol)


def test_bin_posterior_mean_is_the_likelihood_times_the_context_prior_over_256_bins():
    """x_hat = E[c] under l_k = -SNR/2 (u - c_k)^2 + a c_k - lambda/2 c_k^2, lambda = min(1, SNR) expm1(b), u =
    z_t/alpha_t: bin_posterior_mean against the softmax over all 256 bins in float64, at SNRs from e^-5 to e^13.3."""
    torch.manual_seed(0)
    gamma = torch.tensor([-13.3, -9.0, -4.0, 0.0, 2.0, 5.0]).view(-1, 1)  # [6, 1]: one noise level per row
    z, a, b = torch.randn(6, 50), 3 * torch.randn(6, 50), torch.randn(6, 50)
    c = bin_centres(256, dtype=torch.float64)
    snr, u = torch.exp(-gamma.double()), z.double() / torch.sqrt(torch.sigmoid(-gamma.double()))
    lam = snr.clamp(max=1) * torch.expm1(b.double())
    logits = (-0.5 * snr.unsqueeze(-1) * (u.unsqueeze(-1) - c) ** 2 + a.double().unsqueeze(-1) * c
              - 0.5 * lam.unsqueeze(-1) * c**2)
    exact = torch.softmax(logits, -1) @ c
    x_hat = bin_posterior_mean(z, gamma, a, b, bin_centres(256, dtype=torch.float32))
    # float32 u carries a rounding error ~6e-8 that moves a mean split between two bins by <= 6e-7 (as in
    # test_predict_x_at_initialization...); grid_gaussian_mean is within 3e-7 of the 256-bin mean (test_bins.py).
    torch.testing.assert_close(x_hat.double(), exact, rtol=0, atol=1e-5)


def test_the_context_prior_barely_moves_a_sure_posterior():
    """At gamma = -13.3 (SNR 6e5) the net's outputs, of order 1, move x_hat by far less than a bin (2/256): the
    prior's precision is added to SNR, so its pull falls as 1/SNR."""
    torch.manual_seed(1)
    gamma = torch.full((1, 1), -13.3)
    c = bin_centres(256, dtype=torch.float32)
    x = c[torch.randint(0, 256, (1, 500))]
    z = torch.sqrt(torch.sigmoid(-gamma)) * x + torch.sqrt(torch.sigmoid(gamma)) * torch.randn(1, 500)
    base = bin_posterior_mean(z, gamma, torch.zeros_like(z), torch.zeros_like(z), c)
    moved = bin_posterior_mean(z, gamma, 2 * torch.ones_like(z), 0.5 * torch.ones_like(z), c)
    # |dm| <= (|a| + lambda |u|)/SNR = (2 + 0.65)/6e5 = 4.4e-6, and dx_hat/dm <= P d^2/4 = 9.2 (m on the boundary of
    # two bins d = 2/256 apart): |dx_hat| <= 4e-5. (P = SNR e^b moved m by ~b u: up to 0.4, 50 bins.)
    assert (moved - base).abs().max() < 1e-4


def test_bin_posterior_mean_and_its_gradient_stay_finite_where_the_net_pushes_b_and_a_to_extremes():
    """An 8-bit run drove b to the clamp near t = 1 within 20 steps (P = 1e-15, m = 1e16: NaN); the precision's floor
    SNR e^-5 keeps |m| / std within float64's reach of the closed form."""
    gamma = torch.tensor([-13.3, -2.0, 0.0, 3.0, 5.0, 10.0]).view(-1, 1)  # [6, 1]: SNR from 6e5 to 4.5e-5
    z = torch.randn(6, 40)
    a = (torch.tensor([-1e3, -30.0, 0.0, 30.0, 1e3]).repeat(8) * torch.ones(6, 40)).requires_grad_()
    b = (torch.tensor([-200.0, -30.0, -5.0, 0.0, 5.0, 30.0, 200.0, -1.0]).repeat(5) * torch.ones(6, 40)).requires_grad_()
    x_hat = bin_posterior_mean(z, gamma, a, b, bin_centres(256, dtype=torch.float32))
    c = bin_centres(256)
    assert torch.isfinite(x_hat).all() and x_hat.min() >= c[0] - 1e-6 and x_hat.max() <= c[-1] + 1e-6
    x_hat.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
