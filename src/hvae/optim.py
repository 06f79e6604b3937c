"""From a gradient to an update: the optimizer, the weight average (EMA) and the update guard.

The guard decides whether a computed gradient is applied: a non-finite loss or gradient skips the update and is
counted (training stops after `optim.max_nonfinite` in a row); a gradient norm above `optim.skip_threshold` skips
it, but after `optim.max_skips` skips in a row the update is clipped instead, so training never stalls (VDVAE's
skip is unbounded); `optim.grad_clip` clips every applied update.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the last good checkpoint is kept."""


def make_optimizer(optim, params) -> torch.optim.Optimizer:
    """Adam (fused: one pass over the parameters, several times faster than the default on a CPU), AdamW where
    optim.weight_decay > 0 (w <- w (1 - lr wd) besides the Adam step), or Adamax (weight_decay as an L2 term).
    `optim`: the config's `optim` section."""
    if optim.optimizer == "adam":
        if optim.weight_decay > 0:
            return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
        return torch.optim.Adam(params, lr=optim.lr, fused=True)
    return torch.optim.Adamax(params, lr=optim.lr, weight_decay=optim.weight_decay)


def spectral_penalty(model: nn.Module) -> Tensor:
    """NVAE's spectral regularization term (Vahdat & Kautz 2020, eq. 4): sum_l sigma_max(W_l) over the model's conv,
    transposed-conv and linear weights, each W_l seen as a matrix [out, in x kernel] (a transposed conv's [in, out x
    kernel]). Exact largest singular values in float32, sigma_max = sqrt(lambda_max(G)) of the smaller Gram matrix G
    (W W^T or W^T W, at most 64 x 64 here), not NVAE's one power iteration per step: it keeps no state (a resumed run
    computes the same term), and costs a few ms a step where an SVD of the vector top's 64 x 3136 weight took 100.
    -> [] float32; the loop adds optim.spectral_reg times it."""
    sigmas = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            w = m.weight.float().flatten(1)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            sigmas.append(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt())
    return torch.stack(sigmas).sum() if sigmas else torch.zeros(())


def lr_at(optim, step: int, steps_per_epoch: int) -> float:
    """The learning rate of update `step` (0 first), a function of the step alone (so a resumed run follows the
    same schedule): optim.lr, or with optim.schedule cosine, lr_min + (lr - lr_min) (1 + cos(pi u)) / 2 at
    u = step / (decay_epochs x steps_per_epoch), held at lr_min after u = 1 (NVAE's schedule); times the linear
    warm-up min(1, (step + 1) / (lr_warmup_epochs x steps_per_epoch)) when optim.lr_warmup_epochs > 0."""
    lr = optim.lr
    if optim.schedule == "cosine":
        u = min(1.0, step / (optim.decay_epochs * steps_per_epoch))
        lr = optim.lr_min + (optim.lr - optim.lr_min) * 0.5 * (1.0 + math.cos(math.pi * u))
    if optim.lr_warmup_epochs > 0:
        lr *= min(1.0, (step + 1) / (optim.lr_warmup_epochs * steps_per_epoch))
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of the weights (evaluated instead of the raw weights when on)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, applied: Tensor | None = None) -> None:
        """One averaging step. `applied`: a device bool [] from a deferred guard; where False (the update was
        skipped) the average stays as it is, with no host sync."""
        weight = 1.0 - self.decay if applied is None else applied * (1.0 - self.decay)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v, weight)
            else:
                self.shadow[k].copy_(v if applied is None else torch.where(applied, v, self.shadow[k]))


