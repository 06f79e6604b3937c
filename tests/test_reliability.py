"""Crash safety, exact resume, numerical faults, safe checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hvae import checkpoint as ckpt
from hvae.cli import main
from hvae.config import Config, apply
from hvae.loop import TrainingError, fit
from hvae.objectives import ElboObjective

TINY = {"model.hidden": [64, 32], "model.latent_dim": 4, "train.batch_size": 32, "runtime.threads": 1}


def tiny_cfg(idx_dir: Path, **extra) -> Config:
    return apply(Config(), {**TINY, "data.data_dir": str(idx_dir.parent), "train.epochs": 2, **extra})


def hvae_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hvae", *args]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(idx_dir, tmp_path):
    args = ["train", "--data-dir", str(idx_dir.parent), "--epochs", "40", "--no-progress",
            "--set", "model.hidden=[256,128]", "--set", "model.latent_dim=4", "--batch-size", "32",
            "--set", "runtime.threads=1", "--set", "train.checkpoint_every=3", "--set", "optim.ema=0.9"]
    steps_total = 40 * (256 // 32)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(hvae_cmd(*args, "--out", str(killed)), stderr=subprocess.DEVNULL)
    state = killed / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["state"]["__dict__"]["step"]["value"] >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it really died mid-run
    saved_step = ckpt.load_state(ckpt.checkpoint_dir(killed))["step"]
    assert 20 <= saved_step < steps_total
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert subprocess.run(hvae_cmd(*args, "--out", str(straight)), stderr=subprocess.DEVNULL).returncode == 0
    resumed_w, straight_w = final_weights(killed), final_weights(straight)
    assert resumed_w.keys() == straight_w.keys()
    for key in straight_w:
        assert torch.equal(resumed_w[key], straight_w[key]), key  # bitwise on CPU
    ema_a = load_file(killed / "checkpoints/last/ema.safetensors")
    ema_b = load_file(straight / "checkpoints/last/ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_b)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated tail after the resume


def test_resume_in_process_equals_straight_run(idx_dir, tmp_path):
    full = tiny_cfg(idx_dir, **{"train.epochs": 3})
    fit(full, tmp_path / "a", progress=False)
    fit(apply(full, {"train.epochs": 1}), tmp_path / "b", progress=False)
    fit(full, tmp_path / "b", resume=True, progress=False)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_and_counted(idx_dir, tmp_path, monkeypatch):
    real, calls = ElboObjective.__call__, {"n": 0}

    def flaky(self, model, x, kl_weight):
        obj, terms = real(self, model, x, kl_weight)
        calls["n"] += 1
        return (obj * float("nan") if calls["n"] in (3, 4, 5) else obj), terms

    monkeypatch.setattr(ElboObjective, "__call__", flaky)
    run = tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.log_every": 1}), run, progress=False)
    state = ckpt.load_state(ckpt.checkpoint_dir(run))
    assert state["counters"]["nonfinite"] == 3
    assert all(torch.isfinite(w).all() for w in final_weights(run).values())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["nonfinite"] == 3


def test_persistent_nonfinite_stops_and_keeps_last_good_checkpoint(idx_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.epochs": 1}), run, progress=False)
    good = {k: v.clone() for k, v in final_weights(run).items()}
    real = ElboObjective.__call__
    monkeypatch.setattr(ElboObjective, "__call__", lambda self, m, x, w: (lambda o, t: (o * float("nan"), t))(*real(self, m, x, w)))
    with pytest.raises(TrainingError, match="non-finite"):
        fit(tiny_cfg(idx_dir, **{"train.epochs": 3, "optim.max_nonfinite": 4}), run, resume=True, progress=False)
    after = final_weights(run)
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_update_skipping_is_capped_so_training_never_stalls(idx_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(idx_dir, **{"train.epochs": 1, "optim.skip_threshold": 1e-9, "optim.max_skips": 3})
    fit(cfg, run, progress=False)
    state = ckpt.load_state(ckpt.checkpoint_dir(run))
    steps = 256 // 32
    # every norm exceeds the threshold: 3 skips, then one clipped update, repeated
    assert state["counters"]["skipped"] == 3 * (steps // 4) + min(3, steps % 4)
    assert state["counters"]["clipped_after_skips"] == steps // 4
    assert state["step"] == steps


@pytest.mark.parametrize("want_norm", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_guard_catches_a_nonfinite_gradient_under_a_finite_loss(want_norm, bad):
    """With or without the norm (it is computed only at logging steps), one bad gradient entry is caught."""
    from hvae.optim import UpdateGuard
    from hvae.state import TrainState

    params = [torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(5))]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    state = TrainState(torch.Generator(), torch.device("cpu"))
    guard = UpdateGuard(Config().optim, state, torch.optim.Adam(params), torch.device("cpu"))
    applied, norm = guard.allow(torch.tensor(1.0), params, 0, want_norm=want_norm)
    assert applied and (norm is None) != want_norm
    if want_norm:
        assert torch.isclose(norm, torch.tensor(0.5 * 17 ** 0.5))
    params[1].grad[2] = bad
    applied, _ = guard.allow(torch.tensor(1.0), params, 1, want_norm=want_norm)
    assert not applied and state.counters["nonfinite"] == 1


def test_the_guard_is_deferred_only_where_a_sync_costs_and_the_optimizer_can_skip_itself():
    from hvae.optim import defer_guard

    t = Config().optim
    fused = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], fused=True)
    plain = torch.optim.Adamax([torch.nn.Parameter(torch.ones(2))])
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert defer_guard(t, fused, gpu, None)
    assert not defer_guard(t, fused, cpu, None)  # a sync is free on a CPU
    assert not defer_guard(t, plain, gpu, None)  # cannot skip its own update
    assert not defer_guard(t, fused, gpu, object())  # loss scaling: the GradScaler's own path
    assert not defer_guard(apply(Config(), {"optim.grad_clip": 1.0}).optim, fused, gpu, None)
    assert not defer_guard(apply(Config(), {"optim.skip_threshold": 1.0}).optim, fused, gpu, None)


def _nan_at_calls(monkeypatch, bad_calls) -> None:
    """The training objective (value and logged terms) turns NaN at the given calls (1-based)."""
    real, calls = ElboObjective.__call__, {"n": 0}

    def flaky(self, model, x, kl_weight):
        obj, terms = real(self, model, x, kl_weight)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            return obj * float("nan"), type(terms)(*(term * float("nan") for term in terms))
        return obj, terms

    monkeypatch.setattr(ElboObjective, "__call__", flaky)


def _without_timers(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad_calls", [(), (3, 4, 5, 11)])
def test_deferred_guard_trains_bit_for_bit_like_the_synced_one(idx_dir, tmp_path, monkeypatch, bad_calls):
    """The device-side guard (used off CPU; forced here) skips the same steps as the host-side one: the same
    weights, EMA, Adam state, counters and logged metrics, with and without non-finite steps."""
    import hvae.optim as tr

    runs = {}
    for deferred in (False, True):
        monkeypatch.setattr(tr, "defer_guard", lambda *args, d=deferred: d)
        _nan_at_calls(monkeypatch, bad_calls)
        runs[deferred] = tmp_path / f"deferred-{deferred}"
        fit(tiny_cfg(idx_dir, **{"optim.ema": 0.9, "train.log_every": 5}), runs[deferred], progress=False)
    synced, deferred = (ckpt.checkpoint_dir(runs[d]) for d in (False, True))
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(synced / name), load_file(deferred / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = ckpt.load_state(synced), ckpt.load_state(deferred)
    assert state_a["counters"] == state_b["counters"] and state_b["counters"]["nonfinite"] == len(bad_calls)
    for key, value in state_a["optimizer"]["state"].items():
        assert all(torch.equal(value[k], state_b["optimizer"]["state"][key][k]) for k in value)
    assert _without_timers(runs[False]) == _without_timers(runs[True])


def test_deferred_guard_stops_on_persistent_nonfinite_and_keeps_the_good_checkpoint(idx_dir, tmp_path, monkeypatch):
    import hvae.optim as tr

    run = tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.epochs": 1}), run, progress=False)
    good = {k: v.clone() for k, v in final_weights(run).items()}
    monkeypatch.setattr(tr, "defer_guard", lambda *args: True)
    _nan_at_calls(monkeypatch, range(1, 10**6))
    # resumed at step 8: steps 9.. are bad; the verdicts are read at logging steps, so the stop comes at step 15
    with pytest.raises(TrainingError, match="7 non-finite losses/gradients in a row by step 15"):
        fit(tiny_cfg(idx_dir, **{"train.epochs": 3, "optim.max_nonfinite": 4, "train.log_every": 5}), run,
              resume=True, progress=False)
    after = final_weights(run)
    assert all(torch.equal(good[k], after[k]) for k in good)


def _epoch_records(run: Path) -> list[dict]:
    return [r for r in _without_timers(run) if "train_elbo" in r]


def test_resume_continues_a_run_of_skipped_updates_exactly(idx_dir, tmp_path):
    """The guard's in-a-row counts travel in the checkpoint: the skip/clip cadence, and so the weights, of a resumed
    run equal an uninterrupted one's."""
    extra = {"optim.skip_threshold": 1e-9, "optim.max_skips": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(tiny_cfg(idx_dir, **extra), straight, progress=False)
    fit(tiny_cfg(idx_dir, **extra, **{"train.epochs": 1}), resumed, progress=False)
    fit(tiny_cfg(idx_dir, **extra), resumed, resume=True, progress=False)
    a, b = (ckpt.load_state(ckpt.checkpoint_dir(r)) for r in (straight, resumed))
    assert a["counters"] == b["counters"] and a["counters"]["clipped_after_skips"] == 5
    w_a, w_b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_crash_at_an_epoch_end_then_resume_keeps_every_epoch_record_and_mean(idx_dir, tmp_path, monkeypatch):
    """checkpoint_every falls on the epoch's last step (6 steps, every 3) and the run dies in that epoch's
    validation: the resumed run (from step 3, mid-epoch) still writes epoch 1's record, with the whole epoch's
    means, equal to an uninterrupted run's."""
    import hvae.loop as tr

    extra = {"data.validation": 64, "train.checkpoint_every": 3}  # 192 training images: 6 steps of 32
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    fit(tiny_cfg(idx_dir, **extra), straight, progress=False)
    real = tr.validation_elbo

    def dies_once(*args, **kwargs):
        monkeypatch.setattr(tr, "validation_elbo", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "validation_elbo", dies_once)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_cfg(idx_dir, **extra), crashed, progress=False)
    assert ckpt.load_state(ckpt.checkpoint_dir(crashed))["step"] == 3
    fit(tiny_cfg(idx_dir, **extra), crashed, resume=True, progress=False)
    assert [r["epoch"] for r in _epoch_records(crashed)] == [1, 2]
    assert _epoch_records(crashed) == _epoch_records(straight)
    w_a, w_b = final_weights(straight), final_weights(crashed)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_resume_keeps_the_original_provenance_and_appends_its_own(idx_dir, tmp_path):
    run = tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.epochs": 1}), run, argv=["hvae", "train", "--lr", "0.002"], progress=False)
    fit(tiny_cfg(idx_dir), run, resume=True, argv=["hvae", "train", "--resume", str(run)], progress=False)
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["command"] == ["hvae", "train", "--lr", "0.002"] and "started" in prov
    assert [r["command"] for r in prov["resumes"]] == [["hvae", "train", "--resume", str(run)]]


