"""evaluate() by capability: explicit levels (ELBO terms, IW bound, active units) and a stochastic bound (mean over
passes with its standard error), checked against a toy bound whose expectation and noise are known exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from hvae.evaluate import (EXPLICIT_LEVELS, STOCHASTIC_BOUND, capabilities, evaluate, evaluate_levels,
                           evaluate_stochastic_bound)
from hvae.models import VAE
from hvae.objectives import elbo
from hvae.protocol import BoundTerms, LatentVariableModel, StochasticBoundModel

SHAPE = (1, 4, 4)
TODAY_KEYS = ["elbo", "reconstruction", "kl", "iw_nll", "k", "n_images", "bits_per_dim", "active_units",
              "kl_per_level", "active_units_per_level", "collapsed_levels", "seconds"]
BOUND_KEYS = ["elbo", "elbo_se", "passes", "draws", "reconstruction", "kl", "prior_kl", "diffusion", "n_images",
              "bits_per_dim", "seconds"]


class NoisyGaussianBound(nn.Module):
    """x ~ N(0, s^2 I) in D dims, so log p(x) is exact. Each call draws, per example, a bound with a known gap and
    zero-mean noise of known sd: elbo = log p(x) - gap + sd * eps, eps ~ N(0, 1), split VDM-style into
    reconstruction = log p(x), prior_kl = gap / 2, diffusion = gap / 2 - sd * eps."""

    def __init__(self, s: float = 1.5, gap: float = 2.0, sd: float = 3.0):
        super().__init__()
        self.data_shape, self.s, self.gap, self.sd = SHAPE, s, gap, sd

    def log_px(self, x: Tensor) -> Tensor:
        """log N(x; 0, s^2 I), summed over the data dims: [B]."""
        return torch.distributions.Normal(0.0, self.s).log_prob(x.double()).flatten(1).sum(1)

    def stochastic_bound(self, x: Tensor) -> BoundTerms:
        rec, eps = self.log_px(x), torch.randn(len(x), dtype=torch.float64)
        prior_kl, diffusion = torch.full_like(rec, self.gap / 2), self.gap / 2 - self.sd * eps
        kl = prior_kl + diffusion
        return BoundTerms(rec, kl, rec - kl, {"prior_kl": prior_kl, "diffusion": diffusion})


class VAEWithBound(VAE):
    """Both capabilities: the VAE's levels, and its one-sample ELBO offered as a stochastic bound."""

    def stochastic_bound(self, x: Tensor) -> BoundTerms:
        terms = elbo(self, x)
        return BoundTerms(terms.reconstruction, terms.kl, terms.elbo,
                          {"prior_kl": terms.kl, "diffusion": torch.zeros_like(terms.kl)})


@pytest.fixture
def gaussian_data() -> tuple[NoisyGaussianBound, Tensor]:
    model = NoisyGaussianBound()
    return model, model.s * torch.randn(50, *SHAPE, generator=torch.Generator().manual_seed(1))


def _small_vae(cls=VAE) -> VAE:
    torch.manual_seed(0)
    return cls(SHAPE, latent_dim=3, hidden=(16,))


def _binary(n: int) -> Tensor:
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4), generator=torch.Generator().manual_seed(2))


def test_capabilities_follow_the_protocols(gaussian_data):
    bound, _ = gaussian_data
    assert isinstance(bound, StochasticBoundModel) and not isinstance(bound, LatentVariableModel)
    assert capabilities(bound) == {STOCHASTIC_BOUND}
    assert capabilities(_small_vae()) == {EXPLICIT_LEVELS}
    assert capabilities(_small_vae(VAEWithBound)) == {EXPLICIT_LEVELS, STOCHASTIC_BOUND}


def test_stochastic_bound_mean_and_standard_error_match_the_truth(gaussian_data):
    # Pass mean m_r = truth + sd * mean of N eps: E[elbo] = mean log p(x) - gap, and sd(m_r) = sd / sqrt(N).
    model, x = gaussian_data
    passes, n = 400, len(x)
    result = evaluate(model, x, passes=passes, batch_size=16, progress=False)
    truth, true_se = model.log_px(x).mean().item() - model.gap, model.sd / math.sqrt(n * passes)
    assert abs(result["elbo"] - truth) < 5 * true_se
    # the sample sd over R pass means has relative standard error 1 / sqrt(2 (R - 1))
    assert abs(result["elbo_se"] / true_se - 1) < 5 / math.sqrt(2 * (passes - 1))
    assert result["reconstruction"] == pytest.approx(model.log_px(x).mean().item(), abs=1e-12)
    assert result["prior_kl"] == pytest.approx(model.gap / 2, abs=1e-12)
    assert abs(result["diffusion"] - model.gap / 2) < 5 * true_se
    assert result["kl"] == pytest.approx(result["prior_kl"] + result["diffusion"], abs=1e-12)
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"], abs=1e-12)


@pytest.mark.parametrize("passes", [50, 200, 800])
def test_stochastic_bound_standard_error_shrinks_like_one_over_sqrt_passes(gaussian_data, passes):
    # elbo_se * sqrt(R) estimates sd(m_r) = sd / sqrt(N) whatever R: so elbo_se falls as 1 / sqrt(R).
    model, x = gaussian_data
    result = evaluate_stochastic_bound(model, x, passes=passes, progress=False)
    assert abs(result["elbo_se"] * math.sqrt(passes) / (model.sd / math.sqrt(len(x))) - 1) \
        < 5 / math.sqrt(2 * (passes - 1))


