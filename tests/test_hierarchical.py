"""Hierarchical VAEs: the seed's Markovian HVAE (eq. 6-8) and the top-down LadderVAE, checked on the math.

- T = 1 MHVAE is the VAE; with every rate at the sample, eq. 8's terms are log p(x, z) - log q(z|x) exactly.
- Linear-Gaussian two-level chains with exact log p(x): the bounds stay below and the IW bound closes in.
- The ladder's KL is taken against its top-down posterior; all models keep the protocol's shapes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal

from hvae.config import Config, apply
from hvae.distributions import DiagonalGaussian
from hvae.models import VAE, LadderConfig, LadderVAE, MHVAE, MHVAEConfig, build_model
from hvae.models.ladder import precision_merge
from hvae.objectives import (ElboObjective, elbo, elbo_terms, iw_bound, log_importance_weights,
                             log_weights_of_trace)
from hvae.protocol import LatentVariableModel

SHAPE = (1, 6, 6)  # 36 binary pixels: small enough for float64 and thousands of samples
SMALL = dict(hidden=(24, 16), level_hidden=(12,))


def binary(b: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.full((b, *SHAPE), 0.4), generator=torch.Generator().manual_seed(seed))


def log_normal(z, g: DiagonalGaussian):
    """log N(z; mean, exp(log_var)) summed over the last dim, by torch.distributions (an independent path)."""
    return Normal(g.mean, torch.exp(0.5 * g.log_var)).log_prob(z).sum(-1)


FACTORIES = {
    "vae": lambda: VAE(SHAPE, 5, SMALL["hidden"]),
    "mhvae-2": lambda: MHVAE(SHAPE, (5, 3), **SMALL),
    "mhvae-3": lambda: MHVAE(SHAPE, (5, 4, 3), **SMALL, norm="layer"),
    **{f"ladder-{post}-{'skip' if skip else 'noskip'}-{norm}":
       (lambda post=post, skip=skip, norm=norm: LadderVAE(SHAPE, (5, 4, 3), **SMALL, posterior=post, skip=skip, norm=norm))
       for post, skip, norm in (("residual", False, "none"), ("residual", True, "layer"), ("precision", False, "batch"),
                                ("precision", True, "none"), ("independent", True, "layer"))},
    "ladder-conv": lambda: LadderVAE(SHAPE, (5, 4, 3), level_hidden=(12,), arch="conv", conv_channels=(4,), skip=True),
}


# 1. The T = 1 MHVAE is the VAE.

def test_one_level_mhvae_is_the_vae():
    vae, mh = VAE(SHAPE, 5, SMALL["hidden"]), MHVAE(SHAPE, (5,), SMALL["hidden"])
    mh.load_state_dict(vae.state_dict())  # same parameter names: strict load
    x = binary(8)
    torch.manual_seed(3)
    a = elbo(vae, x, n_samples=4)
    torch.manual_seed(3)
    b = elbo(mh, x, n_samples=4)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    torch.manual_seed(4)
    wa = log_importance_weights(vae, x, 50)
    torch.manual_seed(4)
    assert torch.equal(wa, log_importance_weights(mh, x, 50))
    torch.manual_seed(5)
    sa = vae.sample(6, 0.7)
    torch.manual_seed(5)
    assert torch.equal(sa, mh.sample(6, 0.7))


# 2. Eq. 8 for the MHVAE: the Contracts' terms against the joint computed by hand.

def mhvae_log_joint_minus_log_q(model: MHVAE, x, zs):
    """log p(x, z_1:T) - log q(z_1:T|x) from the model's conditionals (eq. 6 over eq. 7). zs: T x [S, B, D_t]."""
    log_p = model.decode(zs[0]).log_prob(x) + Normal(0.0, 1.0).log_prob(zs[-1]).sum(-1)  # p(x|z_1) p(z_T)
    log_q = log_normal(zs[0], model.posterior(x))  # q(z_1|x)
    for t in range(1, len(zs)):
        log_p = log_p + log_normal(zs[t - 1], model.down[t - 1](zs[t]))  # p(z_{t}|z_{t+1}) (0-based t-1)
        log_q = log_q + log_normal(zs[t], model.up[t - 1](zs[t - 1]))  # q(z_{t+1}|z_t)
    return log_p - log_q  # [S, B]


