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


# --- spectral regularization (optim.spectral_reg) ---------------------------------------------------------------

def test_spectral_penalty_is_the_sum_of_the_largest_singular_values_and_its_gradient_is_u1_v1():
    """sum_l sigma_max(W_l) over conv, transposed-conv and linear weights (each flattened to a matrix), by an
    independent SVD in float64; d sigma_max / dW = u_1 v_1^T (distinct top singular values)."""
    from hvae.optim import spectral_penalty

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.SiLU(), torch.nn.ConvTranspose2d(5, 2, 4),
                                torch.nn.Flatten(), torch.nn.Linear(7, 4), torch.nn.LayerNorm(4))
    weights = [m.weight for m in model if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))]
    expected = sum(torch.linalg.svdvals(w.detach().double().flatten(1))[0] for w in weights)
    penalty = spectral_penalty(model)
    assert penalty.dtype == torch.float32 and penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    for w in weights:
        u, s, vh = torch.linalg.svd(w.detach().double().flatten(1))
        assert s[0] - s[1] > 1e-3  # distinct: the gradient is unique
        torch.testing.assert_close(w.grad.double().flatten(1), torch.outer(u[:, 0], vh[0]), atol=1e-5, rtol=1e-4)
    assert model[5].weight.grad is None  # norms' scales are not weights of a linear map
    assert spectral_penalty(torch.nn.Sequential(torch.nn.SiLU())).item() == 0.0


def test_spectral_reg_adds_to_the_loss_lowers_the_penalty_and_resumes_exactly(idx_dir, tmp_path):
    """With optim.spectral_reg = c the logged loss is -ELBO + c x penalty (so above -ELBO; equal to it when off), the
    trained weights end with a smaller penalty than without, and 1 epoch + a resume to 2 equals 2 epochs at once."""
    from hvae.checkpoint import load
    from hvae.optim import spectral_penalty

    base = {"model.hidden": [64, 32], "model.latent_dim": 4, "train.batch_size": 32, "runtime.threads": 1,
            "data.data_dir": str(idx_dir.parent), "train.log_every": 2, "train.epochs": 2}
    on = {**base, "optim.spectral_reg": 1.0}
    fit(apply(Config(), on), tmp_path / "on", progress=False)
    fit(apply(Config(), base), tmp_path / "off", progress=False)
    fit(apply(Config(), {**on, "train.epochs": 1}), tmp_path / "resumed", progress=False)
    fit(apply(Config(), on), tmp_path / "resumed", resume=True, progress=False)
    gaps = {}
    for name in ("on", "off"):
        steps = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        gaps[name] = [r["loss"] + r["elbo"] for r in steps if "loss" in r]
    assert gaps["off"] and all(abs(g) < 1e-3 for g in gaps["off"])
    assert all(g > 1.0 for g in gaps["on"])  # c x the sum of 6 top singular values, each well above 1/6
    with torch.no_grad():
        assert spectral_penalty(load(tmp_path / "on")) < spectral_penalty(load(tmp_path / "off")) - 0.1
    once = load_file(tmp_path / "on" / "checkpoints" / "last" / "model.safetensors")
    twice = load_file(tmp_path / "resumed" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(once[key], twice[key]) for key in once)
    with pytest.raises(ConfigError, match="spectral_reg"):
        apply(Config(), {"optim.spectral_reg": -1.0})
