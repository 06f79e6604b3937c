"""Sample-quality metrics (quality.py), their feature network (features.py) and `hvae eval --fid`.

The metrics are checked against closed forms and known orderings; the feature network for determinism, its
cache (damage, location) and that it never reaches the network; the CLI for its keys, records and report."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
from conftest import make_idx_dir

from hvae import features, quality
from hvae.cli import main
from hvae.data import load_idx_dataset


def exact_moments(n: int, mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """n rows whose sample mean is exactly `mean` and sample covariance exactly diag(std^2): [n, D] float64.
    (Standard normal draws, centred and whitened to identity sample covariance, then scaled and shifted.)"""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    cov = z.T @ z / (n - 1)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(cov)).T  # sample covariance -> I
    return z * std + mean


def test_frechet_distance_matches_the_closed_form_for_gaussian_feature_sets():
    # With diagonal covariances the matrices commute: FD = ||m1 - m2||^2 + sum (s1 - s2)^2 (s: the std devs).
    d = 12
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = 0.5 + torch.rand(d, generator=g, dtype=torch.float64), 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    a, b = exact_moments(500, m1, s1, 0), exact_moments(700, m2, s2, 1)
    expected = float((m1 - m2).square().sum() + (s1 - s2).square().sum())
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert quality.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)  # symmetric
    assert abs(quality.frechet_distance(a, a)) < 1e-9  # a set to itself: 0


def test_kid_is_unbiased_on_disjoint_halves_and_positive_for_another_distribution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    value, se = quality.kid(x[:2000], x[2000:])  # two samples of one distribution
    assert se > 0 and abs(value) < 3 * se
    shifted, se2 = quality.kid(x[:2000], x[2000:] + 0.3)
    assert shifted > 10 * se2
    # A set made row by row from the real one (as reconstructions are from the test images) is not scored against
    # its own sources: near-copies of the real rows give a KID near 0, not far below it.
    copies, se3 = quality.kid(x[:2000], x[:2000] + 0.01 * torch.randn(2000, 16, generator=g, dtype=torch.float64))
    assert abs(copies) < 3 * se3


def clusters(n: int, modes: list[int], seed: int) -> torch.Tensor:
    """n points spread evenly over the given modes of a 4-mode mixture in 8-d (modes 4 apart, std 0.3)."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.eye(8, dtype=torch.float64)[:4]
    which = torch.tensor(modes)[torch.arange(n) % len(modes)]
    return centres[which] + 0.3 * torch.randn(n, 8, generator=g, dtype=torch.float64)


def test_precision_and_recall_are_one_on_itself_and_dropped_modes_lower_recall_only():
    real = clusters(2000, [0, 1, 2, 3], 0)
    assert quality.precision_recall(real, real) == (1.0, 1.0)
    # Fresh draws of all modes: both high (not 1: a k = 3 ball misses some of a new sample's tail).
    full_p, full_r = quality.precision_recall(real, clusters(2000, [0, 1, 2, 3], 2))
    assert full_p > 0.8 and full_r > 0.8
    # Samples of only some modes: precision as before, recall falls with the share of modes kept.
    for modes, seed in (([0, 1], 1), ([0], 3)):
        precision, recall = quality.precision_recall(real, clusters(2000, modes, seed))
        assert abs(precision - full_p) < 0.03
        assert recall == pytest.approx(full_r * len(modes) / 4, abs=0.05)


def test_metrics_refuse_mismatched_or_too_small_sets():
    with pytest.raises(ValueError, match="same D"):
        quality.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 20 rows"):
        quality.kid(torch.zeros(5, 3), torch.zeros(50, 3))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny labelled data set (4 classes of bright squares on noise), larger than conftest's default."""
    return load_idx_dataset("fashion-mnist", make_idx_dir(tmp_path_factory.mktemp("d") / "fashion-mnist", 1200, 400))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HVAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_feature_network_is_deterministic_cached_and_rebuilt_when_damaged(data, cache, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("the feature network must never reach the network")
    monkeypatch.setattr(socket, "socket", no_network)
    first = features.feature_network(data, "binary", seed=0, epochs=1, progress=False)
    assert first.path.parent == cache / "features" and first.accuracy > 0.9  # 4 easy classes
    weights = first.path / "lenet.safetensors"
    state = {k: v.clone() for k, v in first.net.state_dict().items()}
    # Same data and seed, trained again elsewhere and with the caller at another thread count: the same network,
    # bit for bit (it trains at a fixed count, which it gives back afterwards).
    monkeypatch.setenv("HVAE_CACHE", str(cache.parent / "other"))
    torch.set_num_threads(2)
    again = features.feature_network(data, "binary", seed=0, epochs=1, progress=False)
    assert torch.get_num_threads() == 2
    assert all(torch.equal(state[k], v) for k, v in again.net.state_dict().items())
    assert again.accuracy == first.accuracy
    # Its features have root-mean-square 1 over the training images (as binarized for it with its seed).
    train = features.to_unit(data.train_x, "binary", torch.Generator().manual_seed(0))
    assert first(train).square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-6)
    # Damage the first cache: a note, then the same network rebuilt.
    monkeypatch.setenv("HVAE_CACHE", str(cache))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    capsys.readouterr()
    rebuilt = features.feature_network(data, "binary", seed=0, epochs=1, progress=False)
    err = capsys.readouterr().err
    assert "damaged" in err and "rebuilding" in err
    assert all(torch.equal(state[k], v) for k, v in rebuilt.net.state_dict().items())
    # Another seed or representation is another cache entry.
    assert features.cache_key(data, "binary", 1) != first.key != features.cache_key(data, "grey", 0)