@pytest.mark.parametrize("dims", [(5, 3), (5, 4, 3)])
def test_mhvae_sampled_rates_are_log_joint_minus_log_q_exactly(dims):
    model = MHVAE(SHAPE, dims, **SMALL).double()
    x = binary(6).double()
    torch.manual_seed(1)
    terms = elbo(model, x, n_samples=5, analytic_kl=False)
    torch.manual_seed(1)
    trace = model.infer(x, 5)
    assert [lvl.analytic_kl for lvl in trace.levels] == [False] * (len(dims) - 1) + [True]
    by_hand = mhvae_log_joint_minus_log_q(model, x, [lvl.z for lvl in trace.levels])
    torch.testing.assert_close(terms.reconstruction - terms.kl_per_level.sum(0), by_hand.mean(0), rtol=0, atol=1e-10)
    torch.testing.assert_close(log_weights_of_trace(model, x, trace), by_hand, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dims", [(5, 3), (5, 4, 3)])
def test_mhvae_closed_form_top_kl_agrees_in_expectation(dims):
    model = MHVAE(SHAPE, dims, **SMALL).double()
    with torch.no_grad():  # a top posterior far from N(0, I), so the top rate is large
        model.up[-1].head.linear.bias[: dims[-1]] += 1.5
    x, s = binary(4).double(), 4000
    trace = model.infer(x, s)
    top = trace.levels[-1]
    kl = DiagonalGaussian.kl(top.q, top.p)  # per conditioning sample: [S, B]
    log_ratio = top.q.log_prob(top.z) - top.p.log_prob(top.z)  # [S, B]
    diff = kl - log_ratio  # zero mean: E_{z_T ~ q(.|z_{T-1})}[log q - log p] = KL
    assert (kl.mean(0) > 1.0).all()
    assert (diff.mean(0).abs() < 5 * diff.std(0) / math.sqrt(s)).all()
    # The two ELBOs of one trace differ by exactly this, the top level's rate.
    gap = elbo_terms(model, x, trace, analytic_kl=False).elbo - elbo_terms(model, x, trace).elbo
    torch.testing.assert_close(gap, diff.mean(0), rtol=0, atol=1e-10)


# 3. Linear-Gaussian two-level chains: z_2 ~ N(0, 1), z_1 | z_2 ~ N(a z_2 + c, s1^2), x | z_1 ~ N(w z_1 + b, I).

A, C, S1_SQ = 1.3, 0.4, 0.5
W = torch.tensor([1.0, -0.6, 0.8], dtype=torch.float64)
B0 = torch.tensor([0.2, 0.0, -0.3], dtype=torch.float64)


def exact_log_px(x):
    cov = (A ** 2 + S1_SQ) * torch.outer(W, W) + torch.eye(3, dtype=torch.float64)
    return MultivariateNormal(W * C + B0, cov).log_prob(x)


def draw_x(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z2 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    z1 = A * z2 + C + math.sqrt(S1_SQ) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return z1 * W + B0 + torch.randn(n, 3, generator=g, dtype=torch.float64)


def set_linear(head, weight, bias, log_var, widen: float = 0.0, shift: float = 0.0):
    """A GaussianHead with mean = weight . h + bias + shift, constant log_var + widen."""
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.weight[0] = torch.as_tensor(weight, dtype=torch.float64)
        head.linear.bias.copy_(torch.tensor([bias + shift, log_var + widen], dtype=torch.float64))


def linear_mhvae(widen=0.0, shift=0.0) -> MHVAE:
    """The chain as an MHVAE with its exact posterior q(z_1|x) q(z_2|z_1) (Markov: p(z_2|z_1, x) = p(z_2|z_1)),
    optionally widened and shifted."""
    m = MHVAE((3,), (1, 1), hidden=(), level_hidden=(), likelihood="gaussian").double()
    with torch.no_grad():
        m.decoder[0].weight.copy_(W[:, None]), m.decoder[0].bias.copy_(B0)
    set_linear(m.down[0].head, [A], C, math.log(S1_SQ))
    v1 = A ** 2 + S1_SQ
    prec1 = 1 / v1 + W @ W
    set_linear(m.head, W / prec1, float((C / v1 - W @ B0) / prec1), -math.log(prec1), widen, shift)
    prec2 = 1 + A ** 2 / S1_SQ
    set_linear(m.up[0].head, [A / (S1_SQ * prec2)], -A * C / (S1_SQ * prec2), -math.log(prec2), widen, shift)
    return m


def linear_ladder(posterior: str, widen=0.0, shift=0.0) -> LadderVAE:
    """The chain as a LadderVAE with its exact top-down posterior p(z_2|x) p(z_1|z_2, x), optionally perturbed."""
    m = LadderVAE((3,), (1, 1), hidden=(), level_hidden=(), likelihood="gaussian", posterior=posterior).double()
    with torch.no_grad():
        m.decoder[0].weight.copy_(W[:, None]), m.decoder[0].bias.copy_(B0)
    set_linear(m.blocks[0].prior, [A], C, math.log(S1_SQ))
    sigma = S1_SQ * torch.outer(W, W) + torch.eye(3, dtype=torch.float64)
    g = torch.linalg.solve(sigma, W * A)
    prec2 = 1 + A * (W @ g)
    set_linear(m.blocks[-1].post, g / prec2, float(-(g / prec2) @ (W * C + B0)), -math.log(prec2), widen, shift)
    ww = W @ W
    if posterior == "precision":  # the bottom-up factor N(x; w z_1 + b, I) as a Gaussian in z_1
        set_linear(m.blocks[0].post, W / ww, float(-(W @ B0) / ww), -math.log(ww), widen, shift)
    else:  # independent: q(z_1 | z_2, x) linear in (x, z_2)
        prec1 = 1 / S1_SQ + ww
        weight = torch.cat([W / prec1, torch.tensor([A / (S1_SQ * prec1)], dtype=torch.float64)])
        set_linear(m.blocks[0].post.head, weight, float((C / S1_SQ - W @ B0) / prec1), -math.log(prec1), widen, shift)
    return m


LINEAR = {"mhvae": linear_mhvae, "ladder-independent": lambda **kw: linear_ladder("independent", **kw),
          "ladder-precision": lambda **kw: linear_ladder("precision", **kw)}


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_gaussian_exact_posterior_gives_log_px_at_every_sample(name):
    # With q the true posterior, log p(x, z) - log q(z|x) = log p(x) whatever z is.
    model, x = LINEAR[name](), draw_x(16, 0)
    log_w = log_importance_weights(model, x, 20)
    torch.testing.assert_close(log_w, exact_log_px(x).expand(20, -1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_gaussian_bounds_rise_with_k_towards_log_px(name):
    model, x = LINEAR[name](widen=0.8, shift=0.5), draw_x(256, 1)
    torch.manual_seed(0)
    log_w = log_importance_weights(model, x, 1000)  # [1000, B]; L_k from disjoint groups of k
    exact = exact_log_px(x)
    gaps = {k: exact - iw_bound(log_w.reshape(1000 // k, k, -1).transpose(0, 1)).mean(0) for k in (1, 10, 100, 1000)}
    means = {k: g.mean().item() for k, g in gaps.items()}
    se = gaps[1000].std().item() / math.sqrt(len(x))
    assert means[1] > means[10] > means[100] > means[1000] > -5 * se
    assert means[1] > 0.1 and means[1000] < 0.05 * means[1]  # the ELBO's gap is real, and k = 1000 closes most of it
    terms = elbo(model, x, n_samples=200)  # the ELBO with closed-form KL where valid: below log p(x) too
    assert (exact - terms.elbo).mean() > 0.1


# 4. The IWAE objective with k = 1 is the ELBO objective.

@pytest.mark.parametrize("name", ["mhvae-3", "ladder-residual-skip-layer"])
def test_iwae_with_one_sample_is_the_elbo(name):
    model, x = FACTORIES[name]().double(), binary(8).double()
    trace = model.infer(x, 1)
    torch.testing.assert_close(iw_bound(log_weights_of_trace(model, x, trace)),
                               elbo_terms(model, x, trace, analytic_kl=False).elbo, rtol=0, atol=1e-10)
    torch.manual_seed(2)
    objective, _ = ElboObjective()(model, x, 1.0)
    torch.manual_seed(2)
    torch.testing.assert_close(objective, elbo(model, x).elbo, rtol=0, atol=1e-10)


# 5. The ladder's KL is against its top-down posterior.

def test_ladder_kl_uses_the_top_down_posterior_not_the_bottom_up_statistics():
    model = LadderVAE(SHAPE, (5, 4, 3), **SMALL, posterior="precision").double()
    x = binary(8).double()
    torch.manual_seed(0)
    trace = model.infer(x, 3)
    ds = model.bottom_up(x)
    kl_merged, kl_raw = [], []
    for t in (1, 2):  # levels below the top
        level = trace.levels[t - 1]
        raw = model.blocks[t - 1].post(ds[t - 1])  # the encoder's own estimate N(mu_hat, var_hat): [B, D_t]
        merged = precision_merge(raw.__class__(raw.mean.expand_as(level.p.mean), raw.log_var.expand_as(level.p.mean)),
                                 level.p)
        torch.testing.assert_close(level.q.mean, merged.mean)
        torch.testing.assert_close(level.q.log_var, merged.log_var)
        kl_merged.append(DiagonalGaussian.kl(merged, level.p).mean(0))
        kl_raw.append(DiagonalGaussian.kl(raw.__class__(raw.mean.expand_as(level.p.mean),
                                                        raw.log_var.expand_as(level.p.mean)), level.p).mean(0))
    terms = elbo_terms(model, x, trace)
    for t in (0, 1):
        torch.testing.assert_close(terms.kl_per_level[t], kl_merged[t])
        assert ((terms.kl_per_level[t] - kl_raw[t]).abs() > 1e-3).all()
    # ELBO by hand: log p(x | z_1) - sum of closed-form KLs, the top against N(0, I).
    top = trace.levels[-1]
    by_hand = model.decode(trace.z1).log_prob(x).mean(0) - sum(kl_merged) - top.q.kl_standard()
    torch.testing.assert_close(terms.elbo, by_hand)


def test_ladder_residual_posterior_is_relative_to_the_prior_and_not_collapsed_at_init():
    torch.manual_seed(0)
    model, x = LadderVAE(SHAPE, (5, 4, 3), **SMALL, posterior="residual"), binary(16)
    trace = model.infer(x, 2)
    ds = model.bottom_up(x)
    level = trace.levels[0]
    h = model.blocks[0].state(torch.cat([trace.levels[1].z, model.blocks[1].state(trace.levels[2].z)], -1))
    dmu, _ = model.blocks[0].post(torch.cat([ds[0].expand(2, -1, -1), h], -1)).chunk(2, -1)
    torch.testing.assert_close(level.q.mean, level.p.mean + dmu)
    assert (elbo_terms(model, x, trace).kl_per_level.mean(1) > 1e-2).all()  # no level starts collapsed


# 5b. Runs saved by the ladder before its TopDownBlocks (four lists down.i, prior.i, post.i and top; i = t - 1).

def legacy_name(model: LadderVAE, name: str) -> str:
    """The old name of a key, from the old layout as it was: blocks.i.state -> down.i, blocks.i.prior -> prior.i,
    blocks.i.post -> post.i, the top level's blocks.{T-1}.post -> top; encoder, decoder, up unchanged."""
    head, _, rest = name.partition(".")
    if head != "blocks":
        return name
    i, part, rest = rest.split(".", 2)
    if part == "post" and int(i) == model.n_levels - 1:
        return f"top.{rest}"
    return f"{'down' if part == 'state' else part}.{i}.{rest}"


@pytest.mark.parametrize("name", [name for name in FACTORIES if name.startswith("ladder")] + ["ladder-one-level"])
def test_a_state_dict_under_the_legacy_names_loads_and_gives_the_same_outputs(name):
    make = FACTORIES.get(name, lambda: LadderVAE(SHAPE, (5,), **SMALL))
    torch.manual_seed(0)
    saved = make().eval()
    legacy = {legacy_name(saved, k): v for k, v in saved.state_dict().items()}  # BatchNorm buffers too
    assert any(k.startswith("top.") for k in legacy) and not any(k.startswith("blocks.") for k in legacy)
    assert [saved.legacy_key(k) for k in legacy] == list(saved.state_dict())  # legacy_key inverts legacy_name
    torch.manual_seed(1)
    model, wrapped = make().eval(), make().eval()
    keys = list(legacy)
    model.load_state_dict(legacy)  # strict: every key found, none left over
    nn.ModuleDict({"ema": wrapped}).load_state_dict({f"ema.{k}": v for k, v in legacy.items()})  # under a prefix
    assert list(legacy) == keys  # the caller's dict is not renamed
    for loaded in (model, wrapped):
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.state_dict().items())
        x = binary(4)
        torch.manual_seed(2)
        a = elbo(saved, x, n_samples=3)
        torch.manual_seed(2)
        assert all(torch.equal(ta, tb) for ta, tb in zip(a, elbo(loaded, x, n_samples=3)))


# A small ladder's parameters as the four-list layout registered them (encoder, decoder, up, down, prior, top,
# post), written out by hand: LadderVAE((6,), (3, 2), hidden=(5,), level_hidden=(4,), likelihood="gaussian").
LEGACY_PARAMETERS = [
    ("encoder.1.0.weight", (5, 6)), ("encoder.1.0.bias", (5,)), ("decoder.0.weight", (5, 3)), ("decoder.0.bias", (5,)),
    ("decoder.2.weight", (6, 5)), ("decoder.2.bias", (6,)), ("up.0.0.weight", (4, 5)), ("up.0.0.bias", (4,)),
    ("down.0.0.weight", (4, 2)), ("down.0.0.bias", (4,)), ("prior.0.linear.weight", (6, 4)),
    ("prior.0.linear.bias", (6,)), ("top.linear.weight", (4, 4)), ("top.linear.bias", (4,)),
    ("post.0.0.0.weight", (4, 9)), ("post.0.0.0.bias", (4,)), ("post.0.1.weight", (6, 4)), ("post.0.1.bias", (6,)),
]


def test_legacy_parameter_order_is_the_old_registration_order_and_its_names_load():
    torch.manual_seed(0)
    model = LadderVAE((6,), (3, 2), hidden=(5,), level_hidden=(4,), likelihood="gaussian")
    params, order = dict(model.named_parameters()), model.legacy_parameter_order()
    assert sorted(order) == sorted(params) and order != list(params)  # a permutation, and not the identity
    assert [tuple(params[n].shape) for n in order] == [shape for _, shape in LEGACY_PARAMETERS]
    assert order == [model.legacy_key(old) for old, _ in LEGACY_PARAMETERS]
    # What an old run's model.safetensors holds: its names, in its order; it loads strictly and acts the same.
    torch.manual_seed(1)
    fresh = LadderVAE((6,), (3, 2), hidden=(5,), level_hidden=(4,), likelihood="gaussian")
    fresh.load_state_dict({old: params[new].detach() for (old, _), new in zip(LEGACY_PARAMETERS, order)})
    x = torch.randn(5, 6)
    torch.manual_seed(2)
    a = elbo(model, x, n_samples=2)
    torch.manual_seed(2)
    assert all(torch.equal(ta, tb) for ta, tb in zip(a, elbo(fresh, x, n_samples=2)))


@pytest.mark.parametrize("kw", [dict(posterior="residual", norm="none"), dict(posterior="precision", norm="batch"),
                                dict(posterior="independent", norm="layer", skip=True)])
def test_initial_weights_are_drawn_in_the_legacy_parameter_order(kw):
    # The four-list layout drew each nn.Linear's initial weights (the only draws of an MLP ladder) in the order it
    # registered them; redrawing them in legacy_parameter_order from the same seed must give every value back,
    # so a seed still gives the old initial weights. Redrawn in the blocks' own order, they differ.
    def redraw(model, names):
        modules = dict(model.named_modules())
        torch.manual_seed(0)
        for name in names:
            owner = modules[name.rpartition(".")[0]]
            if isinstance(owner, nn.Linear) and name.endswith(".weight"):
                owner.reset_parameters()  # weight, then bias: as at construction
        return model.state_dict()

    torch.manual_seed(0)
    built = {k: v.clone() for k, v in LadderVAE(SHAPE, (5, 4, 3), **SMALL, **kw).state_dict().items()}
    torch.manual_seed(5)
    model = LadderVAE(SHAPE, (5, 4, 3), **SMALL, **kw)
    assert all(torch.equal(built[k], v) for k, v in redraw(model, model.legacy_parameter_order()).items())
    assert not all(torch.equal(built[k], v) for k, v in redraw(model, [n for n, _ in model.named_parameters()]).items())


# 6. Protocol, shapes, temperatures, hierarchical generation.

@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("b,s", [(1, 1), (3, 2)])
def test_every_model_keeps_the_protocol_shapes(name, b, s):
    model = FACTORIES[name]()
    if b == 1 and name.endswith("batch"):
        model.eval()  # BatchNorm cannot take batch statistics of one example; its running ones serve
    assert isinstance(model, LatentVariableModel)
    dims = getattr(model, "latent_dims", (5,))
    trace = model.infer(binary(b), s)
    assert [tuple(lvl.z.shape) for lvl in trace.levels] == [(s, b, d) for d in dims]
    assert tuple(model.decode(trace.z1).log_prob(binary(b)).shape) == (s, b)
    terms = elbo(model, binary(b), s)
    assert terms.elbo.shape == (b,) and terms.kl_per_level.shape == (len(dims), b)
    torch.testing.assert_close(terms.elbo, terms.reconstruction - terms.kl)
    assert log_importance_weights(model, binary(b), 7, chunk_size=3).shape == (7, b)
    assert model.sample(b).shape == (b, *SHAPE) and model.reconstruct(binary(b)).shape == (b, *SHAPE)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_temperature_zero_is_deterministic_per_level_too(name):
    model = FACTORIES[name]().eval()
    n_levels = len(getattr(model, "latent_dims", (5,)))
    torch.manual_seed(0)
    a = model.sample(4, 0.0)
    torch.manual_seed(1)
    assert torch.equal(a, model.sample(4, 0.0))
    torch.testing.assert_close(a, a[0].expand_as(a))  # every draw the same image (up to batched-matmul rounding)
    torch.manual_seed(1)
    assert torch.equal(a, model.sample(4, [0.0]))  # a one-item list is one temperature for every level
    if n_levels > 1:
        torch.manual_seed(1)
        assert torch.equal(a, model.sample(4, [0.0] * n_levels))
        torch.manual_seed(2)
        b = model.sample(4, [0.0] * (n_levels - 1) + [1.0])  # only the top level varies
        assert not torch.equal(a, b)


def test_mhvae_temperature_zero_sample_is_the_chain_of_means():
    model = MHVAE(SHAPE, (5, 4, 3), **SMALL)
    z = torch.zeros(2, 3)
    for t in (1, 0):
        z = model.down[t](z).mean
    torch.testing.assert_close(model.sample(2, 0.0), model.decode(z).mean)
    with pytest.raises(ValueError, match="one per level"):
        model.sample(2, [1.0, 1.0])


@pytest.mark.parametrize("name", ["mhvae-3", "ladder-residual-skip-layer", "ladder-precision-noskip-batch"])
def test_resample_lower_keeps_the_top_and_redraws_below(name):
    model, x = FACTORIES[name]().eval(), binary(4)
    torch.testing.assert_close(model.resample_lower(x, 3), model.reconstruct(x))  # keep all: reconstruction
    torch.manual_seed(0)
    a = model.sample(4, 0.0)
    torch.testing.assert_close(model.resample_lower(x, 0, 0.0), a)  # keep none: a sample
    kept = model.resample_lower(x, 1, 0.0)  # keep z_T, the rest at the prior means: deterministic
    torch.testing.assert_close(kept, model.resample_lower(x, 1, 0.0))
    assert not torch.allclose(kept, a, atol=1e-4)  # ... and it depends on x through z_T
    torch.manual_seed(1)
    r1 = model.resample_lower(x, 1, 1.0)
    torch.manual_seed(2)
    assert not torch.allclose(r1, model.resample_lower(x, 1, 1.0), atol=1e-4)  # the lower levels are redrawn
    if isinstance(model, MHVAE):  # by hand: only z_3's posterior mean reaches the levels below
        z3 = model.encode_levels(x)[2]
        torch.testing.assert_close(kept, model.decode(model.down[0](model.down[1](z3).mean).mean).mean)


# 7. Configuration and the training loop, end to end.

def test_build_model_reads_the_hierarchy_config():
    m = build_model(MHVAEConfig(levels=3, latent_dims=[8, 4, 2], hidden=[16], level_hidden=[8]), SHAPE)
    assert isinstance(m, MHVAE) and m.latent_dims == (8, 4, 2)
    lad = build_model(LadderConfig(levels=2, latent_dim=6, hidden=[16], posterior="precision",
                                  skip=True, norm="layer"), SHAPE)
    assert isinstance(lad, LadderVAE) and lad.latent_dims == (6, 6) and lad.decoder[0].in_features == 12
    with pytest.raises(ValueError, match="one size per level"):
        build_model(MHVAEConfig(levels=3, latent_dims=[8, 4]), SHAPE)
    with pytest.raises(ValueError, match="one size per level"):  # refused when the config is built, too
        apply(Config(), {"model.name": "mhvae", "model.levels": 3, "model.latent_dims": [8, 4]})
    with pytest.raises(ValueError, match="posterior"):
        build_model(LadderConfig(posterior="merge"), SHAPE)
    with pytest.raises(ValueError, match="norm"):
        apply(Config(), {"model.name": "mhvae", "model.norm": "group", "model.level_hidden": []})


@pytest.mark.parametrize("model", [["--model", "mhvae", "--set", "model.levels=3"],
                                   ["--model", "ladder", "--set", "model.skip=true", "--set", "model.norm=batch"]])
def test_hierarchical_models_train_and_evaluate_through_the_cli(model, idx_dir, tmp_path, capsys):
    from hvae.cli import main

    run = tmp_path / "run"
    tiny = ["--set", "model.hidden=[32]", "--set", "model.level_hidden=[16]", "--set", "model.latent_dim=4",
            "--set", "objective.name=iwae", "--set", "objective.k=2", "--batch-size", "32", "--no-progress"]
    assert main(["train", "--data-dir", str(idx_dir.parent), "--epochs", "2", "--out", str(run), *model, *tiny]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_elbo"] > lines[0]["train_elbo"]  # it learned
    capsys.readouterr()
    assert main(["eval", str(run), "--k", "10", "--limit", "16", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    n_levels = 3 if "mhvae" in model else 2
    assert len(result["kl_per_level"]) == n_levels and len(result["active_units_per_level"]) == n_levels
    assert abs(sum(result["kl_per_level"]) - result["kl"]) < 1e-4


def test_eval_reports_and_warns_about_a_collapsed_level(capsys):
    import torch

    from hvae.evaluate import evaluate
    from hvae.models import MHVAE

    torch.manual_seed(0)
    model = MHVAE((1, 4, 4), latent_dims=(3, 2), hidden=(8,), level_hidden=(8,))
    with torch.no_grad():  # make q(z_2 | z_1) equal to N(0, I): level 2 carries nothing about x
        for p in model.up[0].parameters():
            p.zero_()
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.5))
    result = evaluate(model, x, k=4, progress=False)
    assert result["collapsed_levels"] == [2] and result["kl_per_level"][1] < 1e-6


def _two_level_chain(level1_informative: bool, log_var: float = -4.0):
    """MHVAE with q(z_2 | z_1) = N(z_1, e^log_var I) and p(z_1 | z_2) = N(z_2, e^log_var I); q(z_1 | x) = N(0, I)
    for every x, or with a mean that moves with x."""
    torch.manual_seed(0)
    model = MHVAE((1, 4, 4), (3, 3), hidden=(8,), level_hidden=())
    with torch.no_grad():
        if level1_informative:
            model.head.linear.weight[:3] *= 10  # the means of q(z_1 | x) move with x
        else:
            model.head.linear.weight.zero_()
            model.head.linear.bias.zero_()
        for g in (model.up[0], model.down[0]):
            g.head.linear.weight.zero_()
            g.head.linear.bias.zero_()
            g.head.linear.weight[:3, :3] = torch.eye(3)
            g.head.linear.bias[3:] = log_var
    return model


def test_active_units_use_the_posterior_mean_over_the_other_levels_draws():
    """Burda's Cov_x(E_q[z_u]) for a level whose q depends on a sampled level: with z_2 = z_1 + noise and
    q(z_1 | x) = N(0, I) for every x, no unit of level 2 is informative (one draw of z_1 made all 3 look active);
    with an informative level 1 its units are, with the variance a 4000-draw average gives."""
    from hvae.editing import posterior_mean_variance
    from hvae.evaluate import evaluate

    x = torch.bernoulli(torch.full((400, 1, 4, 4), 0.5))
    blind = _two_level_chain(level1_informative=False)
    assert evaluate(blind, x, k=2, progress=False)["active_units_per_level"] == [0, 0]
    assert all((v.abs() < 0.01).all() for v in posterior_mean_variance(blind, x))

    seeing = _two_level_chain(level1_informative=True)
    variances = posterior_mean_variance(seeing, x)
    with torch.no_grad():
        reference = seeing.infer(x, 4000).levels[1].z.mean(0).double().var(0, unbiased=False)
    assert (reference > 0.05).all()
    torch.testing.assert_close(variances[1], reference, rtol=0.1, atol=0.005)
    assert evaluate(seeing, x, k=2, progress=False)["active_units_per_level"][1] == 3


def test_a_level_with_a_negative_sampled_rate_that_carries_information_is_not_called_collapsed():
    """MHVAE rates below the top are Monte Carlo log-ratios and may be negative: level 1 here has a mean rate far
    below 0.01 nats yet follows x, so it is judged by its active units, not its rate."""
    from hvae.evaluate import evaluate

    model = _two_level_chain(level1_informative=True, log_var=-10.0)
    result = evaluate(model, torch.bernoulli(torch.full((200, 1, 4, 4), 0.5)), k=2, progress=False)
    assert result["kl_per_level"][0] < -1 and result["active_units_per_level"][0] > 0
    assert result["collapsed_levels"] == []


@pytest.mark.parametrize("make", [lambda: MHVAE(SHAPE, (5, 4, 3), **SMALL), lambda: LadderVAE(SHAPE, (5, 4, 3), **SMALL)])
def test_per_level_temperatures_reach_their_own_level(make, monkeypatch):
    """Temperatures are listed level 1 (nearest x) first: with D = (5, 4, 3), the draw of the 3-wide top level
    must use the last temperature and the 5-wide level 1 the first (a reversed order passed the other tests)."""
    from hvae import distributions

    seen: dict[int, float] = {}
    real = distributions.DiagonalGaussian.rsample

    def spy(self, n_samples=None, temperature=1.0):
        seen[self.mean.shape[-1]] = temperature
        return real(self, n_samples, temperature)

    monkeypatch.setattr(distributions.DiagonalGaussian, "rsample", spy)
    model = make().eval()
    model.sample(2, [0.25, 0.5, 0.75])
    assert seen == {5: 0.25, 4: 0.5, 3: 0.75}


def test_hvae_eval_prints_the_collapse_warning(idx_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from hvae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(idx_dir.parent), "--model", "mhvae", "--levels", "2", "--epochs", "1",
                 "--set", "model.hidden=[32]", "--set", "model.level_hidden=[8]", "--set", "model.latent_dim=3",
                 "--set", "train.threads=1", "--batch-size", "32", "--no-progress", "--out", str(run)]) == 0
    weights_file = run / "checkpoints" / "last" / "model.safetensors"
    weights = load_file(weights_file)
    save_file({k: torch.zeros_like(v) if k.startswith("up.0.") else v for k, v in weights.items()}, weights_file)
    capsys.readouterr()
    assert main(["eval", str(run), "--k", "4", "--limit", "16", "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert 2 in json.loads(out)["collapsed_levels"]  # q(z_2 | z_1) = N(0, I): level 2 carries nothing
    assert "hvae eval: warning: level 2 has collapsed" in err and "free bits" in err
