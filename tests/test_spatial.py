"""The ladder's spatial form (models/spatial.py) and its cells (cells.py), checked on the math and the contracts.

- Each level's z is a feature map at its stage's resolution; the protocol's shapes and identities hold.
- The closed-form KL per level equals the sampled log-ratio in expectation (q and p condition on the same z above).
- The residual posterior is relative to the prior; temperatures, resample_lower and the config behave as the ladder's.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hvae.cells import CELLS, Cell, SqueezeExcite, norm2d
from hvae.config import Config, apply
from hvae.models import LadderConfig, build_model
from hvae.models.ladder import POSTERIORS
from hvae.models.spatial import SpatialLadder
from hvae.objectives import elbo, iw_bound, log_importance_weights, log_weights_of_trace
from hvae.protocol import LatentVariableModel

SHAPE = (1, 8, 8)  # stage 1 at 4x4, stage 2 at 2x2


def binary(b: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.full((b, *SHAPE), 0.4), generator=torch.Generator().manual_seed(seed))


def small(**kw) -> SpatialLadder:
    """Three levels: level 1 (3 channels) at 4x4; levels 2 (2) and 3 (4, the top) at 2x2."""
    kw = {"groups": (1, 2), "channels": (8, 16), "latent_dims": (3, 2, 4), **kw}
    return SpatialLadder(SHAPE, **kw)


def perturbed(model: SpatialLadder, scale: float = 0.3) -> SpatialLadder:
    """Every weight moved off its initialization, so that priors and posteriors differ at every level."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("posterior", POSTERIORS)
@pytest.mark.parametrize("cell", CELLS)
def test_levels_are_feature_maps_at_their_stage_and_keep_the_protocol_shapes(posterior, cell):
    model = small(posterior=posterior, cell=cell, se=True, norm="batch")
    b, s = 3, 2
    assert isinstance(model, LatentVariableModel)
    trace = model.infer(binary(b), s)
    assert [tuple(lvl.z.shape) for lvl in trace.levels] == [(s, b, 3, 4, 4), (s, b, 2, 2, 2), (s, b, 4, 2, 2)]
    assert model.latent_dims == (48, 8, 16) and model.n_levels == 3
    assert trace.levels[-1].p.is_standard  # p(z_T) = N(0, I)
    assert tuple(model.decode(trace.z1).log_prob(binary(b)).shape) == (s, b)
    terms = elbo(model, binary(b), s)
    assert terms.elbo.shape == (b,) and terms.kl_per_level.shape == (3, b)
    torch.testing.assert_close(terms.elbo, terms.reconstruction - terms.kl)
    assert log_importance_weights(model, binary(b), 7, chunk_size=3).shape == (7, b)
    assert model.sample(b).shape == (b, *SHAPE) and model.reconstruct(binary(b)).shape == (b, *SHAPE)


def with_vector_top() -> SpatialLadder:
    """small() with a vector top of 5 values above its groups: 4 levels, level 3 (the 2x2 top group) no longer N(0, I)."""
    return small(latent_dims=(3, 2, 4, 5), vector_top=True)


@pytest.mark.parametrize("posterior", [*POSTERIORS, "residual+vector_top"])
def test_closed_form_kl_per_level_is_the_sampled_log_ratio_in_expectation(posterior):
    """E_q[log q(z_t | .) - log p(z_t | .)] = KL_t: valid only because both condition on the same z_{>t}."""
    model = perturbed(with_vector_top() if "+" in posterior else small(posterior=posterior)).double().eval()
    x = binary(2).double()
    n = 4000
    trace = model.infer(x, n)
    analytic = torch.stack([lvl.q.kl(lvl.p).mean(0) if lvl.q.kl(lvl.p).dim() == 2 else lvl.q.kl(lvl.p)
                            for lvl in trace.levels])  # [T, B]
    ratio = torch.stack([lvl.q.log_prob(lvl.z) - lvl.p.log_prob(lvl.z) for lvl in trace.levels])  # [T, S, B]
    mean, se = ratio.mean(1), ratio.std(1) / math.sqrt(n)
    assert (analytic > 0.1).all()  # the levels carry information, so the check is not 0 = 0
    assert ((mean - analytic).abs() < 4 * se + 1e-9).all(), (mean, analytic, se)


