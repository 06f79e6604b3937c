"""Training that survives preemption (issue 19): SIGTERM/SIGINT stop it after the current step with a checkpoint and
exit code 3, a second signal stops at once keeping the previous checkpoint, DDP ranks stop together, checkpoints
by wall time (train.checkpoint_minutes), one command to start or resume (--auto-resume), and output files that an
interrupted command never leaves half-written. Resumes are compared with uninterrupted runs bit for bit (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hvae
from hvae import checkpoint as ckpt
from hvae import preemption
from hvae.cli import main
from hvae.config import Config, ConfigError, apply
from hvae.loop import TrainingStopped, fit
from hvae.objectives import ElboObjective
from hvae.preemption import AGREE_EVERY, EXIT_STOPPED

# 256 training images in batches of 32: 8 steps per epoch.
TINY = ["--set", "model.hidden=[64,32]", "--set", "model.latent_dim=4", "--batch-size", "32",
        "--set", "runtime.threads=1", "--set", "optim.ema=0.9", "--set", "train.log_every=1", "--no-progress"]
EPOCHS = 40  # 320 steps: long enough to signal a real process mid-run, short enough to run straight

# A real `hvae train` process whose N-th safetensors file write (env SLOW_CALL) first writes MARKER, then sleeps
# SLOW_SECONDS: a window in which the test signals it while it writes a checkpoint.
SLOW_SAVE = """
import os, sys, time
from pathlib import Path
import hvae.checkpoint as ckpt
real, calls = ckpt.save_file, [0]
def slow(tensors, path):
    calls[0] += 1
    if calls[0] == int(os.environ["SLOW_CALL"]):
        Path(os.environ["MARKER"]).write_text(str(path))
        time.sleep(float(os.environ["SLOW_SECONDS"]))
    real(tensors, path)
