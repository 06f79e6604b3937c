"""Latent editing: the interpolation math, attribute arithmetic, traversals, latent views, `hvae edit`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hvae import VAE
from hvae.cli import main
from hvae.config import ConfigError
from hvae.data import DataError
from hvae.editing import (apply_attribute, attribute_vector, class_arithmetic, encode_means, interpolate,
                          kl_per_dimension, lerp, manifold_grid, manifold_values, most_informative_dims,
                          posterior_mean_variance, principal_components, slerp, traverse, tsne_2d)
from hvae.objectives import level_rate


class IdentityModel(nn.Module):
    """encode(x) = x and decode(z).mean = z, so every edit can be checked in latent coordinates."""

    def __init__(self, dim: int):
        super().__init__()
        self.data_shape = (dim,)
        self.unused = nn.Parameter(torch.zeros(()))  # gives the model a device

    def encode(self, x):
        return x.flatten(1)

    def decode(self, z):
        return SimpleNamespace(mean=z)


def tiny_vae(latent_dim: int = 3) -> VAE:
    torch.manual_seed(0)
    return VAE(data_shape=(1, 4, 4), latent_dim=latent_dim, hidden=(8,)).eval()


def test_lerp_and_slerp_hit_both_endpoints():
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for f in (lerp, slerp):
        path = f(a, b, t)
        assert path.shape == (2, 5, 4)
        torch.testing.assert_close(path[0], a)
        torch.testing.assert_close(path[1], b)


def test_slerp_keeps_the_norm_and_moves_at_constant_angle():
    # Two vectors of equal norm r: the great-circle path stays on the sphere of radius r, in equal angle steps.
    a, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    r = 2.5
    a, b = r * a / a.norm(dim=-1, keepdim=True), r * b / b.norm(dim=-1, keepdim=True)
    steps = 11
    path = slerp(a, b, torch.linspace(0, 1, steps, dtype=torch.float64))  # [T, B, D]
    torch.testing.assert_close(path.norm(dim=-1), torch.full((steps, 3), r, dtype=torch.float64))
    omega = torch.acos((a * b).sum(-1) / r**2)
    cos_step = (path[1:] * path[:-1]).sum(-1) / r**2
    torch.testing.assert_close(torch.acos(cos_step.clamp(-1, 1)), (omega / (steps - 1)).expand(steps - 1, 3))
    # lerp cuts the chord: its midpoint is inside the sphere.
    assert (lerp(a, b, torch.tensor([0.5], dtype=torch.float64)).norm(dim=-1) < r).all()


def test_slerp_of_parallel_vectors_is_lerp():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.linspace(0, 1, 5)
    torch.testing.assert_close(slerp(a, 3 * a, t), lerp(a, 3 * a, t))


def test_interpolate_decodes_the_path_between_posterior_means():
    model = IdentityModel(4)
    xa, xb = torch.randn(2, 4), torch.randn(2, 4)
    images = interpolate(model, xa, xb, steps=6)
    assert images.shape == (2, 6, 4)
    torch.testing.assert_close(images[:, 0], xa)
    torch.testing.assert_close(images[:, -1], xb)
    torch.testing.assert_close(images[:, 2], xa + 0.4 * (xb - xa))


def test_attribute_vector_is_the_difference_of_class_means():
    model = IdentityModel(3)
    x = torch.randn(40, 3, dtype=torch.float64)
    labels = torch.arange(40) % 4
    v = attribute_vector(model, x, labels, to_class=2, from_class=1)
    torch.testing.assert_close(v, x[labels == 2].mean(0) - x[labels == 1].mean(0))
    # Adding v to every image of class 1 moves their mean latent exactly onto class 2's mean.
    edited = class_arithmetic(model, x, labels, from_class=1, to_class=2, n=100, scales=(0.0, 1.0))
    assert edited.shape == (10, 3, 3)  # 10 images of class 1; input, scale 0, scale 1
    torch.testing.assert_close(edited[:, 0], x[labels == 1])
    torch.testing.assert_close(edited[:, 1], x[labels == 1])
    torch.testing.assert_close(edited[:, 2].mean(0), x[labels == 2].mean(0))


def test_apply_attribute_decodes_the_shifted_posterior_mean_of_a_real_model():
    model = tiny_vae()
    x = torch.rand(5, 1, 4, 4)
    v = torch.tensor([0.5, -1.0, 2.0])
    out = apply_attribute(model, x, v, scales=(0.0, 0.5, 2.0))
    assert out.shape == (5, 3, 1, 4, 4)
    with torch.no_grad():
        z = model.encode(x)
        for j, s in enumerate((0.0, 0.5, 2.0)):
            torch.testing.assert_close(out[:, j], model.decode(z + s * v).mean)
    torch.testing.assert_close(out[:, 0], model.reconstruct(x).detach())


def test_arithmetic_refuses_missing_labels_and_absent_classes():
    model, x = IdentityModel(2), torch.randn(6, 2)
    with pytest.raises(DataError, match="labels"):
        attribute_vector(model, x, None, 0, 1)
    with pytest.raises(ConfigError, match=r"--to class 7 .*classes present: \[0, 1\]"):
        attribute_vector(model, x, torch.tensor([0, 1, 0, 1, 0, 1]), 7, 1)


def test_traverse_sets_one_dimension_per_row():
    model = IdentityModel(4)
    z = torch.tensor([0.1, 0.2, 0.3, 0.4])
    values = torch.linspace(-3, 3, 7)
    out = traverse(model, z, [2, 0], values)
    assert out.shape == (2, 7, 4)
    torch.testing.assert_close(out[0, :, 2], values)
    torch.testing.assert_close(out[1, :, 0], values)
    torch.testing.assert_close(out[0, :, [0, 1, 3]], z[[0, 1, 3]].expand(7, 3))
    with pytest.raises(ConfigError, match="latent dimension 4 is out of range; this model has 4"):
        traverse(model, z, [4], values)


def test_traverse_grid_shape_on_a_vae():
    model = tiny_vae(latent_dim=5)
    out = traverse(model, encode_means(model, torch.rand(1, 1, 4, 4))[0], [0, 3, 4], torch.linspace(-2, 2, 9))
    assert out.shape == (3, 9, 1, 4, 4)
    assert ((out >= 0) & (out <= 1)).all()  # Bernoulli means


def test_kl_per_dimension_sums_to_the_level_rate():
    model = tiny_vae(latent_dim=4)
    x = torch.bernoulli(torch.rand(30, 1, 4, 4))
    per_dim = kl_per_dimension(model, x, batch_size=7)
    assert len(per_dim) == 1 and per_dim[0].shape == (4,)
    assert (per_dim[0] >= 0).all()
    with torch.no_grad():
        rate = level_rate(model.infer(x, 1).levels[0]).mean()  # closed form: no sampling noise
    torch.testing.assert_close(per_dim[0].sum(), rate, rtol=1e-5, atol=1e-6)
    assert most_informative_dims(model, x, 2) == torch.argsort(per_dim[0], descending=True)[:2].tolist()


def test_posterior_mean_variance_is_the_variance_over_images():
    model = tiny_vae(latent_dim=3)
    x = torch.rand(25, 1, 4, 4)
    var = posterior_mean_variance(model, x, batch_size=10)[0]
    expected = encode_means(model, x).double().var(0, unbiased=False)
    torch.testing.assert_close(var, expected)


def test_principal_components_find_the_direction_of_spread():
    rng = np.random.default_rng(0)
    direction = np.array([3.0, 4.0, 0.0]) / 5
    z = rng.normal(size=(200, 1)) * 10 * direction + rng.normal(size=(200, 3)) * 0.01 + 7
    proj, ratio = principal_components(z, 2)
    assert proj.shape == (200, 2) and ratio[0] > 0.999
    np.testing.assert_allclose(np.abs(proj[:, 0]), np.abs((z - z.mean(0)) @ direction), atol=0.05)
    np.testing.assert_allclose(proj.mean(0), 0, atol=1e-9)
    one_d, ratio = principal_components(z[:, :1], 2)  # fewer dimensions than components: zeros
    assert (one_d[:, 1] == 0).all() and ratio[1] == 0


def test_tsne_without_scikit_learn_says_how_to_get_it():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="scikit-learn"):
            tsne_2d(np.zeros((10, 3)))
    else:
        assert tsne_2d(np.random.default_rng(0).normal(size=(20, 3))).shape == (20, 2)


def test_manifold_grid_lays_z1_along_columns_and_z2_up_the_rows():
    model = IdentityModel(2)
    v = manifold_values(5, 0.9)
    torch.testing.assert_close(v[2], torch.tensor(0.0))
    torch.testing.assert_close(v[-1], torch.tensor(1.2815516), rtol=0, atol=1e-5)  # Phi^-1(0.9)
    out = manifold_grid(model, (2,), n=5, quantile=0.9)
    assert out.shape == (5, 5, 2)
    torch.testing.assert_close(out[0, :, 0], v)  # z_1 rises left to right
    torch.testing.assert_close(out[:, 0, 1], v.flip(0))  # z_2 falls top to bottom
    with pytest.raises(ConfigError, match="2-d latent"):
        manifold_grid(model, (3,), n=5)


TINY = ["--set", "model.hidden=[32]", "--set", "model.latent_dim=3", "--batch-size", "32", "--no-progress"]


def test_edit_commands_write_grids_and_reject_bad_input(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(idx_dir.parent), "--epochs", "1", "--out", str(run), *TINY]) == 0
    cases = {"interpolate": (["--a", "2", "--b", "5", "--steps", "6"], (2, 8)),  # linear + spherical rows
             "arithmetic": (["--from", "1", "--to", "2", "--n", "3", "--scales", "0,1"], (3, 3)),
             "traverse": (["--index", "4", "--dims", "2,0", "--steps", "5"], (2, 5))}
    for action, (flags, (n_rows, n_cols)) in cases.items():
        out = tmp_path / f"{action}.png"
        assert main(["edit", action, str(run), "--out", str(out), *flags]) == 0, action
        with Image.open(out) as img:  # 28-pixel tiles, 2-pixel frame, drawn twice as large
            assert img.size == (2 * (n_cols * 30 + 2), 2 * (n_rows * 30 + 2)), action
    assert main(["edit", "traverse", str(run), "--out", str(tmp_path / "t.png")]) == 0  # default: top-KL dims
    capsys.readouterr()
    for flags, message in ((["arithmetic", "--from", "1", "--to", "9"], "--to class 9"),
                           (["traverse", "--dims", "3"], "latent dimension 3 is out of range"),
                           (["interpolate", "--b", "64"], "--b 64 is out of range")):
        assert main(["edit", flags[0], str(run), *flags[1:]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_edit_arithmetic_needs_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "nolabels.npz"
    np.savez(data, x_train=rng.integers(0, 255, (64, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 255, (16, 8, 8), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--epochs", "1", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["edit", "arithmetic", str(run), "--from", "0", "--to", "1"]) == 2
    assert "needs class labels" in capsys.readouterr().err


@pytest.mark.parametrize("eps", [1e-2, 1e-4, 1e-6])
def test_slerp_stays_on_the_circle_next_to_antipodal_endpoints(eps):
    """The angle comes from atan2, not acos of a clamped cosine (which pulled such paths towards the origin)."""
    import math

    from hvae.editing import slerp

    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[math.cos(math.pi - eps), math.sin(math.pi - eps)]], dtype=torch.float64)
    path = slerp(a, b, torch.linspace(0, 1, 9, dtype=torch.float64))
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(9, 1, dtype=torch.float64), rtol=0, atol=1e-9)


def test_slerp_is_lerp_for_exactly_parallel_or_antipodal_endpoints():
    from hvae.editing import lerp, slerp

    a = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.linspace(0, 1, 5)
    for b in (2 * a, -a):
        torch.testing.assert_close(slerp(a, b, t), lerp(a, b, t))


def test_float64_models_sample_and_draw_their_manifold():
    from hvae.editing import manifold_grid
    from hvae.models import MHVAE, LadderVAE

    for model in (MHVAE((1, 4, 4), (3, 2), hidden=(8,)).double(), LadderVAE((1, 4, 4), (3, 2), hidden=(8,)).double()):
        assert model.sample(2).dtype == torch.float64
        assert model.resample_lower(torch.zeros(2, 1, 4, 4, dtype=torch.float64), keep=0).dtype == torch.float64
    assert manifold_grid(VAE((1, 4, 4), 2, hidden=[8]).double(), n=3).dtype == torch.float64


def test_image_grid_clips_values_outside_the_unit_range_instead_of_wrapping():
    from hvae.visualize import grid

    pixels = grid(torch.tensor([1.2, -0.1, 0.5, float("nan")]).reshape(4, 1, 1, 1), nrow=4, pad=0).flatten()
    assert pixels.tolist() == [255, 0, 128, 0]


def test_temperatures_accept_numpy_and_tensor_scalars_and_refuse_non_finite():
    from hvae.models.levels import per_level

    assert per_level(np.float32(0.5), 2) == [0.5, 0.5] and per_level(torch.tensor(0.25), 1) == [0.25]
    for bad in (float("nan"), float("inf"), [1.0, -1.0]):
        with pytest.raises(ValueError, match="finite and >= 0"):
            per_level(bad, 2)


def test_a_flat_vae_without_hidden_layers_reads_the_pixels_directly():
    model = VAE((1, 4, 4), 2, hidden=[])
    assert model.infer(torch.zeros(3, 1, 4, 4), 1).z1.shape == (1, 3, 2)
    assert model.sample(2).shape == (2, 1, 4, 4)
