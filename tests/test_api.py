"""Training from Python (hvae.train) with the contracts of `hvae train`; configs by model and objective, older
layouts read at their new place."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import hvae
from hvae.cli import main
from hvae.config import Config, ConfigError, apply, from_dict, to_dict
from hvae.errors import RunDirError

TINY = {"model": {"hidden": [32], "latent_dim": 4}, "train": {"epochs": 1, "batch_size": 32},
        "runtime": {"threads": 1}}


def weights(run) -> dict:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def test_train_from_python_returns_the_model_and_its_run_directory(idx_dir, tmp_path):
    model, run = hvae.train(TINY, tmp_path / "run", data_dir=str(idx_dir.parent), progress=False)
    assert run == tmp_path / "run" and (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    assert isinstance(model, hvae.VAE) and model.latent_dim == 4
    saved = weights(run)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # the model returned is the saved one
    loaded = hvae.load(run)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_python_and_cli_train_the_same_run_bit_for_bit(idx_dir, tmp_path):
    hvae.train(TINY, tmp_path / "py", data_dir=str(idx_dir.parent), progress=False)
    assert main(["train", "--data-dir", idx_dir.parent, "--out", tmp_path / "cli", "--epochs", "1", "--batch-size", "32",
                 "--set", "model.hidden=[32]", "--set", "model.latent_dim=4", "--set", "runtime.threads=1",
                 "--no-progress"]) == 0
    a, b = weights(tmp_path / "py"), weights(tmp_path / "cli")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "py" / "config.json").read_text()) == \
        json.loads((tmp_path / "cli" / "config.json").read_text())


def test_train_from_python_keeps_the_run_directory_contract(idx_dir, tmp_path):
    data_dir = str(idx_dir.parent)
    _, run = hvae.train(TINY, tmp_path / "run", data_dir=data_dir, progress=False)
    before = weights(run)
    with pytest.raises(RunDirError, match="not empty"):
        hvae.train(TINY, run, data_dir=data_dir, progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights(run).items())  # nothing already written is lost
    with pytest.raises(ConfigError, match="only the epochs"):
        hvae.train(TINY, run, resume=True)
    model, _ = hvae.train(out=run, resume=True, train__epochs=2, progress=False)
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "train_elbo" in r] == [1, 2]
    hvae.train(TINY, run, data_dir=data_dir, overwrite=True, progress=False, train__seed=3)
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 3


def test_train_from_python_can_start_from_a_model_hvae_built(idx_dir, tmp_path):
    data_dir = str(idx_dir.parent)
    _, first = hvae.train(TINY, tmp_path / "first", data_dir=data_dir, progress=False)
    start = hvae.load(first)
    model, run = hvae.train(TINY, tmp_path / "second", model=start, data_dir=data_dir, progress=False)
    assert model is start and from_dict(json.loads((run / "config.json").read_text())).model == start.config
    with pytest.raises(ConfigError, match="built by hvae.build_model"):
        hvae.train(TINY, tmp_path / "third", model=hvae.VAE(latent_dim=4, hidden=(32,)), data_dir=data_dir)
    assert not (tmp_path / "third").exists()


def test_each_model_and_objective_has_only_its_own_settings():
    with pytest.raises(ConfigError, match="model.levels does not apply to model 'vae'.*mhvae, ladder"):
        apply(Config(), {"model.levels": 3})
    cfg = apply(Config(), {"model.name": "mhvae", "model.levels": 3})
    assert cfg.model.levels == 3 and not hasattr(cfg.model, "posterior")
    with pytest.raises(ConfigError, match="objective.beta does not apply to objective 'iwae'"):
        apply(Config(), {"objective.name": "iwae", "objective.beta": 0.5})
    with pytest.raises(ConfigError, match="objective.free_bits does not apply to objective 'iwae'"):
        apply(Config(), {"train.iw_k": 5, "train.free_bits": 1.0})  # the older layout ignored free bits here
    with pytest.raises(ConfigError, match="unknown objective.name 'elbow'; choose one of elbo, iwae"):
        apply(Config(), {"objective.name": "elbow"})
    with pytest.raises(ConfigError, match="objective.k must be >= 2"):
        apply(Config(), {"objective.name": "iwae", "objective.k": 1})


def test_keys_of_the_older_layout_are_read_at_their_new_place():
    cfg = apply(Config(), {"train.lr": 3e-4, "train.iw_k": 5, "train.precision": "bf16-mixed", "train.ema": 0.99})
    assert cfg.optim.lr == 3e-4 and cfg.optim.ema == 0.99 and cfg.runtime.precision == "bf16-mixed"
    assert cfg.objective.name == "iwae" and cfg.objective.k == 5
    assert apply(Config(), {"train.iw_k": 1}) == Config()
    with pytest.raises(ConfigError, match=r"'optim.lr' \(given as 'train.lr'\) must be float"):
        apply(Config(), {"train.lr": "fast"})


def test_a_config_json_of_an_older_run_loads_with_what_applied_to_its_model_and_objective():
    old = {"model": {"name": "mhvae", "arch": "mlp", "latent_dim": 8, "hidden": [16], "conv_channels": [32, 64],
                     "likelihood": "bernoulli", "activation": "relu", "variance": "clamp", "levels": 2,
                     "latent_dims": [], "level_hidden": [8], "posterior": "residual", "skip": False, "norm": "none"},
           "data": {"dataset": "fashion-mnist", "data_dir": None, "validation": 0},
           "train": {"epochs": 3, "batch_size": 64, "lr": 1e-3, "optimizer": "adam", "seed": 1, "beta": 1.0,
                     "warmup_epochs": 0.0, "free_bits": 0.0, "n_samples": 1, "iw_k": 4, "analytic_kl": True,
                     "grad_clip": 0.0, "skip_threshold": 0.0, "max_skips": 10, "max_nonfinite": 20, "ema": 0.0,
                     "compile": False, "checkpoint_every": 0, "log_every": 50, "accelerator": "auto", "devices": 1,
                     "num_nodes": 1, "strategy": "auto", "precision": "32-true", "tensorboard": False, "threads": 0}}
    cfg = from_dict(old)
    assert cfg.model.name == "mhvae" and cfg.model.levels == 2 and cfg.model.latent_dim == 8
    assert cfg.objective.name == "iwae" and cfg.objective.k == 4 and cfg.train.epochs == 3
    assert from_dict(to_dict(cfg)) == cfg  # and it is written back in today's layout
    with pytest.raises(ConfigError, match="unknown config key 'train.from_the_future'"):
        from_dict({**old, "train": {**old["train"], "from_the_future": 1}})