def test_resume_drops_a_metrics_line_cut_short_by_a_crash(tmp_path, capsys):
    from hvae.rundir import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.5}\n{"step": 15, "lo')
    log = MetricsLog(path, resume_step=10)
    log.write({"step": 11, "loss": 0.4})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10, 11]
    assert "dropped 1 damaged line" in capsys.readouterr().err


def test_a_new_run_removes_an_earlier_runs_checkpoints_and_keeps_other_files(tmp_path):
    from hvae.rundir import clear_training_outputs

    run = tmp_path / "run"
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "checkpoints" / "last" / "model.safetensors").write_bytes(b"old")
    (run / "tensorboard").mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    clear_training_outputs(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_failed_checkpoint_write_leaves_no_temp_folder_and_keeps_the_previous(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(3)}, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]
    assert ckpt.load_state(ckpt.checkpoint_dir(tmp_path))["step"] == 1


def test_run_files_follow_the_umask_like_any_other_file(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"step": 1})
        ckpt.write_json(tmp_path / "config.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoints" / "last").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


def test_checkpoint_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    w1 = {"a": torch.ones(3)}
    ckpt.save_checkpoint(tmp_path, w1, {"step": 1})
    import hvae.checkpoint as mod

    real_save, calls = mod.save_file, {"n": 0}

    def dying_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(mod, "save_file", dying_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, {"a": torch.zeros(3)}, {"step": 2})
    last = ckpt.checkpoint_dir(tmp_path)
    assert ckpt.load_state(last)["step"] == 1
    assert torch.equal(ckpt.load_tensors(last / "model.safetensors")["a"], torch.ones(3))