def grad_norm(params: list[Tensor]) -> Tensor:
    """The global L2 norm of the gradients (one fused pass, no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


def grad_sum(params: list[Tensor]) -> Tensor:
    """The sum of all gradient entries: non-finite if any entry is (a cheaper witness than the norm)."""
    grads = [p.grad.sum() for p in params if p.grad is not None]
    return torch.stack(grads).sum() if grads else torch.zeros(())


def defer_guard(optim, optimizer: torch.optim.Optimizer, device: torch.device, scaler) -> bool:
    """Keep the update guard's verdict on the device? Where a host sync costs (not on a CPU), the optimizer can skip
    its own update (fused Adam's found_inf), and no threshold needs the norm on the host."""
    fused = bool(optimizer.defaults.get("fused")) and isinstance(optimizer, torch.optim.Adam)
    return device.type != "cpu" and fused and scaler is None and optim.skip_threshold <= 0 and optim.grad_clip <= 0


class UpdateGuard:
    """Applies or skips each update (see the module docstring), in one of two modes chosen at the start:

    host (`deferred` False): the verdict is read on the host each step (a host-device sync; free on a CPU).
    deferred: the verdict stays on the device and fused Adam skips its own update (found_inf), so no step waits for
    the host; the counters are brought to the host, and the max_nonfinite stop checked, by `settle`, which the loop
    calls at logging steps, before each checkpoint and at each epoch end.

    `state` (a TrainState) holds the counters and the runs of bad and skipped steps, so they travel in checkpoints.
    The gradient norm is computed only when a threshold needs it or the caller logs it (`want_norm`); else
    finiteness is read from the gradients' sum, which is cheaper (a reduction without squares).
    """

    def __init__(self, optim, state, optimizer, device: torch.device, scaler=None):
        # optimizer: as the loop steps it (Fabric's wrapper, whose step also runs the loss scaler); raw: the torch one
        self.t, self.state, self.optimizer, self.scaler = optim, state, optimizer, scaler
        self.raw = getattr(optimizer, "optimizer", optimizer)
        self.deferred = defer_guard(optim, self.raw, device, scaler)
        self.pending = self.run = self.longest = None  # deferred: bad steps since the last settle, the current run, the longest
        if self.deferred:  # fused Adam reads it at each step: 1 skips the whole update, its step count included
            self.found_inf = self.raw.found_inf = torch.zeros((), device=device)

    def step(self, loss: Tensor, params: list[Tensor], step: int, want_norm: bool, model: nn.Module,
             ema: EMA | None) -> tuple[Tensor | bool, Tensor | None]:
        """Decide on this gradient, then update the weights (and EMA) or skip. -> (applied: a bool, or a device bool []
        when deferred; the gradient norm or None)."""
        if self.deferred:
            ok, norm = self.witness(loss, params, want_norm)
            self.found_inf.copy_(~ok)
            self.optimizer.step()
            if ema is not None:
                ema.update(model, ok)
            return ok, norm
        applied, norm = self.allow(loss, params, step, want_norm)
        if applied:
            self.optimizer.step()
            if ema is not None:
                ema.update(model)
        elif self.scaler is not None:  # a skipped fp16 step must still lower the loss scale after an overflow
            self.scaler.update()
        return applied, norm

    def allow(self, loss: Tensor, params: list[Tensor], step: int, want_norm: bool = True) -> tuple[bool, Tensor | None]:
        """Host mode: -> (apply the update?, the gradient norm or None when neither a threshold nor the caller needs it)."""
        s, t = self.state, self.t
        norm = grad_norm(params) if want_norm or t.skip_threshold > 0 or t.grad_clip > 0 else None
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_sum(params) if norm is None else norm)):
            s.bad_in_a_row += 1
            s.counters["nonfinite"] += 1
            if s.bad_in_a_row >= t.max_nonfinite:
                raise TrainingError(f"{s.bad_in_a_row} non-finite losses/gradients in a row at step {step + 1}; "
                                    "stopped, the last good checkpoint is kept (lower optim.lr or set optim.grad_clip)")
            return False, norm
        s.bad_in_a_row = 0
        if t.skip_threshold > 0 and norm > t.skip_threshold:
            if s.skips_in_a_row < t.max_skips:
                s.skips_in_a_row += 1
                s.counters["skipped"] += 1
                return False, norm
            torch.nn.utils.clip_grad_norm_(params, t.skip_threshold)
            s.counters["clipped_after_skips"] += 1
        s.skips_in_a_row = 0
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        return True, norm

    def witness(self, loss: Tensor, params: list[Tensor], want_norm: bool) -> tuple[Tensor, Tensor | None]:
        """Deferred mode: -> (device bool []: loss and gradients finite, the norm when wanted); counted, nothing read
        on the host."""
        norm = grad_norm(params) if want_norm else None
        ok = torch.isfinite(loss) & torch.isfinite(grad_sum(params) if norm is None else norm)
        bad = (~ok).long()
        if self.pending is None:
            self.pending, self.run, self.longest = (torch.zeros((), dtype=torch.long, device=ok.device) for _ in range(3))
            self.run += self.state.bad_in_a_row  # a run of bad steps goes on across a settle
        self.pending += bad
        self.run.mul_(bad).add_(bad)  # +1 on a bad step, 0 on a good one
        torch.maximum(self.longest, self.run, out=self.longest)
        return ok, norm

    def settle(self, step: int) -> None:
        """Host side of the deferred verdicts: update the counters; stop if max_nonfinite bad steps ran in a row."""
        if self.pending is None:
            return
        pending, run, longest = (int(v) for v in torch.stack([self.pending, self.run, self.longest]).tolist())
        self.pending = self.run = self.longest = None
        self.state.counters["nonfinite"] += pending
        self.state.bad_in_a_row = run
        if longest >= self.t.max_nonfinite:
            raise TrainingError(f"{longest} non-finite losses/gradients in a row by step {step}; stopped, the last "
                                "good checkpoint is kept (lower optim.lr or set optim.grad_clip)")
