"""DDP on CPU (gloo) through Lightning Fabric: two processes train like one with the same global batch.

One process and two do not see the same randomness (binarization and reparameterization noise are drawn
per rank), so trajectories are compared with a tolerance set by the seed-to-seed spread measured here.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import make_idx_dir


def run(out: Path, data: Path, seed: int, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "hvae", "train", "--data-dir", str(data), "--epochs", "4", "--batch-size", "64",
           "--set", "model.hidden=[64]", "--set", "model.latent_dim=4", "--set", "train.log_every=1",
           "--set", "runtime.threads=1", "--no-progress", "--device", "cpu", "--seed", str(seed), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_track_one_process(tmp_path):
    make_idx_dir(tmp_path / "fashion-mnist", n_train=512)
    single = run(tmp_path / "s0", tmp_path, 0)
    other_seed = run(tmp_path / "s1", tmp_path, 1)
    ddp = run(tmp_path / "d0", tmp_path, 0, "--devices", "2", "--strategy", "ddp")

    def losses(records):
        return np.array([r["loss"] for r in records if "loss" in r])

    assert len(losses(ddp)) == len(losses(single)) == 4 * (512 // 64)  # same global batch -> same step count
    gap = np.abs(losses(ddp) - losses(single)).mean()
    spread = np.abs(losses(other_seed) - losses(single)).mean()
    assert gap < spread, (gap, spread)
    final = [next(r for r in reversed(rs) if "train_elbo" in r)["train_elbo"] for rs in (single, other_seed, ddp)]
    assert abs(final[2] - final[0]) < abs(final[1] - final[0]) + 2.0
    assert statistics.fmean(losses(ddp)[-8:]) < statistics.fmean(losses(ddp)[:8]) - 50  # and it learns
    assert json.loads((tmp_path / "d0" / "config.json").read_text())["runtime"]["devices"] == 2
    # the ranks hold the same weights at every epoch end, bit for bit (their gradients are averaged)
    gaps = [r["rank_weight_gap"] for r in ddp if "train_elbo" in r]
    assert len(gaps) == 4 and gaps == [0.0] * 4


def test_the_ranks_shares_of_a_global_batch_partition_it():
    from hvae.loop import rank_slice

    for world in (1, 2, 4):
        for i in (0, 3):
            shares = [range(1000)[rank_slice(i, 64, rank, world)] for rank in range(world)]
            assert sorted(j for share in shares for j in share) == list(range(i * 64, (i + 1) * 64))
