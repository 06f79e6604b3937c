"""The training loop: the one place a loss is reduced to a scalar and its sign flipped.

Reads top to bottom: set up (Fabric, data, model, optimizer, resume) -> per step (batch, objective,
backward, fault handling, update, EMA) -> logging and checkpoints. Lightning Fabric handles devices,
precision and DDP. Randomness is restartable: the epoch order is a function of (seed, epoch), and the
binarization and reparameterization RNG states travel in each checkpoint, so a resumed run replays an
uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import sys
import time
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import torch
from lightning_fabric import Fabric
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, ConfigError, to_dict
from .data import Dataset, epoch_order, load_dataset, split_validation, test_input, to_model_input
from .models import build_model
from .objectives import ElboTerms, TrainingObjective, elbo, training_objective
from .rundir import MetricsLog, clear_training_outputs, write_provenance


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the last good checkpoint is kept."""


class Objective(nn.Module):
    """Wraps the model so Fabric/DDP/compile see one forward: x [B, *data], beta [] -> (objective [B], terms).

    The terms are returned detached: they are only logged, and each output that carries a graph costs a
    backward hook in Fabric's wrapper."""

    def __init__(self, model: nn.Module, spec: TrainingObjective):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, x: Tensor, beta: Tensor):
        objective, terms = training_objective(self.model, x, replace(self.spec, beta=beta))
        return objective, ElboTerms(*(term.detach() for term in terms))


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """Adam (fused: one pass over the parameters, several times faster than the default on a CPU) or Adamax."""
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.train.lr, fused=True)
    if cfg.train.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.train.lr)
    raise ConfigError(f"unknown optimizer {cfg.train.optimizer!r}; use 'adam' or 'adamax'")


def kl_weight(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """beta, ramped linearly from 0 over warmup_epochs (KL warm-up), then constant."""
    if cfg.train.warmup_epochs <= 0:
        return cfg.train.beta
    return cfg.train.beta * min(1.0, step / (cfg.train.warmup_epochs * steps_per_epoch))


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


class UpdateGuard:
    """Decides whether a computed gradient is applied: non-finite loss/gradient -> skip and count (stop after
    max_nonfinite in a row); norm above skip_threshold -> skip, but after max_skips in a row clip instead (so
    training never stalls, unlike VDVAE's unbounded skip); grad_clip clips every applied update.

    The gradient norm is computed only when a threshold needs it or the caller logs it (`want_norm`); else
    finiteness is read from the gradients' sum, which is cheaper (a reduction without squares).

    Two ways to decide. `allow` reads the verdict on the host (a host-device sync per step; free on a CPU).
    `witness` keeps it on the device, for a fused optimizer that skips its own update when told
    (found_inf): no sync per step; the counters are brought to the host, and the max_nonfinite stop checked,
    by `settle`, which the loop calls at logging steps, before each checkpoint and at each epoch end."""

    def __init__(self, t, counters: dict[str, int], deferred: bool = False):
        self.t, self.counters, self.deferred = t, counters, deferred
        self.bad_in_a_row = self.skips_in_a_row = 0
        # deferred: non-finite steps since the last settle, the current run of them, the longest run since then
        self.pending = self.run = self.longest = None

    def allow(self, loss: Tensor, params: list[Tensor], step: int, want_norm: bool = True) -> tuple[bool, Tensor | None]:
        """-> (apply the update?, the gradient norm or None when neither a threshold nor the caller needs it)."""
        norm = grad_norm(params) if want_norm or self.t.skip_threshold > 0 or self.t.grad_clip > 0 else None
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_sum(params) if norm is None else norm)):
            self.bad_in_a_row += 1
            self.counters["nonfinite"] += 1
            if self.bad_in_a_row >= self.t.max_nonfinite:
                raise TrainingError(f"{self.bad_in_a_row} non-finite losses/gradients in a row at step {step + 1}; "
                                    "stopped, the last good checkpoint is kept (lower train.lr or set train.grad_clip)")
            return False, norm
        self.bad_in_a_row = 0
        if self.t.skip_threshold > 0 and norm > self.t.skip_threshold:
            if self.skips_in_a_row < self.t.max_skips:
                self.skips_in_a_row += 1
                self.counters["skipped"] += 1
                return False, norm
            torch.nn.utils.clip_grad_norm_(params, self.t.skip_threshold)
            self.counters["clipped_after_skips"] += 1
        self.skips_in_a_row = 0
        if self.t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip)
        return True, norm

    def witness(self, loss: Tensor, params: list[Tensor], want_norm: bool) -> tuple[Tensor, Tensor | None]:
        """-> (device bool []: loss and gradients finite, the norm when wanted); counted, nothing read on the host."""
        norm = grad_norm(params) if want_norm else None
        ok = torch.isfinite(loss) & torch.isfinite(grad_sum(params) if norm is None else norm)
        bad = (~ok).long()
        if self.pending is None:
            self.pending, self.run, self.longest = (torch.zeros((), dtype=torch.long, device=ok.device) for _ in range(3))
            self.run += self.bad_in_a_row  # a run of bad steps goes on across a settle
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
        self.counters["nonfinite"] += pending
        self.bad_in_a_row = run
        if longest >= self.t.max_nonfinite:
            raise TrainingError(f"{longest} non-finite losses/gradients in a row by step {step}; stopped, the last "
                                "good checkpoint is kept (lower train.lr or set train.grad_clip)")