def test_crash_between_renames_falls_back_to_previous(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"a": torch.ones(2)}, {"step": 7})
    root = tmp_path / "checkpoints"
    os.replace(root / "last", root / "last.old")  # as if killed right after the first rename
    assert ckpt.load_state(ckpt.checkpoint_dir(tmp_path))["step"] == 7


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['HVAE_PWNED']}",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("HVAE_PWNED", str(marker))
    bad = tmp_path / "weights.pt"
    with open(bad, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    torch_style = tmp_path / "weights2.pt"
    torch.save({"w": _Evil()}, torch_style)
    for path in (bad, torch_style):
        with pytest.raises(ckpt.CheckpointError, match="refused"):
            ckpt.load_foreign_weights(path)
    assert not marker.exists()
    good = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(ckpt.load_foreign_weights(good)["w"], torch.ones(2))


def test_checkpoint_state_round_trip_is_exact(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"step": 5, "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    ckpt.save_checkpoint(tmp_path, model.state_dict(), state)
    back = ckpt.load_state(ckpt.checkpoint_dir(tmp_path))
    opt2 = torch.optim.Adam(model.parameters())
    opt2.load_state_dict(back["optimizer"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])


def test_loss_scaling_overflows_lower_the_scale_and_training_recovers(idx_dir, tmp_path, monkeypatch):
    """16-mixed scales the loss with a GradScaler (on a GPU; forced here on CPU): the guard sees the unscaled
    gradients, and a skipped overflow step still lowers the scale, so training recovers instead of stopping."""
    import hvae.loop as tr
    from lightning_fabric import Fabric
    from lightning_fabric.plugins import MixedPrecision

    start = 2.0 ** 20  # fp16 gradients overflow until the scale has been halved a few times
    scalers = []

    def fabric_with_scaler(precision, **kw):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=start))
        return Fabric(**kw, plugins=MixedPrecision("16-mixed", "cpu", scaler=scalers[-1]))

    monkeypatch.setattr(tr, "Fabric", fabric_with_scaler)
    run = tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.log_every": 1}), run, progress=False)  # 2 epochs of 8 steps
    nonfinite = ckpt.load_state(ckpt.checkpoint_dir(run))["counters"]["nonfinite"]
    assert 1 <= nonfinite <= 10, nonfinite
    assert scalers[0].get_scale() <= start / 2 ** nonfinite
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in line]
    assert 0 < logged[-1]["grad_norm"] < 1e4  # the true norm, not one multiplied by the scale
    assert all(torch.isfinite(w).all() for w in final_weights(run).values())
    # The scale travels in the checkpoint: a resumed run goes on from it, not from the start scale again.
    saved = ckpt.load_state(ckpt.checkpoint_dir(run))["scaler"]
    assert saved["scale"] == scalers[0].get_scale() < start
    fit(tiny_cfg(idx_dir, **{"train.epochs": 3, "train.log_every": 1}), run, resume=True, progress=False)
    resumed_nonfinite = ckpt.load_state(ckpt.checkpoint_dir(run))["counters"]["nonfinite"]
    # Restarting from the start scale would overflow again as many times as the first run did.
    assert resumed_nonfinite - nonfinite < nonfinite, (nonfinite, resumed_nonfinite)


