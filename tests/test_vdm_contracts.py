"""The run contracts hold for `--model vdm` as for the other models: exact resume, the NaN guard, DDP, bad input,
evaluation, generation, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hvae
from hvae import checkpoint as ckpt
from hvae.cli import main
from hvae.config import Config, ConfigError, apply
from hvae.diffusion import VdmObjective
from hvae.loop import TrainingError, fit

TINY = {"model.name": "vdm", "model.hidden": [32], "model.embedding": 16, "train.batch_size": 32,
        "runtime.threads": 1, "optim.ema": 0.9}


def tiny_cfg(idx_dir: Path, **extra) -> Config:
    return apply(Config(), {**TINY, "data.data_dir": str(idx_dir.parent), "train.epochs": 2, **extra})


def weights(run: Path, name: str = "model.safetensors") -> dict:
    return load_file(run / "checkpoints" / "last" / name)


@pytest.mark.parametrize("extra", [{}, {"model.timesteps": 4}, {"model.schedule": "network"}, {"objective.draws": 3}])
def test_a_resumed_vdm_run_equals_an_uninterrupted_one_bit_for_bit(idx_dir, tmp_path, extra):
    fit(tiny_cfg(idx_dir, **extra), tmp_path / "straight", progress=False)
    fit(tiny_cfg(idx_dir, **extra, **{"train.epochs": 1}), tmp_path / "resumed", progress=False)
    fit(tiny_cfg(idx_dir, **extra), tmp_path / "resumed", resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(tmp_path / "straight", name), weights(tmp_path / "resumed", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_nan_guard_skips_and_stops_a_vdm_run_like_any_other(idx_dir, tmp_path, monkeypatch):
    real, calls = VdmObjective.__call__, {"n": 0}

    def flaky(self, model, x, kl_weight=1.0):
        obj, terms = real(self, model, x, kl_weight)
        calls["n"] += 1
        return (obj * float("nan") if calls["n"] in (3, 4) else obj), terms

    monkeypatch.setattr(VdmObjective, "__call__", flaky)
    run = tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.epochs": 1}), run, progress=False)
    assert ckpt.load_state(ckpt.checkpoint_dir(run))["counters"]["nonfinite"] == 2
    good = {k: v.clone() for k, v in weights(run).items()}
    assert all(torch.isfinite(v).all() for v in good.values())
    monkeypatch.setattr(VdmObjective, "__call__", lambda self, m, x, w=1.0: (lambda o, t: (o * float("nan"), t))(
        *real(self, m, x, w)))
    with pytest.raises(TrainingError, match="non-finite"):
        fit(tiny_cfg(idx_dir, **{"train.epochs": 3, "optim.max_nonfinite": 3}), run, resume=True, progress=False)
    assert all(torch.equal(good[k], v) for k, v in weights(run).items())  # the good checkpoint is kept


@pytest.mark.parametrize("updates, message", [
    ({"objective.name": "elbo"}, "objective 'elbo' needs explicit levels"),
    ({"model.gamma_min": 6.0}, "model.gamma_min must be < model.gamma_max"),
    ({"model.schedule": "cosine"}, "model.schedule must be one of"),
    ({"model.likelihood": "logistic"}, "model.likelihood must be one of"),
    ({"model.latent_dim": 8}, "model.latent_dim does not apply to model 'vdm'"),
])
def test_bad_vdm_configs_are_refused_with_the_key(updates, message):
    with pytest.raises(ConfigError, match=message):
        apply(Config(), {"model.name": "vdm", **updates})
    with pytest.raises(ConfigError, match="objective 'vdm' trains only model vdm"):
        apply(Config(), {"objective.name": "vdm"})


def test_vdm_through_the_cli_trains_evaluates_samples_and_refuses_latent_commands(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "vdm", "--data-dir", idx_dir.parent, "--epochs", "1", "--batch-size", "32",
                 "--set", "model.hidden=[32]", "--set", "model.timesteps=4", "--set", "runtime.threads=1",
                 "--out", run, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", run, "--limit", "16", "--k", "5", "--passes", "3", "--draws", "2", "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("elbo", "elbo_se", "passes", "draws", "reconstruction", "prior_kl", "diffusion", "kl", "iw_nll"):
        assert key in result, key  # T = 4: the VLB and, over its explicit levels, the IW bound
    assert result["kl"] == pytest.approx(result["prior_kl"] + result["diffusion"], rel=1e-6)
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"], rel=1e-6)
    assert main(["sample", run, "--n", "4", "--steps", "3", "--out", tmp_path / "s.png", "--no-progress"]) == 0
    assert main(["sample", run, "--n", "2", "--chain", "3", "--out", tmp_path / "c.png"]) == 0
    assert (tmp_path / "s.png").is_file() and (tmp_path / "c.png").is_file()
    capsys.readouterr()
    assert main(["interpolate", run, "--out", tmp_path / "i.png"]) == 2
    assert "latent code" in capsys.readouterr().err and not (tmp_path / "i.png").exists()
    model = hvae.load(run)
    assert isinstance(model, hvae.VDM) and model.sample(2, steps=2).shape == (2, 1, 28, 28)


def test_ddp_trains_a_vdm_with_two_processes(idx_dir, tmp_path):
    cmd = [sys.executable, "-m", "hvae", "train", "--model", "vdm", "--data-dir", str(idx_dir.parent), "--epochs", "1",
           "--batch-size", "32", "--set", "model.hidden=[32]", "--set", "runtime.threads=1", "--no-progress",
           "--device", "cpu", "--devices", "2", "--strategy", "ddp", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if "train_elbo" in r]
    assert len(epoch) == 1 and epoch[0]["rank_weight_gap"] == 0.0  # the ranks hold the same weights