@pytest.mark.parametrize("vector_top", [False, True])
def test_log_weights_are_the_reconstruction_minus_the_sampled_rates_and_k1_is_the_elbo(vector_top):
    model = perturbed(with_vector_top() if vector_top else small()).double().eval()
    x = binary(4).double()
    torch.manual_seed(5)
    trace = model.infer(x, 3)
    log_w = log_weights_of_trace(model, x, trace)
    by_hand = model.decode(trace.z1).log_prob(x)
    for lvl in trace.levels:
        by_hand = by_hand + lvl.p.log_prob(lvl.z) - lvl.q.log_prob(lvl.z)
    torch.testing.assert_close(log_w, by_hand)
    torch.manual_seed(6)
    one = iw_bound(log_importance_weights(model, x, 1))
    torch.manual_seed(6)
    torch.testing.assert_close(one, elbo(model, x, 1, analytic_kl=False).elbo)


def test_residual_posterior_is_the_prior_shifted_by_the_posterior_net():
    """q = N(mu_p + dmu, var_p e^dlv): with the posterior convs at zero, q equals p at every level below the top."""
    model = perturbed(small(posterior="residual")).eval()
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.post.weight.zero_()
            block.post.bias.zero_()
    trace = model.infer(binary(3), 2)
    for lvl in trace.levels[:-1]:
        torch.testing.assert_close(lvl.q.mean, lvl.p.mean)
        torch.testing.assert_close(lvl.q.log_var, lvl.p.log_var)
        assert lvl.q.kl(lvl.p).abs().max() < 1e-5
    assert trace.levels[-1].q.kl(trace.levels[-1].p).min() > 0  # the top's q depends on x


def test_temperatures_and_resample_lower_behave_as_the_ladders():
    model, x = perturbed(small()).eval(), binary(4)
    torch.manual_seed(0)
    a = model.sample(4, 0.0)
    torch.testing.assert_close(a, a[0].expand_as(a))  # every draw the same image
    torch.manual_seed(2)
    assert not torch.equal(a, model.sample(4, [0.0, 0.0, 1.0]))  # only the top varies, and it reaches x
    torch.testing.assert_close(model.resample_lower(x, 3), model.reconstruct(x))  # keep all: reconstruction
    torch.testing.assert_close(model.resample_lower(x, 0, 0.0), a)  # keep none: a sample
    kept = model.resample_lower(x, 1, 0.0)
    assert not torch.allclose(kept, a, atol=1e-4)  # ... and keeping z_T makes it depend on x
    with pytest.raises(ValueError, match="one per level"):
        model.sample(2, [1.0, 1.0])


def test_a_stage_without_groups_is_passed_through_one_level_is_the_conv_flat_vae():
    """groups (0, 1): one level at the coarsest stage, the state upsampled through stage 1 to the likelihood; its
    rate is the closed-form KL(q(z | x) || N(0, I)), as the flat VAE's."""
    model = perturbed(SpatialLadder(SHAPE, groups=(0, 1), channels=(8, 16), latent_dims=(4,))).eval()
    x = binary(3)
    trace = model.infer(x, 2)
    assert [tuple(lvl.z.shape) for lvl in trace.levels] == [(2, 3, 4, 2, 2)] and trace.levels[0].p.is_standard
    q = trace.levels[0].q
    by_hand = 0.5 * (q.mean**2 + q.log_var.exp() - 1 - q.log_var).sum((2, 3, 4))
    torch.testing.assert_close(elbo(model, x, 2).kl_per_level[0], by_hand.mean(0))
    assert tuple(trace.z1.shape) == (2, 3, 8, 4, 4) and model.sample(2).shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="coarsest"):
        SpatialLadder(SHAPE, groups=(1, 0), channels=(8, 16))


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_cells_keep_the_shape_and_start_near_the_identity(kind, norm):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 6, 6)
    cell = Cell(16, kind, "silu", norm, se=True)
    y = cell(x)
    assert y.shape == x.shape
    change = (y - x).norm() / x.norm()
    assert 0 < change < 0.5  # the branch acts, and starts small