def test_rng_state_from_another_kind_of_device_starts_fresh_streams_with_a_note(capsys):
    """A checkpoint written on a GPU (its data stream a CUDA generator's) resumed on a CPU: no crash, a note."""
    from hvae.state import rng_state, set_rng_state

    gen = torch.Generator().manual_seed(7)
    state = rng_state(gen, torch.device("cpu"))
    assert state["data_device"] == "cpu" and "cuda" not in state
    expected = torch.randint(0, 255, (5,), generator=gen)
    set_rng_state(state, gen, torch.device("cpu"))  # same device kind: the stream continues exactly
    assert torch.equal(torch.randint(0, 255, (5,), generator=gen), expected)
    old = {k: v for k, v in state.items() if k != "data_device"}  # a checkpoint from before the key: CPU
    set_rng_state(old, gen, torch.device("cpu"))
    assert torch.equal(torch.randint(0, 255, (5,), generator=gen), expected)
    foreign = {**state, "data": torch.zeros(16, dtype=torch.uint8), "data_device": "cuda", "cuda": torch.zeros(16)}
    set_rng_state(foreign, gen, torch.device("cpu"))
    assert "trained on cuda, resumed on cpu" in capsys.readouterr().err


def test_provenance_names_a_git_commit_only_for_hvaes_own_source_tree(tmp_path, monkeypatch):
    """An installed copy inside another project's git work tree (its .venv) must not report that project's commit."""
    import shutil as sh

    from hvae import rundir

    if sh.which("git") is None:
        pytest.skip("git is not installed")
    project = tmp_path / "project"
    package = project / ".venv" / "lib" / "site-packages" / "hvae"
    package.mkdir(parents=True)
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setattr(rundir, "__file__", str(package / "rundir.py"))
    assert rundir.source_commit() is None
    source = project / "src" / "hvae"
    source.mkdir(parents=True)
    monkeypatch.setattr(rundir, "__file__", str(source / "rundir.py"))
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert rundir.source_commit() == head


def test_kl_warm_up_ramps_beta_linearly_then_holds_it():
    objective = apply(Config(), {"objective.warmup_epochs": 2, "objective.beta": 0.5}).objective
    assert [objective.kl_weight(step, 10) for step in (0, 5, 10, 15, 20, 35)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert apply(Config(), {"objective.beta": 0.7}).objective.kl_weight(0, 10) == 0.7  # no warm-up: beta from the start


def test_ema_moves_the_average_by_one_minus_decay_and_a_skipped_update_leaves_it():
    from hvae.optim import EMA

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 1.2))  # 0.9 * 1 + 0.1 * 3
    ema.update(model, applied=torch.tensor(False))  # the device-side guard's skipped step
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 1.2))
    ema.update(model, applied=torch.tensor(True))
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 1.38))  # 0.9 * 1.2 + 0.1 * 3
