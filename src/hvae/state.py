"""The training state that a checkpoint carries besides the weights, and that a resume restores exactly.

Randomness is restartable: the epoch order is a function of (seed, epoch), and the binarization and
reparameterization RNG streams travel in each checkpoint, so a resumed run replays an uninterrupted one exactly on
a CPU. With several processes, every rank's streams and epoch sums travel too (under "ranks"), so a DDP run resumed
on as many processes replays exactly as well. The checkpoint's state keys are those of every hvae run so far
(older checkpoints load).
"""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor


def rng_state(gen: torch.Generator, device: torch.device, world: int = 1) -> dict:
    """The RNG streams a resumed run must continue: torch's CPU stream, the data stream, and on CUDA the device's
    stream (where the reparameterization noise is drawn). Rank 0's streams only: with several processes a
    resume does not replay the other ranks' noise exactly (so their CUDA stream is not overwritten by rank 0's)."""
    state = {"torch": torch.get_rng_state(), "data": gen.get_state(), "data_device": gen.device.type}
    if device.type == "cuda" and world == 1:
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    """Restores what rng_state saved. A run resumed on another kind of device (e.g. trained on a GPU, resumed on
    a CPU) cannot continue that device's streams: they start afresh from the run's seeds, and a note says so."""
    torch.set_rng_state(state["torch"])
    saved_on = state.get("data_device", "cpu")  # checkpoints before this key: the data stream was on the CPU
    if saved_on == gen.device.type:
        gen.set_state(state["data"])
    else:
        print(f"note: trained on {saved_on}, resumed on {gen.device.type}: the binarization noise and sampling "
              "noise go on as new streams (the data order is the same)", file=sys.stderr)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainState:
    """Step, fault counters, the update guard's runs of bad and skipped steps, the epoch's running sums
    [elbo, reconstruction, kl, applied steps] and its seconds so far, the data RNG stream `data_gen`, and the
    thread policy's choice `threads` ({count, mode}, threads.py; None before a choice and in older checkpoints),
    which a fixed-mode resume must use again."""

    def __init__(self, data_gen: torch.Generator, device: torch.device):
        self.data_gen, self.device = data_gen, device
        self.step = 0
        self.counters = {"skipped": 0, "nonfinite": 0, "clipped_after_skips": 0}
        self.bad_in_a_row = self.skips_in_a_row = 0
        self.sums = torch.zeros(4, device=device)
        self.epoch_started = time.perf_counter()
        self.threads: dict | None = None
        self._carried: tuple[list[float], float] | None = None  # a mid-epoch checkpoint's sums and seconds

    def start_epoch(self, first_step_in_epoch: int) -> None:
        """Zero the epoch's sums and clock, or, resumed mid-epoch, go on with the checkpoint's (so a resumed
        run reports the whole epoch's means)."""
        self.sums, self.epoch_started = torch.zeros(4, device=self.device), time.perf_counter()
        if first_step_in_epoch > 0 and self._carried is not None:
            sums, seconds = self._carried
            self.sums, self.epoch_started = torch.tensor(sums, device=self.device), self.epoch_started - seconds
        self._carried = None

    def add(self, batch_means: Tensor, applied: Tensor | bool) -> None:
        """Count a step's batch means [elbo, reconstruction, kl, 1] into the epoch's sums if its update was applied
        (`applied`: a device bool [] from a deferred guard, else a bool)."""
        if isinstance(applied, Tensor):
            self.sums += torch.where(applied, batch_means, 0.0)
        elif applied:
            self.sums += batch_means

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_started

    def state_dict(self, world: int = 1, ranks: dict | None = None) -> dict:
        """What a checkpoint stores of this record (the caller adds optimizer, scaler and data shape). `ranks`: with
        several ranks, their rank_record()s all-gathered ([world, ...] per tensor), stored as one record per rank."""
        saved = {"step": self.step, "counters": self.counters, "rng": rng_state(self.data_gen, self.device, world),
                 "guard": [self.bad_in_a_row, self.skips_in_a_row], "epoch_sums": self.sums.tolist(),
                 "epoch_seconds": self.epoch_seconds()}
        if self.threads is not None:
            saved["threads"] = dict(self.threads)
        if ranks is not None:
            saved["ranks"] = [{"rng": {**{k: v[r].cpu() for k, v in ranks["rng"].items()},
                                       "data_device": self.data_gen.device.type},
                               "epoch_sums": ranks["epoch_sums"][r].tolist()} for r in range(world)]
        return saved

    def rank_record(self) -> dict:
        """This rank's own RNG streams (its CUDA stream too) and epoch sums, as tensors of the same shapes on every
        rank, for rank 0 to gather into the checkpoint."""
        rng = {k: v for k, v in rng_state(self.data_gen, self.device).items() if isinstance(v, Tensor)}
        return {"rng": rng, "epoch_sums": self.sums}

    def load_state_dict(self, saved: dict, rank: int = 0, world: int = 1) -> None:
        """Restore step, counters, guard runs, RNG streams, the epoch so far and the thread choice (keys older
        checkpoints lack keep their start values). With as many ranks as saved ones, each rank takes back its own streams and sums."""
        self.step, self.counters = saved["step"], saved["counters"]
        self.bad_in_a_row, self.skips_in_a_row = saved.get("guard", (0, 0))
        self.threads = saved.get("threads")
        own = saved["ranks"][rank] if world > 1 and len(saved.get("ranks", [])) == world else saved
        if "epoch_sums" in saved:
            self._carried = (own["epoch_sums"], saved["epoch_seconds"])
        set_rng_state(own["rng"], self.data_gen, self.device)