ckpt.save_file = slow
from hvae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(data: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return ["train", "--data-dir", str(data), "--epochs", str(epochs), *TINY, "--out", str(out), *extra]


def train_cmd(data: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return [sys.executable, "-m", "hvae", *train_args(data, out, *extra, epochs=epochs)]


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def saved_step(run: Path) -> int:
    return ckpt.load_state(ckpt.checkpoint_dir(run))["step"]


def assert_same_training_state(a: Path, b: Path) -> None:
    """Weights, EMA weights and optimizer state (Adam's moments and step counts) equal bit for bit."""
    last_a, last_b = ckpt.checkpoint_dir(a), ckpt.checkpoint_dir(b)
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(last_a / name), load_file(last_b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = ckpt.load_state(last_a), ckpt.load_state(last_b)
    assert sa["step"] == sb["step"] and sa["counters"] == sb["counters"]
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import make_idx_dir

    root = tmp_path_factory.mktemp("data")
    make_idx_dir(root / "fashion-mnist")
    return root


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with (in-process: the same arithmetic as a process)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_args(data, out)) == 0
    return out


# --- a real process, stopped by a signal -----------------------------------------------------------------------

def test_sigterm_mid_epoch_checkpoints_that_step_and_the_resume_is_bitwise(data, straight, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(data, run), stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(logged_steps(run)) >= 20)
    seen = logged_steps(run)[-1]
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == EXIT_STOPPED, err
    step = saved_step(run)
    assert seen <= step < EPOCHS * 8  # the step under way when the signal came: never one before the step seen
    assert logged_steps(run)[-1] == step  # metrics flushed up to the checkpoint
    last = err.strip().splitlines()[-1]
    assert last == (f"hvae train: stopped by SIGTERM after step {step} of {EPOCHS * 8}; the checkpoint in {run} "
                    f"holds it; resume with: hvae train --resume {run}"), last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_training_state(run, straight)
    assert logged_steps(run) == logged_steps(straight)  # no duplicated tail after the resume


def slow_save_process(data: Path, run: Path, tmp_path: Path, call: int, seconds: float) -> tuple[subprocess.Popen, Path]:
    """`hvae train --auto-resume` checkpointing every 5 steps, whose `call`-th file write is slow (EMA on: 3 files a
    checkpoint; checkpoints at steps 5, 8 (epoch end), 10: call 7 is step 10's weights)."""
    marker = tmp_path / "writing"
    env = {**os.environ, "SLOW_CALL": str(call), "MARKER": str(marker), "SLOW_SECONDS": str(seconds)}
    cmd = [sys.executable, "-c", SLOW_SAVE, *train_args(data, run, "--auto-resume", "--set", "train.checkpoint_every=5")]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env), marker


def test_sigterm_during_a_checkpoint_write_stops_after_the_next_step(data, straight, tmp_path, capsys):
    run = tmp_path / "run"
    proc, marker = slow_save_process(data, run, tmp_path, call=7, seconds=1.5)
    wait_for(marker.exists)
    proc.send_signal(signal.SIGTERM)  # while the checkpoint of step 10 is being written
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == EXIT_STOPPED, err
    assert saved_step(run) == 11  # step 10's checkpoint completed; the signal was acted on after step 11
    assert err.strip().splitlines()[-1].endswith("rerun this same command to resume")
    # the requeued job repeats its command line unchanged (with --auto-resume) and resumes
    assert main(train_args(data, run, "--auto-resume", "--set", "train.checkpoint_every=5")) == 0
    assert "resuming it from its last checkpoint" in capsys.readouterr().err
    assert_same_training_state(run, straight)  # checkpoint_every does not change the arithmetic


def test_a_second_signal_stops_at_once_and_the_previous_checkpoint_loads(data, straight, tmp_path):
    run = tmp_path / "run"
    proc, marker = slow_save_process(data, run, tmp_path, call=7, seconds=600)
    wait_for(marker.exists)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # both while step 10's checkpoint is being written
    err = proc.communicate(timeout=60)[1]  # (the write would sleep 600 s: it was cut short)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == ("hvae train: SIGTERM: a second signal, stopped at once; the last whole "
                                            "checkpoint is kept")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"]  # the half-written one is gone
    assert saved_step(run) == 8
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_training_state(run, straight)


# --- DDP: two processes stop at the same step -------------------------------------------------------------------