def test_squeeze_excitation_gates_each_channel_by_its_own_mean():
    torch.manual_seed(0)
    se = SqueezeExcite(16)
    x = torch.randn(2, 16, 5, 5)
    gate = se(x) / x  # [2, 16, 5, 5]: constant over each map, in (0, 1)
    torch.testing.assert_close(gate, gate[:, :, :1, :1].expand_as(gate))
    assert (gate > 0).all() and (gate < 1).all()
    shifted = x.clone()
    shifted[1] = shifted[1] + 1  # another example's maps change only its own gates
    torch.testing.assert_close(se(shifted)[0], se(x)[0])
    with pytest.raises(ValueError, match="norm"):
        norm2d("group", 4)


def test_config_builds_the_spatial_ladder_and_refuses_what_cannot_work():
    cfg = LadderConfig(arch="spatial", levels=3, groups=[1, 2], conv_channels=[8, 16], latent_dim=3, cells=2,
                       cell="separable", se=True)
    cfg.check()
    model = build_model(cfg, SHAPE)
    assert isinstance(model, SpatialLadder) and model.dims == (3, 3, 3) and model.groups == (1, 2)
    with pytest.raises(ValueError, match="groups"):
        apply(Config(), {"model.name": "ladder", "model.arch": "spatial", "model.levels": 2, "model.groups": [1, 2]})
    with pytest.raises(ValueError, match="conv_channels"):
        apply(Config(), {"model.name": "ladder", "model.arch": "spatial", "model.levels": 2, "model.groups": [2],
                         "model.conv_channels": [8, 16]})
    with pytest.raises(ValueError, match="arch spatial"):
        apply(Config(), {"model.name": "ladder", "model.groups": [2]})
    with pytest.raises(ValueError, match="skip"):
        apply(Config(), {"model.name": "ladder", "model.arch": "spatial", "model.levels": 2, "model.groups": [2],
                         "model.conv_channels": [8], "model.skip": True})
    with pytest.raises(ValueError, match="divisible by 4"):
        SpatialLadder((1, 6, 6), groups=(1, 1), channels=(4, 4))
    with pytest.raises(ValueError, match="image data"):
        SpatialLadder((36,), groups=(1,), channels=(4,))