def test_frechet_distance_grows_with_the_strength_of_a_corruption(data, cache):
    net = features.feature_network(data, "grey", seed=0, epochs=1, progress=False)
    test = data.test_x.float() / 255  # [N, 1, 28, 28]
    real = net(test[:200])
    held = test[200:]
    g = torch.Generator().manual_seed(0)
    noise = [quality.frechet_distance(real, net((held + s * torch.randn(held.shape, generator=g)).clamp(0, 1)))
             for s in (0.0, 0.1, 0.3, 0.6)]
    assert noise == sorted(noise) and noise[-1] > 3 * noise[0]

    def blur(x, width):
        kernel = torch.ones(1, 1, width, width) / width**2
        return torch.nn.functional.conv2d(x, kernel, padding=width // 2)
    blurred = [quality.frechet_distance(real, net(held if w == 1 else blur(held, w))) for w in (1, 3, 5, 9)]
    assert blurred == sorted(blurred) and blurred[-1] > 3 * blurred[0]


def test_unlabelled_data_is_refused_with_a_clear_error(data):
    from hvae.data import Dataset
    from hvae.errors import DataError

    unlabelled = Dataset(name="x", train_x=data.train_x, train_y=None, test_x=data.test_x, test_y=None)
    with pytest.raises(DataError, match="labelled"):
        features.feature_network(unlabelled, "binary")


TINY = ["--set", "model.hidden=[64,32]", "--set", "model.latent_dim=4", "--batch-size", "32", "--no-progress"]


def test_eval_fid_gives_its_keys_records_them_and_the_report_shows_them(tmp_path, cache, capsys):
    data_dir = make_idx_dir(tmp_path / "fashion-mnist", 600, 300).parent
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(data_dir), "--epochs", "2", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--fid-only", "--samples", "300", "--temperature", "0.5,1", "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("fid", "kid", "kid_se", "precision", "recall", "fid_samples", "fid_features", "fid_curve",
                "fid_reference"):
        assert key in result, key
    assert "iw_nll" not in result and result["fid_samples"] == 300
    assert [r["temperature"] for r in result["fid_curve"]] == [0.5, 1.0]
    best = min(result["fid_curve"], key=lambda r: r["fid"])
    assert result["fid"] == best["fid"] and result["fid_temperature"] == best["temperature"]
    assert set(result["fid_reference"]) == {"train", "reconstructions"}
    for row in [*result["fid_curve"], *result["fid_reference"].values()]:
        assert math.isfinite(row["fid"]) and row["fid"] >= -1e-9 and 0 <= row["precision"] <= 1
    # The floor (real training images) is closer to the test images than a 2-epoch model's samples.
    assert result["fid_reference"]["train"]["fid"] < result["fid"]
    assert "LeNet" in result["fid_features"]
    records = [json.loads(line) for line in (run / "sample-quality.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == ["samples", "samples", "train", "reconstructions"]
    # A second measurement appends; nothing earlier is lost.
    assert main(["eval", str(run), "--fid-only", "--samples", "300", "--no-progress"]) == 0
    assert len((run / "sample-quality.jsonl").read_text().splitlines()) == 7
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--k", "5", "--limit", "48", "--n", "16", "--no-progress",
                 "--out", str(out)]) == 0
    section = out.read_text().split('<section id="sample-quality">')[1].split("</section>")[0]
    assert "samples, temperature 0.5" in section and "reference: train" in section
    assert "<img" in section  # the curve against temperature (two temperatures)
