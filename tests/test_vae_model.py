"""The VAE (write-up eq. 4-5) satisfies the model protocol, over tiny MLP and conv factories and every likelihood;
one optimizer step changes it and the loss falls on a small fixed batch."""

from __future__ import annotations

import math

import pytest
import torch

from hvae.distributions import DiagonalGaussian
from hvae.likelihoods import KINDS
from hvae.models import VAE
from hvae.objectives import ElboObjective, elbo, elbo_terms
from hvae.protocol import LatentVariableModel

DATA = (1, 8, 8)
LATENT = 3
FACTORIES = {
    "mlp": lambda likelihood: VAE(DATA, LATENT, hidden=(16,), arch="mlp", likelihood=likelihood),
    "conv": lambda likelihood: VAE(DATA, LATENT, arch="conv", conv_channels=(4, 8), likelihood=likelihood),
}
MODELS = [pytest.param(arch, kind, id=f"{arch}-{kind}") for arch in FACTORIES for kind in KINDS]
N_SIGMA = 5.0  # tolerance of the statistical checks, in computed standard errors


@pytest.fixture(autouse=True)
def _one_thread():
    # Why: these tensors are tiny; on a shared 2-core machine intra-op threads only contend (100x slower convs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data_for(kind: str, b: int) -> torch.Tensor:
    """A batch in the range each likelihood scores: {0, 1} for Bernoulli, the 8-bit grid in [-1, 1] otherwise."""
    u8 = torch.randint(0, 256, (b, *DATA))
    return (u8 > 127).float() if kind == "bernoulli" else u8 / 127.5 - 1


@pytest.mark.parametrize("arch,kind", MODELS)
@pytest.mark.parametrize("b,s", [(4, 3), (1, 1), (1, 5), (6, 1)])
def test_vae_satisfies_protocol_shapes(arch, kind, b, s):
    model = FACTORIES[arch](kind)
    assert isinstance(model, LatentVariableModel)
    assert model.data_shape == DATA
    x = data_for(kind, b)
    trace = model.infer(x, n_samples=s)
    (level,) = trace.levels
    assert level.z.shape == (s, b, LATENT)
    assert level.q.mean.shape == level.q.log_var.shape == (b, LATENT)
    assert level.p.is_standard and level.analytic_kl  # p(z) = N(0, I) (eq. 5): the closed form is valid
    px = model.decode(trace.z1)
    lp = px.log_prob(x)
    assert lp.shape == (s, b) and torch.isfinite(lp).all()
    assert px.mean.shape == (s, b, *DATA)
    terms = elbo_terms(model, x, trace)
    assert terms.elbo.shape == (b,) and torch.isfinite(terms.elbo).all()
    assert (terms.kl >= 0).all()
    assert model.reconstruct(x).shape == (b, *DATA)
    assert model.encode(x).shape == (b, LATENT)


@pytest.mark.parametrize("arch,kind", MODELS)
def test_vae_sample_shapes_and_temperature_zero_is_deterministic(arch, kind):
    model = FACTORIES[arch](kind)
    with torch.no_grad():
        assert model.sample(5, temperature=0.8).shape == (5, *DATA)
        assert model.sample(1).shape == (1, *DATA)
        cold_a, cold_b = model.sample(3, temperature=0.0), model.sample(3, temperature=0.0)
        assert torch.equal(cold_a, cold_b)
        # Temperature 0 is z = 0, the prior mean, decoded to the likelihood's mean.
        assert torch.equal(cold_a, model.decode(torch.zeros(3, LATENT)).mean)
        warm_a, warm_b = model.sample(3), model.sample(3)
        assert not torch.equal(warm_a, warm_b)


def test_vae_in_float64_infers_decodes_and_samples_in_float64():
    model = FACTORIES["mlp"]("bernoulli").double()
    x = data_for("bernoulli", 2).double()
    assert model.infer(x, 2).z1.dtype == torch.float64
    assert model.reconstruct(x).dtype == torch.float64
    with torch.no_grad():
        assert model.sample(2).dtype == torch.float64