@pytest.mark.parametrize("top", [[], ["--set", "model.vector_top=true", "--set", "model.levels=4"]])
def test_spatial_ladder_trains_and_evaluates_through_the_cli(idx_dir, tmp_path, capsys, top):
    from hvae.cli import main

    run = tmp_path / "run"
    args = ["--model", "ladder", "--set", "model.arch=spatial", "--set", "model.levels=3", "--set",
            "model.groups=[1, 2]", "--set", "model.conv_channels=[8, 16]", "--set", "model.latent_dim=2", "--set",
            "model.cell=bottleneck", "--set", "model.se=true", "--set", "model.norm=batch", "--batch-size", "32",
            "--no-progress", *top]
    assert main(["train", "--data-dir", str(idx_dir.parent), "--epochs", "2", "--out", str(run), *args]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_elbo"] > lines[0]["train_elbo"]  # it learned
    capsys.readouterr()
    assert main(["eval", str(run), "--k", "10", "--limit", "16", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    levels = 4 if top else 3
    assert len(result["kl_per_level"]) == levels and len(result["active_units_per_level"]) == levels
    assert abs(sum(result["kl_per_level"]) - result["kl"]) < 1e-4
    assert main(["sample", str(run), "--n", "4", "--no-progress"]) == 0


def test_the_discretized_logistic_likelihood_for_8_bit_images():
    """likelihood logistic (8-bit data): two outputs per pixel, loc and scale at the data's shape, from the final
    state; log p(x | z) finite and below 0 (a discrete distribution; its normalization: test_likelihoods.py)."""
    model = perturbed(small(likelihood="logistic"))
    x = torch.randint(0, 256, (2, *SHAPE)).float() / 127.5 - 1.0
    lik = model.decode(model.infer(x, 3).z1)
    assert tuple(lik.loc.shape) == tuple(lik.log_scale.shape) == (3, 2, *SHAPE)
    log_p = lik.log_prob(x)
    assert tuple(log_p.shape) == (3, 2) and torch.isfinite(log_p).all() and (log_p < 0).all()


def test_a_vector_top_is_one_more_level_above_the_groups_and_reaches_every_level_below():
    """vector_top: level T = 4 is a vector z_4 [S, B, 5] with p = N(0, I); the top group (level 3) gets a conv prior
    that depends on z_4; temperatures, sampling, resample_lower and the config take the extra level."""
    model = perturbed(with_vector_top()).eval()
    b, s = 3, 2
    trace = model.infer(binary(b), s)
    assert [tuple(lvl.z.shape) for lvl in trace.levels] == [(s, b, 3, 4, 4), (s, b, 2, 2, 2), (s, b, 4, 2, 2), (s, b, 5)]
    assert model.latent_dims == (48, 8, 16, 5) and model.n_levels == 4
    assert trace.levels[-1].p.is_standard and not trace.levels[-2].p.is_standard
    p3 = trace.levels[-2].p.mean  # [S, B, 4, 2, 2]: the two samples of z_4 give two priors for level 3
    assert not torch.allclose(p3[0], p3[1])
    terms = elbo(model, binary(b), s)
    assert terms.kl_per_level.shape == (4, b) and (terms.kl_per_level > 0).all()
    torch.manual_seed(0)
    only_top = model.sample(4, [0.0, 0.0, 0.0, 1.0])
    assert not torch.allclose(only_top[0], only_top[1])  # z_4 alone varies the images
    torch.testing.assert_close(model.resample_lower(binary(b), 4), model.reconstruct(binary(b)))
    cfg = LadderConfig(arch="spatial", levels=3, groups=[0, 2], conv_channels=[8, 16], vector_top=True)
    cfg.check()
    assert build_model(cfg, SHAPE).latent_dims == (32 * 4, 32 * 4, 32)
    with pytest.raises(ValueError, match="vector_top"):
        apply(Config(), {"model.name": "ladder", "model.arch": "spatial", "model.levels": 2, "model.groups": [0, 2],
                         "model.conv_channels": [8, 16], "model.vector_top": True})
    with pytest.raises(ValueError, match="vector_top"):
        apply(Config(), {"model.name": "ladder", "model.vector_top": True})


def test_decoder_cells_follow_each_upsampling_even_where_a_stage_has_no_groups():
    """decoder_cells = 2: two cells after the 2x2 -> 4x4 upsampling (stage 1 has no groups in (0, 1)); shapes and the
    bound as without them, and zeroing the cells' residual branches gives back the model without them."""
    plain = perturbed(small(groups=(0, 1), latent_dims=(3,)))
    deep = small(groups=(0, 1), latent_dims=(3,), decoder_cells=2)
    assert len(deep.up[0]) == 3 and len(deep.up[0][2]) == 2 and len(plain.up[0]) == 2
    missing, unexpected = deep.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("up.0.2.") for k in missing)
    x = binary(3)
    torch.manual_seed(1)
    a = plain.infer(x, 2)
    torch.manual_seed(1)
    b = deep.infer(x, 2)
    assert b.z1.shape == a.z1.shape and not torch.allclose(b.z1, a.z1)  # the cells act
    with torch.no_grad():
        for cell in deep.up[0][2]:
            for p in cell.parameters():
                p.zero_()
    torch.manual_seed(1)
    torch.testing.assert_close(deep.infer(x, 2).z1, a.z1)  # residual cells with a zero branch: the identity
    cfg = LadderConfig(arch="spatial", levels=1, groups=[0, 1], conv_channels=[8, 16], decoder_cells=1)
    cfg.check()
    assert len(build_model(cfg, SHAPE).up[0]) == 3
    with pytest.raises(ValueError, match="decoder_cells"):
        apply(Config(), {"model.name": "ladder", "model.decoder_cells": 1})
