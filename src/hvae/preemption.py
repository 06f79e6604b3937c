"""Training that survives preemption: a signal stops it cleanly, and checkpoints also come by wall time.

Schedulers stop a job with SIGTERM (SLURM on preemption or, with `--signal`, before the time limit; Kubernetes on
eviction; spot machines on reclaim), then SIGKILL after a grace period, then requeue the same command. While
training runs, SIGTERM and SIGINT (Ctrl-C) ask it to stop: the step under way finishes, a checkpoint is written at
it, and the loop raises TrainingStopped (`hvae train` then exits with EXIT_STOPPED). A second signal leaves at once
(StopNow): a checkpoint being written is dropped whole (checkpoint.save_checkpoint), the previous one stays.
`train.checkpoint_minutes` bounds what a SIGKILL loses: a checkpoint comes when that much wall time has passed
since the last one.

Under DDP every rank must stop, and write its share of a checkpoint, after the same step, whichever rank got the
signal and whatever each rank's clock says. Every AGREE_EVERY steps the ranks start an all-reduce (the maximum) of
[the signal that arrived here, this rank's clock says a checkpoint is due], and read the one they started
AGREE_EVERY steps before: every rank acts on the same flags after the same step, and no step waits for the
exchange, which has run while the steps in between computed (a blocking exchange at every step cost 8-11% of a step
more than none on a loaded 2-core machine: BENCHMARKS.md, "Preemption"). So under DDP a stop comes within 2 * AGREE_EVERY
steps of the signal. The exchange runs on a gloo group of its own: on GPUs too it moves a CPU tensor and never
waits for the device.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from time import monotonic

import torch

__all__ = ["EXIT_STOPPED", "Preemption", "TrainingStopped", "StopNow", "sigterm_interrupts"]

# `hvae train`'s exit code after a signal stopped training with a checkpoint (0, 1 and 2 are taken; 128 + N is a
# shell's "killed by signal N", which is what a second signal gives).
EXIT_STOPPED = 3
SIGNALS = (signal.SIGTERM, signal.SIGINT)
AGREE_EVERY = 8  # under DDP: steps between the ranks' exchanges of their flags


class TrainingStopped(KeyboardInterrupt):
    """A signal stopped training after step `step`, and a checkpoint holds that step: resume to go on.

    A KeyboardInterrupt, so that code catching Exception around training does not carry on after a stop request."""

    def __init__(self, signum: int, step: int, steps: int, out, rank: int):
        self.signum, self.step, self.out, self.rank = signum, step, out, rank
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of {steps}; the checkpoint "
                         f"in {out} holds it")


class StopNow(KeyboardInterrupt):
    """A signal that stops at once: a second one while training stops, or SIGTERM in another command
    (sigterm_interrupts). `hvae` exits with 128 + its number, as a shell reports a kill by that signal."""

    def __init__(self, signum: int, what: str):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name}: {what}")


class Preemption:
    """When the training loop checkpoints and stops. It holds the SIGTERM and SIGINT handlers (installed by `start`,
    the previous ones put back by `close`; only in the main thread, where Python runs signal handlers) and the clock
    of `checkpoint_minutes`.

    `train`: the config's `train` section (checkpoint_every, checkpoint_minutes); `world`: the number of ranks.
    """

    def __init__(self, train, world: int = 1):
        self.every, self.seconds, self.world = train.checkpoint_every, 60.0 * train.checkpoint_minutes, world
        self.signum = 0  # the first signal received here (0: none)
        self.stop = 0  # the signal every rank agreed to stop on (0: none)
        self.group = None
        self.pending = None  # under DDP: the last flags sent, and their all-reduce under way
        self.previous: dict[int, object] = {}

    def start(self) -> Preemption:
        if self.world > 1:  # why a group of its own: a CPU tensor on every backend (no device sync under NCCL)
            self.group = torch.distributed.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        self.last_save = monotonic()
        return self

    def close(self) -> None:
        if self.pending is not None:  # every rank started it, so it completes; its result is not needed
            try:
                self.pending[1].wait()
            except RuntimeError:  # e.g. a rank that failed has closed its connections
                pass
            self.pending = None
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: not set from Python
        self.previous = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum:
            raise StopNow(signum, "a second signal, stopped at once; the last whole checkpoint is kept")
        self.signum = signum

    def checkpoint_due(self, step: int) -> bool:
        """After step `step` (every rank): is a checkpoint due (checkpoint_every steps, checkpoint_minutes since the
        last one, or a stop asked for)? Sets `stop` to the signal to stop on: with one process at once, under DDP as
        the ranks agreed (see the module docstring)."""
        late = self.seconds > 0 and monotonic() - self.last_save >= self.seconds
        self.stop, late = (self.signum, late) if self.group is None else self.agreed(step, self.signum, late)
        return bool(self.every and step % self.every == 0) or late or bool(self.stop)

    def agreed(self, step: int, signum: int, late: bool) -> tuple[int, bool]:
        """Under DDP, after step `step`: (signal, checkpoint due) as every rank sent them AGREE_EVERY steps before,
        their maximum; at the other steps, and at the first exchange, nothing."""
        if step % AGREE_EVERY:
            return 0, False
        stop, due = 0, False
        if self.pending is not None:
            flags, exchange = self.pending
            exchange.wait()  # done by now, as a rule
            stop, due = int(flags[0]), bool(flags[1])
        # read AGREE_EVERY steps on; a checkpoint agreed now restarts every rank's clock, so that one is not asked again
        flags = torch.tensor([float(signum), float(late and not due)])
        self.pending = (flags, torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, group=self.group,
                                                            async_op=True))
        return stop, due

    def saved(self, step: int, steps: int, out, rank: int = 0, finished: bool = False) -> None:
        """A checkpoint at `step` is written: restart the clock; then stop (every rank) if a signal asked to, unless
        the run has `finished` anyway."""
        self.last_save = monotonic()
        if self.stop and not finished:
            raise TrainingStopped(self.stop, step, steps, out, rank)


@contextmanager
def sigterm_interrupts():
    """SIGTERM raises StopNow, as Ctrl-C raises KeyboardInterrupt (in the main thread; the previous handler is put
    back after): a command stopped by a scheduler unwinds, and a file it was writing atomically is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise StopNow(signum, "stopped; no output file is left half-written")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
