"""End to end through cli.main in-process on tiny data: train -> eval -> sample/reconstruct/interpolate."""

from __future__ import annotations

import json
import math

from hvae.cli import main

TINY = ["--set", "model.hidden=[64,32]", "--set", "model.latent_dim=4", "--batch-size", "32", "--no-progress"]


def test_train_eval_sample_end_to_end(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(idx_dir.parent), "--epochs", "2", "--out", str(run), *TINY]) == 0
    for name in ("config.json", "metrics.jsonl", "provenance.json", "checkpoints/last/model.safetensors"):
        assert (run / name).is_file(), name
    capsys.readouterr()
    assert main(["eval", str(run), "--k", "20", "--limit", "32", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("elbo", "reconstruction", "kl", "iw_nll", "k", "n_images", "bits_per_dim", "active_units",
                "kl_per_level", "active_units_per_level"):
        assert key in result, key
    assert result["n_images"] == 32 and result["k"] == 20
    assert abs(result["elbo"] - (result["reconstruction"] - result["kl"])) < 1e-6
    # The CLI's numbers, in range (their values are checked against exact likelihoods in test_objectives):
    # Bernoulli data has iw_nll > 0, tighter than -elbo (up to MC noise), and bits/dim = iw_nll / (784 ln 2).
    assert 0 < result["iw_nll"] <= -result["elbo"] + 0.5
    assert abs(result["bits_per_dim"] - result["iw_nll"] / (784 * math.log(2))) < 1e-9
    for cmd in ("sample", "reconstruct", "interpolate"):
        out = tmp_path / f"{cmd}.png"
        assert main([cmd, str(run), "--n", "4", "--out", str(out)]) == 0
        assert out.stat().st_size > 100


def test_encode_writes_posterior_means_and_labels(idx_dir, tmp_path):
    import numpy as np

    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(idx_dir.parent), "--epochs", "1", "--out", str(run), *TINY]) == 0
    out = tmp_path / "z.npz"
    assert main(["encode", str(run), "--limit", "10", "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["z1_mean"].shape == (10, 4) and z["labels"].shape == (10,)
        assert np.isfinite(z["z1_mean"]).all()


def test_hierarchical_generation_from_the_cli(idx_dir, tmp_path, capsys):
    run = tmp_path / "mhvae"
    assert main(["train", "--data-dir", str(idx_dir.parent), "--epochs", "1", "--model", "mhvae", "--out", str(run),
                 "--set", "model.levels=2", "--set", "model.latent_dims=[4,2]", *TINY]) == 0
    assert main(["sample", str(run), "--n", "4", "--temperature", "1.0,0.5", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["levels", str(run), "--n", "2", "--samples", "2", "--out", str(tmp_path / "l.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "l.png") as img:
        width, height = img.size
    assert width > height  # rows: 2 images; columns: input + (T + 1) * 2 redraws
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4", "--temperature", "1,1,1", "--out", str(tmp_path / "x.png")]) == 2
    assert "temperatures" in capsys.readouterr().err