def defer_guard(t, optimizer: torch.optim.Optimizer, device: torch.device, scaler) -> bool:
    """Keep the update guard's verdict on the device? Where a host sync costs (not on a CPU), the optimizer can skip
    its own update (fused Adam's found_inf), and no threshold needs the norm on the host."""
    fused = bool(optimizer.defaults.get("fused")) and isinstance(optimizer, torch.optim.Adam)
    return (device.type != "cpu" and fused and scaler is None and t.skip_threshold <= 0 and t.grad_clip <= 0)


def rank_slice(i: int, batch_size: int, rank: int, world: int) -> slice:
    """The positions in the epoch order of rank `rank`'s share of global batch i (the ranks' shares partition it)."""
    local = batch_size // world
    lo = i * batch_size + rank * local
    return slice(lo, lo + local)


def train(cfg: Config, out: Path, resume: bool = False, argv: list[str] | None = None, progress: bool = True,
          data: Dataset | None = None) -> Path:
    """Train per `cfg` into run directory `out` (validated by the caller; created if missing). Returns `out`.

    `data`: the dataset of cfg.data when the caller has already loaded it (else it is loaded here)."""
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                    precision=t.precision)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    if t.batch_size % world:
        raise ConfigError(f"batch size {t.batch_size} must be divisible by the {world} devices")

    # 1. Data and model. Every rank starts from rank 0's seed; DDP also broadcasts rank 0's weights.
    data = data or load_dataset(cfg.data.dataset, cfg.data.data_dir)
    train_x, _, val_x, _ = split_validation(data.train_x, data.train_y, cfg.data.validation, t.seed)
    steps_per_epoch = len(train_x) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set ({len(train_x)} images) is smaller than one batch ({t.batch_size}); "
                         "lower --batch-size")
    torch.manual_seed(t.seed * 1000)
    model = build_model(cfg.model, data.data_shape)
    torch.manual_seed(t.seed * 1000 + rank)  # reparameterization noise: different on each rank
    spec = TrainingObjective(n_samples=t.n_samples, iw_k=t.iw_k, beta=t.beta, free_bits=t.free_bits,
                             analytic_kl=t.analytic_kl)
    optimizer = make_optimizer(cfg, model.parameters())
    # Why: the training images live on the run's device and are binarized there with a generator on that device
    # (on a GPU no per-step binarization on the host and copy; on a CPU both are no-ops).
    train_x = train_x.to(fabric.device)
    data_gen = torch.Generator(device=fabric.device).manual_seed(t.seed * 1000 + 1 + rank)
    step, counters, ema_weights = 0, {"skipped": 0, "nonfinite": 0, "clipped_after_skips": 0}, None

    # 2. Resume: model, optimizer, EMA, counters and RNG exactly as saved.
    if resume:
        last = ckpt.checkpoint_dir(out)
        state = ckpt.load_state(last)
        ckpt.load_weights_into(model, ckpt.load_tensors(last / "model.safetensors"), last)
        if (last / "ema.safetensors").exists():
            ema_weights = ckpt.load_tensors(last / "ema.safetensors")
        step, counters = state["step"], state["counters"]
        set_rng_state(state["rng"], data_gen, fabric.device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # everything above succeeded: only now does an earlier run in DIR (--overwrite) go
            clear_training_outputs(out)
        ckpt.write_json(out / "config.json", to_dict(cfg))
        write_provenance(out, data.files, argv, resume)
    # Why compile before setup: Fabric then compiles the inner module only (after a DDP wrap), and its own wrapper
    # (precision context, hooks) stays out of the graph and of dynamo's per-call guards.
    objective = Objective(model, spec)
    objective, optimizer = fabric.setup(torch.compile(objective) if t.compile else objective, optimizer)
    # Why: with 16-mixed Fabric scales the loss; the guard must see the true gradients, and a skipped step must
    # still lower the scale after an overflow (GradScaler.update), else the same overflow repeats.
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    if resume:  # after setup: the optimizer state goes where the parameters now are (e.g. the GPU)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    ema = EMA(model, t.ema) if t.ema > 0 else None
    if ema is not None and ema_weights is not None:
        ema.shadow = {k: v.to(fabric.device) for k, v in ema_weights.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    guard = UpdateGuard(t, counters, deferred=defer_guard(t, optimizer.optimizer, fabric.device, scaler))
    if resume:  # a run of skipped or non-finite steps goes on across a checkpoint
        guard.bad_in_a_row, guard.skips_in_a_row = state.get("guard", (0, 0))
    if guard.deferred:  # fused Adam reads it at each step: 1 skips the whole update, its step count included
        found_inf = optimizer.optimizer.found_inf = torch.zeros((), device=fabric.device)
    log = MetricsLog(out / "metrics.jsonl", step if resume else None, t.tensorboard) if rank == 0 else None

    def save() -> None:
        guard.settle(step)  # no checkpoint after max_nonfinite bad steps in a row
        if rank == 0:
            # epoch_sums/epoch_seconds: the epoch so far, so a resume mid-epoch reports the whole epoch's means
            state = {"step": step, "counters": counters, "data_shape": list(data.data_shape),
                     "optimizer": optimizer.state_dict(), "rng": rng_state(data_gen, fabric.device, world),
                     "guard": [guard.bad_in_a_row, guard.skips_in_a_row], "epoch_sums": sums.tolist(),
                     "epoch_seconds": time.perf_counter() - epoch_start}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            ckpt.save_checkpoint(out, model.state_dict(), state, ema.shadow if ema else None)

    # 3. The loop: batch -> objective -> backward -> guard -> update -> EMA -> log / checkpoint.
    try:
        for epoch in range(step // steps_per_epoch, t.epochs):
            order = epoch_order(len(train_x), t.seed, epoch).to(fabric.device)
            first = step - epoch * steps_per_epoch
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{t.epochs}", file=sys.stderr,
                       disable=not progress or rank != 0, dynamic_ncols=True, leave=False)
            epoch_start, sums = time.perf_counter(), torch.zeros(4, device=fabric.device)
            if resume and first > 0 and "epoch_sums" in state:  # resumed mid-epoch: go on with the epoch's sums
                sums = torch.tensor(state["epoch_sums"], device=fabric.device)
                epoch_start -= state["epoch_seconds"]
            for i in bar:
                x = fabric.to_device(to_model_input(train_x[order[rank_slice(i, t.batch_size, rank, world)]],
                                                    cfg.model.likelihood, data_gen))
                beta = kl_weight(cfg, step, steps_per_epoch)
                obj, terms = objective(x, torch.tensor(beta))
                loss = -obj.mean()
                fabric.backward(loss)
                if scaler is not None:
                    scaler.unscale_(optimizer.optimizer)
                want_norm = (step + 1) % t.log_every == 0
                batch_means = torch.stack([terms.elbo.mean(), terms.reconstruction.mean(), terms.kl.mean(),
                                           sums.new_ones(())])
                if guard.deferred:  # no host-device sync: the verdict stays on the device
                    ok, norm = guard.witness(loss, params, want_norm)
                    found_inf.copy_(~ok)
                    optimizer.step()
                    if ema is not None:
                        ema.update(model, ok)
                    sums += torch.where(ok, batch_means, 0.0)
                else:
                    applied, norm = guard.allow(loss, params, step, want_norm)
                    if applied:
                        optimizer.step()
                        if ema is not None:
                            ema.update(model)
                        sums += batch_means
                    elif scaler is not None:
                        scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % t.log_every == 0:  # every rank joins the all-reduce
                    guard.settle(step)
                    means = fabric.all_reduce(torch.stack([loss.detach(), terms.elbo.mean(), terms.reconstruction.mean(),
                                                           terms.kl.mean()]),
                                              reduce_op="mean")
                    if rank == 0:
                        record = {"step": step, "epoch": step / steps_per_epoch, "loss": means[0].item(),
                                  "elbo": means[1].item(), "reconstruction": means[2].item(), "kl": means[3].item(),
                                  "kl_per_level": terms.kl_per_level.mean(1).tolist(), "beta": beta,
                                  "grad_norm": norm.item(), **counters}
                        log.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.2f}", kl=f"{record['kl']:.1f}")
                if t.checkpoint_every and step % t.checkpoint_every == 0 and i + 1 < steps_per_epoch:
                    save()  # (an epoch's last step: the epoch-end checkpoint below, after its record)
            bar.close()
            guard.settle(step)
            sums = fabric.all_reduce(sums, reduce_op="mean")
            # Every rank must hold the same weights (DDP averages the gradients): their checksums, gathered.
            checksums = fabric.all_gather(torch.stack([p.detach().double().sum() for p in params]).sum()) \
                if world > 1 else None
            if rank == 0:
                n = max(1.0, sums[3].item())
                record = {"step": step, "epoch": epoch + 1, "epoch_seconds": time.perf_counter() - epoch_start,
                          "train_elbo": (sums[0] / n).item(), "train_reconstruction": (sums[1] / n).item(),
                          "train_kl": (sums[2] / n).item(), **counters}
                if checksums is not None:
                    record["rank_weight_gap"] = (checksums.max() - checksums.min()).item()  # 0 when in step
                if len(val_x):
                    record["val_elbo"] = validation_elbo(ema_model(model, ema), val_x, cfg, fabric.device)
                log.write(record)
                print(f"epoch {epoch + 1}/{t.epochs}: train ELBO {record['train_elbo']:.2f} nats"
                      + (f", validation ELBO {record['val_elbo']:.2f}" if "val_elbo" in record else ""), file=sys.stderr)
            save()
    finally:
        if log:
            log.close()
    return out


def ema_model(model: nn.Module, ema: EMA | None) -> nn.Module:
    """The model to evaluate: a copy holding the EMA weights when EMA is on, else the model itself."""
    if ema is None:
        return model
    copy = deepcopy(model)
    copy.load_state_dict(ema.shadow)
    return copy


@torch.no_grad()
def validation_elbo(model: nn.Module, val_x: Tensor, cfg: Config, device, batch: int = 1000) -> float:
    """Mean ELBO on the held-out split (fixed binarization; the training RNG stream is left untouched)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x_all = test_input(val_x, cfg.model.likelihood)
        total = sum(elbo(model, x_all[i:i + batch].to(device)).elbo.sum().item() for i in range(0, len(x_all), batch))
    model.train(was_training)
    return total / len(x_all)
