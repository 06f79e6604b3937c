"""optim.make_optimizer: the optimizer a config names, with decoupled weight decay where asked; optim.lr_at: the
learning-rate schedule, in the training loop and across a resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hvae.config import Config, OptimConfig, apply
from hvae.errors import ConfigError
from hvae.loop import fit
from hvae.optim import lr_at, make_optimizer


def test_weight_decay_is_decoupled_for_adam_and_off_by_default():
    w = torch.nn.Parameter(torch.tensor([2.0, -4.0]))
    opt = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5), [w])
    assert isinstance(opt, torch.optim.AdamW)
    w.grad = torch.zeros(2)  # no gradient: the Adam step is 0, only the decay acts
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.0, -4.0]) * (1 - 0.1 * 0.5))
    plain = make_optimizer(OptimConfig(), [torch.nn.Parameter(torch.zeros(1))])
    assert type(plain) is torch.optim.Adam and plain.defaults["weight_decay"] == 0


def test_adamax_takes_weight_decay_as_an_l2_term():
    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = make_optimizer(OptimConfig(optimizer="adamax", lr=0.1, weight_decay=0.5), [w])
    w.grad = torch.zeros(1)  # the gradient becomes 0 + 0.5 w = 1: Adamax's first step is -lr sign(g)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.9]))


def test_lr_at_is_constant_by_default_and_cosine_anneals_to_lr_min_then_holds():
    spe = 10  # steps per epoch
    assert all(lr_at(OptimConfig(lr=3e-3), step, spe) == 3e-3 for step in (0, 7, 10_000))
    cos = OptimConfig(lr=1e-3, schedule="cosine", decay_epochs=4, lr_min=1e-4)
    assert lr_at(cos, 0, spe) == pytest.approx(1e-3)
    assert lr_at(cos, 20, spe) == pytest.approx(0.5 * (1e-3 + 1e-4))  # halfway: cos(pi / 2) = 0
    assert lr_at(cos, 10, spe) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(cos, 40, spe) == pytest.approx(1e-4) and lr_at(cos, 400, spe) == pytest.approx(1e-4)
    lrs = [lr_at(cos, s, spe) for s in range(41)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone down


def test_lr_warmup_is_linear_from_the_first_update_then_multiplies_the_schedule():
    warm = OptimConfig(lr=1e-3, lr_warmup_epochs=2)
    assert [lr_at(warm, s, 5) for s in (0, 4, 9, 10, 50)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    both = OptimConfig(lr=1e-3, lr_warmup_epochs=1, schedule="cosine", decay_epochs=2)
    assert lr_at(both, 4, 10) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 4 / 20)) / 2)


def test_schedule_options_are_checked():
    with pytest.raises(ConfigError, match="decay_epochs"):
        apply(Config(), {"optim.schedule": "cosine"})
    with pytest.raises(ConfigError, match="lr_min"):
        apply(Config(), {"optim.schedule": "cosine", "optim.decay_epochs": 3, "optim.lr_min": 0.1})


def test_a_scheduled_run_updates_at_lr_at_and_resumes_onto_the_same_schedule(idx_dir, tmp_path):
    """The optimizer steps at lr_at(step) (logged), and 2 epochs then a resume to 3 equal 3 epochs at once."""
    base = {"model.hidden": [64, 32], "model.latent_dim": 4, "train.batch_size": 32, "runtime.threads": 1,
            "data.data_dir": str(idx_dir.parent), "train.log_every": 3, "optim.schedule": "cosine",
            "optim.decay_epochs": 2.5, "optim.lr_min": 1e-4, "optim.lr_warmup_epochs": 0.5}
    cfg = apply(Config(), {**base, "train.epochs": 3})
    fit(cfg, tmp_path / "once", progress=False)
    fit(apply(Config(), {**base, "train.epochs": 2}), tmp_path / "twice", progress=False)
    fit(cfg, tmp_path / "twice", resume=True, progress=False)
    records = [json.loads(line) for line in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    spe = 256 // 32
    assert len(steps) == 3 * spe // 3
    for r in steps:  # the lr of the update just taken (step counts updates done)
        assert r["lr"] == pytest.approx(lr_at(cfg.optim, r["step"] - 1, spe))
    once = load_file(tmp_path / "once" / "checkpoints" / "last" / "model.safetensors")
    twice = load_file(tmp_path / "twice" / "checkpoints" / "last" / "model.safetensors")
    for key in once:
        assert torch.equal(once[key], twice[key]), key