def test_stochastic_bound_keys_units_and_seed(gaussian_data):
    model, x = gaussian_data
    result = evaluate(model, x, passes=3, progress=False, seed=7)
    assert list(result) == BOUND_KEYS and "iw_nll" not in result
    assert result["passes"] == 3 and result["n_images"] == len(x)
    assert result["bits_per_dim"] == -result["elbo"] / (math.prod(SHAPE) * math.log(2))  # no +8
    again = evaluate(model, x, passes=3, progress=False, seed=7)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}


def test_todays_models_keep_todays_keys():
    result = evaluate(_small_vae(), _binary(30), k=5, progress=False)
    assert list(result) == TODAY_KEYS
    assert result["bits_per_dim"] == result["iw_nll"] / (math.prod(SHAPE) * math.log(2))


def test_a_model_with_both_capabilities_gets_both_sets_of_keys():
    # Each family seeds the RNG itself, so the merged figures equal each family's alone (see evaluate's clash rule).
    model, x = _small_vae(VAEWithBound), _binary(30)
    both = evaluate(model, x, k=5, passes=4, progress=False)
    levels = evaluate_levels(model, x, k=5, progress=False)
    bound = evaluate_stochastic_bound(model, x, passes=4, progress=False)
    assert set(both) == set(TODAY_KEYS) | set(BOUND_KEYS)
    for key in ("iw_nll", "k", "bits_per_dim", "active_units", "kl_per_level", "active_units_per_level",
                "collapsed_levels"):
        assert both[key] == levels[key]
    for key in ("elbo", "elbo_se", "passes", "reconstruction", "kl", "prior_kl", "diffusion"):
        assert both[key] == bound[key]


def test_a_model_may_narrow_its_capabilities_but_not_claim_missing_ones():
    model, x = _small_vae(VAEWithBound), _binary(10)
    model.eval_capabilities = {STOCHASTIC_BOUND}
    assert list(evaluate(model, x, k=5, passes=2, progress=False)) == BOUND_KEYS
    plain = _small_vae()
    plain.eval_capabilities = {STOCHASTIC_BOUND}
    with pytest.raises(TypeError, match="claims"):
        capabilities(plain)
    with pytest.raises(TypeError, match="nothing to evaluate"):
        evaluate(nn.Linear(2, 2), x, progress=False)


@pytest.mark.parametrize("kwargs, message", [(dict(k=0), "k must be >= 1; got 0"),
                                             (dict(passes=1), "passes must be >= 2"),
                                             (dict(batch_size=0), "batch_size must be >= 1; got 0")])
def test_bad_arguments_are_named_as_arguments(gaussian_data, kwargs, message):
    model, x = gaussian_data
    with pytest.raises(ValueError, match=message) as error:
        evaluate(model, x, progress=False, **kwargs)
    assert "--" not in str(error.value)


class _BadBound(NoisyGaussianBound):
    def __init__(self, extra_name: str = "prior_kl", shape_slip: bool = False):
        super().__init__()
        self.extra_name, self.shape_slip = extra_name, shape_slip

    def stochastic_bound(self, x: Tensor) -> BoundTerms:
        t = super().stochastic_bound(x)
        kl = t.kl[:, None] if self.shape_slip else t.kl
        return BoundTerms(t.reconstruction, kl, t.elbo, {self.extra_name: t.extra["prior_kl"]})


@pytest.mark.parametrize("model, message", [(_BadBound(extra_name="elbo_se"), "may not be named"),
                                            (_BadBound(shape_slip=True), r"kl must be per example")])
def test_a_malformed_bound_is_refused(gaussian_data, model, message):
    with pytest.raises(ValueError, match=message):
        evaluate(model, gaussian_data[1], passes=2, progress=False)


def test_row_floats_is_the_widest_module_output_per_row_and_bounds_the_chunk():
    """An MLP's widest tensor is its output (the image's size, so its chunk is as before); a convolutional model's is
    a feature map, whose size then sets the importance samples per call. The probe leaves weights and RNG alone."""
    from hvae.evaluate import TENSOR_BYTES, chunk_for, row_floats
    from hvae.models.spatial import SpatialLadder

    vae, x = _small_vae(), _binary(5)
    assert row_floats(vae, x) == math.prod(SHAPE)  # its hidden layer (16) is no wider than the image (16)
    torch.manual_seed(0)
    conv = SpatialLadder((1, 28, 28), channels=(6, 10), groups=(1, 1), latent_dims=(2, 3))
    xc = torch.bernoulli(torch.full((5, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    before, rng = {k: v.clone() for k, v in conv.state_dict().items()}, torch.get_rng_state()
    widest = row_floats(conv, xc)
    assert widest >= 6 * 14 * 14  # stage 1's 6 maps at 14 x 14
    assert widest <= 2 * 6 * 28 * 28  # at most two maps' worth at the input's resolution
    assert chunk_for(1000, 100, widest) == max(1, TENSOR_BYTES // (4 * widest * 100))
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
