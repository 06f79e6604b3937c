"""How many CPU threads torch computes with: `runtime.threads` = N pins N; 0, the default, measures.

Why measure (issue 18): PyTorch's default is one intra-op thread per core, and when another process takes one of
those cores the threads wait on each other: on a 2-core machine the default VAE's 2-epoch run went from 7.2 s to
24.3 s beside one busy process, while one thread ran 11.6 s either way. No fixed count is best both ways, so the
policy times the candidate counts on this machine, now, and keeps the fastest.

1. Candidates: 1, 2, 4, ... and the cap (thread_cap): the cores this process may use (its CPU affinity, a cgroup
   CPU quota, OMP_NUM_THREADS when set), shared out among the DDP ranks on this machine.
2. Determinism, measured rather than assumed: one throwaway forward+backward on the same batch and noise at every
   candidate. Bitwise-equal loss, gradients and gradient norm -> "adaptive": the count may change mid-run, as
   results do not depend on it. Else "fixed": chosen once, saved in the checkpoint, and a resume uses it, so a
   resumed run still equals an uninterrupted one bit for bit (two fresh runs may choose differently: pin
   runtime.threads to the recorded count to repeat a run bit for bit).
3. Timing: ROUNDS rounds, each candidate in turn: one pass that is no sample (it wakes the threads), then PASSES
   timed; the median per count; the fastest wins, a smaller count within TIE of it winning ties. Why interleaved:
   a load that comes or goes during the measurement falls on every count alike.
4. Adaptive mode re-measures when the median step time over the last WINDOW steps drifts by DRIFT either way from
   the one after the last choice, or RECHECK steps after it (a count chosen on a busy machine does not see the
   load leave: one thread runs as fast either way); never within MIN_GAP steps of the last measurement.

The passes are throwaway: forward and backward only, the RNG streams forked, the gradients and buffers put back,
no optimizer step, no EMA update; so a measured run trains exactly as one pinned to the count it chose.
Cost: at most candidates x ROUNDS x (1 + PASSES) passes per measurement, plus one per candidate for the
determinism check; with 2 cores, 18 passes at the start (a pass is a training step without its update): 4% of the
steps of one epoch of the default VAE (468 steps), and in adaptive mode 16 more every RECHECK = 2000 steps (0.8%).
On a busy machine the slow count's passes cost most (each may take several steps' time), so a count SKIP x slower
than the best on its first pass gets no more, and one PRUNE x slower after the first round is not timed again.
The candidates grow as log2 of the cores (8 on 128 cores: at most 72 passes).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter
from typing import Callable

import torch
from torch import Tensor, nn

ROUNDS, PASSES, TIE, PRUNE, SKIP = 2, 3, 0.02, 1.5, 4.0
WINDOW, DRIFT, MIN_GAP, RECHECK = 25, 1.5, 200, 2000
PROBE_SEED = 0

Probe = Callable[[bool], "list[Tensor] | None"]  # probe(keep) runs one throwaway pass; keep: -> its outputs


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n for the block, then given back (work whose bits must not depend on the
    caller's count, e.g. training the sample-quality feature network)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, lowered by a cgroup v2 CPU quota (a container's --cpus)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def omp_limit() -> int | None:
    """OMP_NUM_THREADS when set to a positive count (the user's, or Fabric's: its DDP launcher sets cores // ranks)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def thread_cap(cores: int, local_ranks: int = 1, limit: int | None = None) -> int:
    """Most threads per process: the cores shared out among the processes on this machine (so ranks x threads
    never oversubscribes them), and no more than `limit` (OMP_NUM_THREADS) when given; at least 1."""
    return max(1, min(cores // max(1, local_ranks), limit or math.inf))


def candidates(cap: int) -> list[int]:
    """The counts tried: powers of two below the cap, and the cap. [1] for 1, [1, 2, 4, 6] for 6."""
    return [n for n in (2 ** i for i in range(cap.bit_length())) if n < cap] + [cap]


def throwaway(run: Callable[[], Tensor], params: list[Tensor], module: nn.Module, keep: bool) -> list[Tensor] | None:
    """One pass of run() (forward and backward -> the loss) that leaves no trace: the CPU RNG stream forked and
    seeded (every call draws the same noise), the gradients and buffers (e.g. batch-norm statistics) put back.
    keep: -> [loss, gradient norm (as the update guard computes it), *gradients], copies; else None."""
    from .optim import grad_norm

    grads, buffers, out = [p.grad for p in params], [b.detach().clone() for b in module.buffers()], None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PROBE_SEED)
            for p in params:
                p.grad = None
            loss = run()
            if keep:
                out = [loss.detach().clone(), grad_norm(params).clone(),
                       *(p.grad.detach().clone() for p in params if p.grad is not None)]
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in zip(module.buffers(), buffers):
                b.copy_(saved)
    return out


def same_results(probe: Probe, counts: list[int]) -> bool:
    """Do the probe's outputs come out bitwise equal at every count? (NaN counts as unequal: fixed, the safe side.)"""
    first = None
    for n in counts:
        set_threads(n)
        out = probe(True)
        if first is None:
            first = out
        elif len(out) != len(first) or not all(torch.equal(a, b) for a, b in zip(first, out)):
            return False
    return True


def time_counts(probe: Probe, counts: list[int], clock: Callable[[], float], rounds: int = ROUNDS,
                passes: int = PASSES, agree: Callable[[Tensor], Tensor] | None = None) -> dict[int, float]:
    """Median seconds of one probe pass at each count (see the module docstring, 3). On a busy machine a slow
    count's passes are the dear ones: one whose first pass alone takes SKIP x the best median so far gets no more
    (one process only), and one more than PRUNE x slower than the best after a round is not timed again.
    agree: under DDP the mean over the ranks, so every rank prunes and picks alike."""
    samples: dict[int, list[float]] = {n: [] for n in counts}
    live, seconds = list(counts), {}
    for _ in range(rounds):
        for n in live:
            set_threads(n)
            t0 = clock()
            probe(False)  # not a sample: a count's first pass after a change wakes its threads
            first, best = clock() - t0, min((statistics.median(v) for v in samples.values() if v), default=None)
            if agree is None and best is not None and first > SKIP * best:
                samples[n].append(first)
                continue
            for _ in range(passes):
                t0 = clock()
                probe(False)
                samples[n].append(clock() - t0)
        medians = torch.tensor([statistics.median(samples[n]) for n in counts], dtype=torch.float64)
        seconds = dict(zip(counts, (agree(medians) if agree else medians).tolist()))
        live = [n for n in live if seconds[n] <= PRUNE * min(seconds.values())]
    return seconds


def fastest(seconds: dict[int, float], tie: float = TIE) -> int:
    """The count with the lowest time; a smaller count within `tie` (relative) of it wins (fewer threads leave
    cores to the rest of the machine, and the times differ by noise only)."""
    best = min(seconds.values())
    return min(n for n, s in seconds.items() if s <= best * (1 + tie))


class ThreadPolicy:
    """The thread count of one training run (see the module docstring). `start` chooses it, `tick` (once per step)
    re-measures in adaptive mode; `choice` ({count, mode}) is what a checkpoint saves (TrainState.threads is this
    same dict, so a switch shows in the next checkpoint), `info` what provenance.json records.

    pinned: runtime.threads (0: measure); cap: thread_cap(...); cpu: measured only on a CPU (elsewhere the count is
    PyTorch's); clock: seconds (time.perf_counter); agree: DDP's mean over ranks (None: one process)."""

    def __init__(self, pinned: int, cap: int, cpu: bool = True, clock: Callable[[], float] | None = None,
                 agree: Callable[[Tensor], Tensor] | None = None):
        self.pinned, self.cap, self.cpu, self.agree = pinned, cap, cpu, agree
        self.clock = clock or perf_counter
        self.default = torch.get_num_threads()  # the count before any choice: that of a run older than the policy
        self.choice = {"count": pinned or self.default, "mode": "pinned" if pinned else "default"}
        self.info: dict = {**self.choice, "reason": f"runtime.threads={pinned}" if pinned else "PyTorch's default"}
        self.probe: Probe | None = None
        self.window: deque[float] = deque(maxlen=WINDOW)
        self.baseline = self.last = None
        self.measured_at = 0

    def start(self, probe: Probe, step: int = 0, recorded: dict | None = None, resumed: bool = False) -> dict | None:
        """Choose the count. recorded: on a resume, the checkpoint's choice (None in a run older than the policy).
        -> the metrics record of the choice, or None where there was nothing to choose (pinned, not a CPU, 1 core)."""
        counts = candidates(self.cap)
        if self.pinned:
            set_threads(self.pinned)
            return None
        if not self.cpu:  # PyTorch's count for the host side of a GPU run
            return None
        if len(counts) == 1:
            set_threads(1)
            self.choice.update(count=1, mode="single")
            self.info = {**self.choice, "reason": "one core available to this process"}
            return None
        saved = recorded.get("count") if isinstance(recorded, dict) else None
        saved = saved if isinstance(saved, int) and saved >= 1 else None
        if resumed and saved and recorded.get("mode") == "fixed":
            return self._choose(step, saved, "fixed", "resumed with the run's saved count (fixed mode)", {})
        self.probe = probe
        same = same_results(probe, counts)
        if self.agree is not None:  # every rank must agree: adaptive only where all found equal results
            same = bool(self.agree(torch.tensor([float(same)], dtype=torch.float64)).item() == 1.0)
        if resumed and not same:  # the count the run was trained with, so the resume stays bitwise
            return self._choose(step, saved or self.default, "fixed", "resumed with the run's saved count" if saved
                                else "resumed a run older than the thread policy with the count it had", {})
        mode = "adaptive" if same else "fixed"
        return self._measure(step, mode, f"start ({mode}: results {'do not ' if same else ''}depend on the count)")

    def tick(self, step: int) -> dict | None:
        """After each training step (`step` steps done): keep the step times; in adaptive mode re-measure on a
        drift or after RECHECK steps. -> the metrics record of a new measurement, else None."""
        if self.choice["mode"] != "adaptive":
            return None
        now = self.clock()
        if self.last is not None:
            self.window.append(now - self.last)
        self.last = now
        if step % WINDOW or len(self.window) < WINDOW:
            return None
        median = statistics.median(self.window)
        if self.baseline is None:
            self.baseline = median
            return None
        since, ratio = step - self.measured_at, median / self.baseline
        drift = since >= MIN_GAP and (ratio > DRIFT or ratio < 1 / DRIFT)
        due = drift or since >= RECHECK
        if self.agree is not None:  # every rank measures, or none
            due = bool(self.agree(torch.tensor([float(due)], dtype=torch.float64)).item() > 0)
        if not due:
            return None
        reason = f"drift: step time {ratio:.2f}x that after the last choice" if drift else \
            f"recheck after {since} steps"
        return self._measure(step, "adaptive", reason)

    def _measure(self, step: int, mode: str, reason: str) -> dict:
        seconds = time_counts(self.probe, candidates(self.cap), self.clock, agree=self.agree)
        return self._choose(step, fastest(seconds), mode, reason, seconds)

    def _choose(self, step: int, count: int, mode: str, reason: str, seconds: dict[int, float]) -> dict:
        set_threads(count)
        previous = self.choice["count"]
        self.choice.update(count=count, mode=mode)
        self.info = {**self.choice, "reason": reason, "cap": self.cap,
                     "ms_per_pass": {str(n): round(1e3 * s, 3) for n, s in seconds.items()}}
        self.window.clear()
        self.baseline, self.last, self.measured_at = None, None, step
        return {"step": step, "threads": {"chosen": count, "previous": previous, "mode": mode, "reason": reason,
                                          "tried": [int(n) for n in seconds], "ms_per_pass": self.info["ms_per_pass"]}}


def eval_probe(model: nn.Module, x: Tensor, k: int, batch_size: int, draws: int = 1) -> Probe:
    """A throwaway evaluation call for choose_for_eval: one decoder chunk of the IW bound on the first batch (the
    call hvae eval repeats k / chunk times per batch), or one draw of a stochastic bound's batch; RNG forked."""
    from .evaluate import EXPLICIT_LEVELS, capabilities, iw_chunk, stochastic_bound_of
    from .objectives import log_importance_weights

    xb, can = x[:batch_size], capabilities(model)
    explicit = EXPLICIT_LEVELS in can
    chunk = iw_chunk(model, xb, k, batch_size) if explicit else 0
    bound = None if explicit or not can else stochastic_bound_of(model, draws)

    def probe(keep: bool = False) -> None:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            if explicit:
                log_importance_weights(model, xb, chunk, chunk)
            elif can:  # (a model with neither: nothing to time; evaluate says what it lacks)
                bound(xb)
    return probe


def choose_for_eval(probe: Probe, pinned: int, cpu: bool = True, clock: Callable[[], float] | None = None) -> dict:
    """hvae eval's count, chosen once: `pinned` (the run's runtime.threads) when > 0, else the fastest over two
    rounds of an untimed and a timed probe call per candidate (an evaluation is not resumed: no determinism check).
    -> {count, mode, ms_per_call}; a note on stderr when measured."""
    counts = candidates(thread_cap(available_cores(), 1, omp_limit()))
    if pinned or not cpu or len(counts) == 1:
        count = pinned or (1 if cpu else torch.get_num_threads())
        set_threads(count)
        return {"count": count, "mode": "pinned" if pinned else "single" if cpu else "default", "ms_per_call": {}}
    seconds = time_counts(probe, counts, clock or perf_counter, rounds=2, passes=1)
    count = fastest(seconds)
    set_threads(count)
    ms = {str(n): round(1e3 * s, 3) for n, s in seconds.items()}
    print(f"hvae eval: {count} thread(s), the fastest per evaluation call: "
          + ", ".join(f"{n} -> {t:.1f} ms" for n, t in ms.items()), file=sys.stderr)
    return {"count": count, "mode": "measured", "ms_per_call": ms}