def test_vae_posterior_is_the_encoder_head_and_infer_reparameterizes():
    model = FACTORIES["mlp"]("bernoulli")
    x = data_for("bernoulli", 4)
    q = model.posterior(x)
    assert isinstance(q, DiagonalGaussian)
    z = model.infer(x, n_samples=2).z1
    z.sum().backward()  # gradients reach the encoder only through the reparameterized sample
    assert model.head.linear.weight.grad is not None and model.head.linear.weight.grad.abs().sum() > 0


def test_vae_conv_rejects_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="divisible by 4"):
        VAE((1, 10, 10), LATENT, arch="conv", conv_channels=(4, 8))


@pytest.mark.parametrize("arch", FACTORIES)
def test_one_adam_step_changes_every_parameter(arch):
    model = FACTORIES[arch]("bernoulli")
    x = data_for("bernoulli", 8)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    surrogate, _ = ElboObjective()(model, x, 1.0)
    (-surrogate.mean()).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name


def mean_elbo_and_se(model, x, n: int = 200) -> tuple[float, float]:
    """Batch-mean ELBO with n samples and its standard error over the samples."""
    with torch.no_grad():
        trace = model.infer(x, n)
        terms = elbo_terms(model, x, trace)
        per_sample = (model.decode(trace.z1).log_prob(x) - terms.kl).mean(1)  # [S]: batch mean per sample
    return per_sample.mean().item(), per_sample.std().item() / math.sqrt(n)


@pytest.mark.parametrize("arch", FACTORIES)
def test_loss_falls_on_a_small_fixed_batch(arch):
    torch.manual_seed(0)
    model = FACTORIES[arch]("bernoulli")
    # Four fixed patterns, repeated: a structure the model can learn quickly.
    patterns = (torch.rand(4, *DATA) > 0.5).float()
    x = patterns.repeat(8, 1, 1, 1)  # [32, 1, 8, 8]
    start, start_se = mean_elbo_and_se(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        surrogate, _ = ElboObjective()(model, x, 1.0)
        (-surrogate.mean()).backward()
        opt.step()
    end, end_se = mean_elbo_and_se(model, x)
    assert end - start > N_SIGMA * math.hypot(start_se, end_se)
    assert end - start > 0.2 * abs(start)  # a real improvement, not a statistically significant wobble
    assert elbo(model, x, 1).elbo.shape == (32,)


@pytest.mark.parametrize("c_in,h,w,k,stride,pad,out_pad,dil,bias", [
    (4, 5, 5, 4, 2, 1, 0, 1, True),   # the conv decoders' output layer
    (3, 4, 6, 3, 2, 0, 1, 1, True),   # output padding, non-square input
    (2, 3, 3, 3, 1, 1, 0, 2, False),  # dilation, no bias
    (5, 7, 7, 5, 3, 2, 2, 1, True),
    (2, 4, 4, 3, 1, 0, 1, 2, True),   # output padding >= stride (allowed as dilation > stride): the parent's path
])
def test_one_channel_transposed_conv_matches_torch_in_value_and_gradient(c_in, h, w, k, stride, pad, out_pad, dil, bias):
    """The matmul + col2im form of the one-output-channel layer is nn.ConvTranspose2d, forward and backward."""
    from torch import nn

    from hvae.nets import OneChannelConvTranspose2d

    torch.manual_seed(0)
    args = (c_in, 1, k)
    kw = dict(stride=stride, padding=pad, output_padding=out_pad, dilation=dil, bias=bias, dtype=torch.float64)
    fast, ref = OneChannelConvTranspose2d(*args, **kw), nn.ConvTranspose2d(*args, **kw)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, c_in, h, w, dtype=torch.float64, requires_grad=True)
    y_fast, y_ref = fast(x), ref(x)
    assert y_fast.shape == y_ref.shape
    torch.testing.assert_close(y_fast, y_ref)
    g = torch.randn_like(y_ref)
    grads_fast = torch.autograd.grad(y_fast, [x, *fast.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b)