def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_ddp_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_resume_is_bitwise(data, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step (else rank 0 would wait in the next collective),
    one the ranks agree on every AGREE_EVERY steps; rank 0 writes one checkpoint, and the resume equals an
    uninterrupted DDP run bit for bit: every rank's RNG streams and epoch sums travel in the checkpoint. 7 steps an
    epoch (32 images held out), so the stop falls mid-epoch as a rule."""
    ddp = ["--device", "cpu", "--devices", "2", "--strategy", "ddp", "--set", "data.validation=32"]
    run, straight = tmp_path / "run", tmp_path / "straight"
    proc = subprocess.Popen(train_cmd(data, run, *ddp), stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(logged_steps(run)) >= 12)
    seen = logged_steps(run)[-1]
    (rank1,) = children(proc.pid)
    os.kill(rank1, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]  # returns once both ranks have closed stderr
    assert proc.returncode == EXIT_STOPPED, err
    step = saved_step(run)
    assert seen <= step < EPOCHS * 7 and step % AGREE_EVERY == 0 and logged_steps(run)[-1] == step
    assert err.count("hvae train: stopped by SIGTERM") == 1  # rank 0 reports it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"]
    assert len(ckpt.load_state(ckpt.checkpoint_dir(run))["ranks"]) == 2
    epochs = step // 7 + 2  # (--resume may change the epochs: two runs of a few epochs, not of 40)
    resumed = subprocess.run([sys.executable, "-m", "hvae", "train", "--resume", str(run), "--epochs", str(epochs),
                              "--no-progress"], stderr=subprocess.PIPE, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    subprocess.run(train_cmd(data, straight, *ddp, epochs=epochs), check=True, stderr=subprocess.DEVNULL, timeout=300)
    assert_same_training_state(run, straight)
    logged = [[{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
               for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (run, straight)]
    assert logged[0] == logged[1]  # every logged mean too, the epochs' train ELBO (both ranks' sums) included


def test_ranks_act_on_the_flags_sent_one_exchange_before(monkeypatch):
    """The agreement itself (one gloo rank standing in for several): an exchange every AGREE_EVERY steps (K), read
    at the next one. A clock that asks for a checkpoint from step 6 on gets it after step 2K, and, restarted then,
    after step 4K (not 3K: the flags sent at 2K asked for the checkpoint being written); a signal in step 3 stops
    after step 2K."""
    from hvae.preemption import Preemption

    now = [0.0]
    monkeypatch.setattr(preemption, "monotonic", lambda: now[0])

    def checkpoints(signal_at: int | None) -> dict[int, int]:
        """step -> the signal stopped on (0: none), for the steps after which a checkpoint is due."""
        agreement, due = Preemption(apply(Config(), {"train.checkpoint_minutes": 1}).train, world=2).start(), {}
        for step in range(1, 4 * AGREE_EVERY + 1):
            now[0] = 10.0 * step  # 6 steps a minute
            if step == signal_at:
                agreement.signum = signal.SIGTERM
            if agreement.checkpoint_due(step):
                due[step] = agreement.stop
                agreement.last_save = now[0]  # what saved() does first
        agreement.close()
        return due

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        assert checkpoints(None) == {2 * AGREE_EVERY: 0, 4 * AGREE_EVERY: 0}
        assert checkpoints(3)[2 * AGREE_EVERY] == signal.SIGTERM
    finally:
        torch.distributed.destroy_process_group()


# --- in-process: where in the loop a signal lands ---------------------------------------------------------------

def tiny_cfg(idx_dir: Path, **extra) -> Config:
    return apply(Config(), {"model.hidden": [64, 32], "model.latent_dim": 4, "train.batch_size": 32,
                            "runtime.threads": 1, "optim.ema": 0.9, "data.data_dir": str(idx_dir.parent),
                            "train.epochs": 3, **extra})


def signal_at_calls(monkeypatch, calls: dict[int, int]) -> None:
    """The training objective sends this process signal calls[n] during its n-th call (1-based)."""
    real, count = ElboObjective.__call__, {"n": 0}

    def signalling(self, model, x, kl_weight):
        count["n"] += 1
        if count["n"] in calls:
            os.kill(os.getpid(), calls[count["n"]])
        return real(self, model, x, kl_weight)

    monkeypatch.setattr(ElboObjective, "__call__", signalling)


def epoch_records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines() if "train_elbo" in line]


@pytest.mark.parametrize("signum, call", [(signal.SIGINT, 11), (signal.SIGTERM, 8)])
def test_a_signal_stops_after_its_step_and_puts_the_handlers_back(idx_dir, tmp_path, monkeypatch, signum, call):
    """Ctrl-C mid-epoch, and SIGTERM in an epoch's last step: then the epoch's record and its checkpoint come
    first. Either way the resume equals an uninterrupted run, and the previous handlers are back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    straight, run = tmp_path / "straight", tmp_path / "run"
    fit(tiny_cfg(idx_dir), straight, progress=False)
    signal_at_calls(monkeypatch, {call: signum})
    with pytest.raises(TrainingStopped) as stopped:
        fit(tiny_cfg(idx_dir), run, progress=False)
    assert stopped.value.step == call == saved_step(run) and stopped.value.signum == signum
    assert {s: signal.getsignal(s) for s in before} == before
    assert [r["epoch"] for r in epoch_records(run)] == list(range(1, call // 8 + 1))
    fit(tiny_cfg(idx_dir), run, resume=True, progress=False)
    assert_same_training_state(run, straight)
    assert epoch_records(run) == epoch_records(straight)


def test_a_signal_in_the_last_step_lets_the_run_finish(idx_dir, tmp_path, monkeypatch):
    signal_at_calls(monkeypatch, {24: signal.SIGTERM})  # 3 epochs of 8 steps
    fit(tiny_cfg(idx_dir), tmp_path / "run", progress=False)
    assert saved_step(tmp_path / "run") == 24


def test_training_in_another_thread_runs_without_signal_handlers(idx_dir, tmp_path):
    """Python runs signal handlers in the main thread only, and installs them only there."""
    done = []

    def train_in_a_thread():
        fit(tiny_cfg(idx_dir, **{"train.epochs": 1}), tmp_path / "run", progress=False)
        done.append(True)

    worker = threading.Thread(target=train_in_a_thread)
    worker.start()
    worker.join(120)
    assert done == [True] and saved_step(tmp_path / "run") == 8


# --- checkpoints by wall time -----------------------------------------------------------------------------------

def test_checkpoint_minutes_writes_checkpoints_and_a_resume_from_one_is_bitwise(idx_dir, tmp_path, monkeypatch):
    """A clock that advances 1 minute per reading, checkpoint_minutes 2: a checkpoint about every other step. The
    run that crashes (KeyboardInterrupt in step 14) resumes from the timed checkpoint before it and ends bitwise
    equal to an uninterrupted run without timed checkpoints."""
    import hvae.loop as loop

    straight, run = tmp_path / "straight", tmp_path / "run"
    fit(tiny_cfg(idx_dir, **{"train.checkpoint_minutes": 0}), straight, progress=False)
    now = iter(range(10**6))
    monkeypatch.setattr(preemption, "monotonic", lambda: 60.0 * next(now))
    real_save, steps = loop.save, []
    monkeypatch.setattr(loop, "save", lambda out, fabric, state, *a: (steps.append(state.step),
                                                                      real_save(out, fabric, state, *a)))
    real, calls = ElboObjective.__call__, {"n": 0}

    def crashes_in_step_14(self, *args):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(ElboObjective, "__call__", crashes_in_step_14)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_cfg(idx_dir, **{"train.checkpoint_minutes": 2}), run, progress=False)
    timed = [s for s in steps if s % 8]  # not at an epoch end
    assert len(timed) >= 4 and saved_step(run) == steps[-1] == timed[-1] and 8 < timed[-1] < 14
    monkeypatch.setattr(ElboObjective, "__call__", real)
    fit(tiny_cfg(idx_dir, **{"train.checkpoint_minutes": 2}), run, resume=True, progress=False)
    assert_same_training_state(run, straight)


def test_checkpoint_minutes_is_declared_with_its_range():
    assert Config().train.checkpoint_minutes == 10.0
    assert apply(Config(), {"train.checkpoint_minutes": 0.5}).train.checkpoint_minutes == 0.5
    with pytest.raises(ConfigError, match="train.checkpoint_minutes must be >= 0"):
        apply(Config(), {"train.checkpoint_minutes": -1})


# --- one command to start or resume -----------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_auto_resume_starts_a_new_folder_resumes_the_same_config_and_refuses_another(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--auto-resume", "--data-dir", str(idx_dir.parent), "--out", str(run), *TINY]
    assert main([*args, "--epochs", "1"]) == 0  # new folder: starts
    assert main([*args, "--epochs", "2"]) == 0  # same config (more epochs): resumes
    assert "resuming it from its last checkpoint" in capsys.readouterr().err
    assert [r["epoch"] for r in epoch_records(run)] == [1, 2] and saved_step(run) == 16
    assert len(json.loads((run / "provenance.json").read_text())["resumes"]) == 1
    before = snapshot(run)
    assert main([*args, "--epochs", "2", "--seed", "1"]) == 2  # another config: refused, nothing touched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hvae train: error: auto-resume: ") and "train.seed is 0 there, 1 here" \
        in err[0] and "(set by --seed)" in err[0], err
    assert snapshot(run) == before
    for extra in (["--overwrite"], ["--resume", str(run)]):
        assert main([*args, *extra]) == 2
        assert "--auto-resume starts or resumes the run by itself" in capsys.readouterr().err


def test_auto_resume_restarts_a_run_that_never_reached_a_checkpoint_and_refuses_other_files(idx_dir, tmp_path, capsys):
    def args(out: Path) -> list[str]:
        return ["train", "--auto-resume", "--data-dir", str(idx_dir.parent), "--out", str(out), *TINY, "--epochs", "1"]

    run, other = tmp_path / "run", tmp_path / "other"
    assert main(args(run)) == 0
    for stale in (run / "checkpoints" / "last").iterdir():
        stale.unlink()  # as if preempted before its first checkpoint
    assert main(args(run)) == 0 and saved_step(run) == 8
    assert "it has no checkpoint yet, so it starts again" in capsys.readouterr().err
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(args(other)) == 2  # not a run: the usual refusal of a non-empty folder
    assert "exists and is not empty" in capsys.readouterr().err and os.listdir(other) == ["notes.txt"]


def test_auto_resume_from_python(idx_dir, tmp_path):
    config = {"model": {"hidden": [32], "latent_dim": 4}, "train": {"epochs": 1, "batch_size": 32},
              "runtime": {"threads": 1}}
    hvae.train(config, tmp_path / "run", data_dir=str(idx_dir.parent), auto_resume=True, progress=False)
    hvae.train(config, tmp_path / "run", data_dir=str(idx_dir.parent), auto_resume=True, progress=False,
               train__epochs=2)
    assert saved_step(tmp_path / "run") == 16
    with pytest.raises(ConfigError, match="model.latent_dim is 4 there, 5 here"):
        hvae.train(config, tmp_path / "run", data_dir=str(idx_dir.parent), auto_resume=True, model__latent_dim=5)


# --- other commands: no half-written output -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--data-dir", str(data), "--out", str(run), *TINY, "--epochs", "1"]) == 0
    return run


def interrupt_png(monkeypatch):
    from PIL import Image

    def half_then_interrupt(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_interrupt)


def sigterm_png(monkeypatch):
    from PIL import Image

    def half_then_sigterm(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half")
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the CLI turns it into an unwinding exit

    monkeypatch.setattr(Image.Image, "save", half_then_sigterm)


def interrupt_npz(monkeypatch):
    import numpy as np

    def half_then_interrupt(file, **arrays):
        file.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", half_then_interrupt)


def interrupt_html(monkeypatch):
    def written_then_interrupt(fd):  # the page is in the temporary file, not yet renamed into place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", written_then_interrupt)


@pytest.mark.parametrize("command, name, interrupt, code", [
    (["sample", "--n", "4"], "sample.png", interrupt_png, 130),
    (["reconstruct", "--n", "4"], "reconstruct.png", sigterm_png, 128 + signal.SIGTERM),
    (["encode", "--limit", "8"], "latents.npz", interrupt_npz, 130),
    (["report", "--k", "2", "--limit", "16", "--n", "4", "--no-progress"], "report.html", interrupt_html, 130)])
def test_an_interrupted_command_leaves_the_old_file_or_none(trained, tmp_path, monkeypatch, capsys, command, name,
                                                            interrupt, code):
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    out.mkdir()
    interrupt(monkeypatch)
    for old in (None, b"the old file"):  # no file yet, then an older one
        if old is not None:
            (out / name).write_bytes(old)
        assert main([command[0], str(trained), *command[1:], "--out", str(out / name)]) == code
        assert capsys.readouterr().err in (f"hvae {command[0]}: interrupted\n", f"hvae {command[0]}: SIGTERM: "
                                           "stopped; no output file is left half-written\n")
        assert os.listdir(out) == ([] if old is None else [name])  # no temporary file left either
        if old is not None:
            assert (out / name).read_bytes() == old
    assert signal.getsignal(signal.SIGTERM) == before
