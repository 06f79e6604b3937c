"""The training loop: the one place a loss is reduced to a scalar and its sign flipped.

`train()` is the public entry (the CLI's `hvae train` and Python alike): it checks what only a run can check,
prepares the run directory, and calls `fit`, which reads top to bottom: set-up (Fabric, data, model, optimizer,
resume, the thread count), then per step `train_step` (objective, backward, the update guard, update, EMA),
logging, checkpoints and `end_epoch`. Lightning Fabric handles devices, precision and DDP; the state a resume needs
is a TrainState; when to checkpoint and when to stop on a signal (SIGTERM, SIGINT), a Preemption (preemption.py);
how many CPU threads, a ThreadPolicy (threads.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import torch
from lightning_fabric import Fabric
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import threads
from .config import Config, ConfigError, apply, from_dict, to_dict
from .data import Dataset, epoch_order, load_dataset, split_validation, test_input, to_model_input
from .errors import DataError
from .evaluate import EXPLICIT_LEVELS, capabilities, stochastic_bound_of
from .models import build_model
from .objectives import ElboTerms, elbo
from .optim import EMA, TrainingError, UpdateGuard, lr_at, make_optimizer, set_lr, spectral_penalty
from .preemption import Preemption, TrainingStopped
from .rundir import MetricsLog, clear_training_outputs, prepare_new, start_or_resume, write_provenance
from .state import TrainState

__all__ = ["train", "fit", "TrainingError", "TrainingStopped"]


class Objective(nn.Module):
    """The model and its training objective as one forward for Fabric/DDP/compile: x [B, *data], the KL weight []
    -> (objective to maximize [B], terms). The terms come back detached: they are only logged, and each output
    that carries a graph costs a backward hook in Fabric's wrapper."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: Tensor, kl_weight: Tensor):
        objective, terms = self.objective(self.model, x, kl_weight)
        return objective, ElboTerms(*(term.detach() for term in terms))


def rank_slice(i: int, batch_size: int, rank: int, world: int) -> slice:
    """The positions in the epoch order of rank `rank`'s share of global batch i (the ranks' shares partition it)."""
    local = batch_size // world
    lo = i * batch_size + rank * local
    return slice(lo, lo + local)


def train_step(objective, model: nn.Module, x: Tensor, kl_weight: float, fabric: Fabric, guard: UpdateGuard,
               state: TrainState, params: list[Tensor], ema: EMA | None, want_norm: bool, spectral: float = 0.0):
    """One update: the objective's batch mean, flipped to a loss (plus `spectral` x optim.spectral_penalty where
    optim.spectral_reg is on), backward, then the guard applies or skips the update. -> (loss [], terms, the
    gradient norm or None)."""
    obj, terms = objective(x, torch.tensor(kl_weight))
    loss = -obj.mean()
    if spectral:
        loss = loss + spectral * spectral_penalty(model)
    fabric.backward(loss)
    if guard.scaler is not None:  # with 16-mixed the guard must see the true (unscaled) gradients
        guard.scaler.unscale_(guard.raw)
    batch_means = torch.stack([terms.elbo.mean(), terms.reconstruction.mean(), terms.kl.mean(), state.sums.new_ones(())])
    applied, norm = guard.step(loss, params, state.step, want_norm, model, ema)
    state.add(batch_means, applied)
    guard.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return loss, terms, norm


def log_step(fabric: Fabric, log: MetricsLog | None, state: TrainState, loss: Tensor, terms: ElboTerms, norm: Tensor,
             kl_weight: float, steps_per_epoch: int, bar, lr: float | None = None) -> None:
    """A metrics line of this step's means over the ranks (every rank joins the all-reduce); `lr` where scheduled."""
    means = fabric.all_reduce(torch.stack([loss.detach(), terms.elbo.mean(), terms.reconstruction.mean(),
                                           terms.kl.mean()]), reduce_op="mean")
    if log is not None:
        record = {"step": state.step, "epoch": state.step / steps_per_epoch, "loss": means[0].item(),
                  "elbo": means[1].item(), "reconstruction": means[2].item(), "kl": means[3].item(),
                  "kl_per_level": terms.kl_per_level.mean(1).tolist(), "beta": kl_weight, "grad_norm": norm.item(),
                  **state.counters, **({"lr": lr} if lr is not None else {})}
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.2f}", kl=f"{record['kl']:.1f}")


def end_epoch(fabric: Fabric, log: MetricsLog | None, state: TrainState, epoch: int, cfg: Config, model: nn.Module,
              params: list[Tensor], ema: EMA | None, val_x: Tensor) -> None:
    """The epoch's record: train means over the ranks, the ranks' weight-checksum gap (0 when in step: DDP averages
    the gradients), and the validation ELBO when a split is held out."""
    sums = fabric.all_reduce(state.sums, reduce_op="mean")
    checksums = fabric.all_gather(torch.stack([p.detach().double().sum() for p in params]).sum()) \
        if fabric.world_size > 1 else None
    if log is None:
        return
    n = max(1.0, sums[3].item())
    record = {"step": state.step, "epoch": epoch + 1, "epoch_seconds": state.epoch_seconds(),
              "train_elbo": (sums[0] / n).item(), "train_reconstruction": (sums[1] / n).item(),
              "train_kl": (sums[2] / n).item(), **state.counters}
    if checksums is not None:
        record["rank_weight_gap"] = (checksums.max() - checksums.min()).item()
    if len(val_x):
        record["val_elbo"] = validation_elbo(ema_model(model, ema), val_x, cfg.model.likelihood, fabric.device)
    log.write(record)
    print(f"epoch {epoch + 1}/{cfg.train.epochs}: train ELBO {record['train_elbo']:.2f} nats"
          + (f", validation ELBO {record['val_elbo']:.2f}" if "val_elbo" in record else ""), file=sys.stderr)


def save(out: Path, fabric: Fabric, state: TrainState, guard: UpdateGuard, model: nn.Module, ema: EMA | None,
         data_shape) -> None:
    """Checkpoint (every rank calls it, rank 0 writes): weights, EMA, the TrainState (with every rank's RNG streams
    and epoch sums), the optimizer (with its parameters' names) and loss scale."""
    guard.settle(state.step)  # no checkpoint after max_nonfinite bad steps in a row
    # every rank's RNG streams and epoch sums (on the device: NCCL gathers nothing else)
    ranks = fabric.all_gather(fabric.to_device(state.rank_record())) if fabric.world_size > 1 else None
    if fabric.global_rank == 0:
        saved = {**state.state_dict(fabric.world_size, ranks), "data_shape": list(data_shape),
                 "optimizer": guard.optimizer.state_dict(), "param_names": [n for n, _ in model.named_parameters()]}
        if guard.scaler is not None:
            saved["scaler"] = guard.scaler.state_dict()
        ckpt.save_checkpoint(out, model.state_dict(), saved, ema.shadow if ema else None)


def launch(rt) -> Fabric:
    """Lightning Fabric for the `runtime` section: accelerator, devices, strategy, precision (DDP ranks start here);
    a pinned thread count (choose_threads sets it again after Fabric's launcher, and measures an unpinned one)."""
    if rt.threads > 0:
        torch.set_num_threads(rt.threads)
    fabric = Fabric(accelerator=rt.accelerator, devices=rt.devices, num_nodes=rt.num_nodes, strategy=rt.strategy,
                    precision=rt.precision)
    fabric.launch()
    return fabric


def training_split(cfg: Config, data: Dataset, fabric: Fabric) -> tuple[Tensor, Tensor, int]:
    """(training images on the device, validation images, steps per epoch). Why on the device: the images are
    binarized there by a generator on that device (on a GPU no per-step binarization on the host and copy)."""
    t = cfg.train
    if t.batch_size % fabric.world_size:
        raise ConfigError(f"train.batch_size {t.batch_size} must be divisible by the {fabric.world_size} devices")
    train_x, _, val_x, _ = split_validation(data.train_x, data.train_y, cfg.data.validation, t.seed)
    if len(train_x) < t.batch_size:
        raise ConfigError(f"the training set ({len(train_x)} images) is smaller than one batch ({t.batch_size}); "
                          "lower train.batch_size")
    return train_x.to(fabric.device), val_x, len(train_x) // t.batch_size


def restore(out: Path, model: nn.Module, state: TrainState, rank: int, world: int) -> tuple[dict, dict | None]:
    """Resume: the weights into `model`, the TrainState (step, counters, guard runs, epoch so far, this rank's RNG
    streams) as saved. -> (the saved state, for the optimizer and loss scale once Fabric has placed them; the EMA
    weights)."""
    last = ckpt.checkpoint_dir(out)
    saved = ckpt.load_state(last)
    ckpt.load_weights_into(model, ckpt.load_tensors(last / "model.safetensors"), last)
    ema = ckpt.load_tensors(last / "ema.safetensors") if (last / "ema.safetensors").exists() else None
    state.load_state_dict(saved, rank, world)
    return saved, ema


def setup(fabric: Fabric, cfg: Config, model: nn.Module, state: TrainState, saved: dict | None,
          ema_weights: dict | None) -> tuple[nn.Module, UpdateGuard, EMA | None]:
    """The objective and optimizer through Fabric, the update guard, EMA; a resume's optimizer, loss scale and EMA.

    Why compile before setup: Fabric then compiles the inner module only (after a DDP wrap), and its own wrapper
    (precision context, hooks) stays out of the graph and of dynamo's per-call guards."""
    objective = Objective(model, cfg.objective)
    objective, optimizer = fabric.setup(torch.compile(objective) if cfg.runtime.compile else objective,
                                        make_optimizer(cfg.optim, model.parameters()))
    scaler = getattr(fabric.strategy.precision, "scaler", None)  # 16-mixed: the loss scaler
    if saved is not None:  # after setup: the optimizer state goes where the parameters now are (e.g. the GPU)
        optimizer.load_state_dict(ckpt.optimizer_state_for(model, saved))
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
    ema = EMA(model, cfg.optim.ema) if cfg.optim.ema > 0 else None
    if ema is not None and ema_weights is not None:
        ema.shadow = {k: v.to(fabric.device) for k, v in ckpt.upgrade_weights(model, ema_weights).items()}
    return objective, UpdateGuard(cfg.optim, state, optimizer, fabric.device, scaler), ema


def choose_threads(cfg: Config, fabric: Fabric, objective: nn.Module, model: nn.Module, params: list[Tensor],
                   train_x: Tensor, state: TrainState, steps_per_epoch: int, resume: bool):
    """The run's ThreadPolicy (threads.py), started: pinned, resumed with the saved count, or measured now on
    throwaway passes of a probe batch, the first local batch of the training images binarized by a generator of its
    own (the data stream is left as it was). -> (the policy, the metrics record of its choice or None)."""
    rt, world = cfg.runtime, fabric.world_size
    cap = threads.thread_cap(threads.available_cores(), max(1, world // rt.num_nodes), threads.omp_limit())

    def ranks_mean(t: Tensor) -> Tensor:  # DDP: every rank decides on the same figures
        return fabric.all_reduce(t, reduce_op="mean")

    policy = threads.ThreadPolicy(rt.threads, cap, fabric.device.type == "cpu", agree=ranks_mean if world > 1 else None)
    x = fabric.to_device(to_model_input(train_x[:cfg.train.batch_size // world], cfg.model.likelihood,
                                        torch.Generator(device=fabric.device).manual_seed(threads.PROBE_SEED)))
    kl_weight = torch.tensor(cfg.objective.kl_weight(state.step, steps_per_epoch))

    def forward_backward() -> Tensor:  # as train_step's; DDP: no gradient all-reduce (each rank times its own)
        with fabric.no_backward_sync(objective) if world > 1 else nullcontext():
            loss = -objective(x, kl_weight)[0].mean()
            fabric.backward(loss)
        return loss

    chosen = policy.start(lambda keep: threads.throwaway(forward_backward, params, model, keep), state.step,
                          state.threads, resume)
    state.threads = policy.choice  # the same dict: a later switch goes into the next checkpoint
    return policy, chosen


def fit(cfg: Config, out: Path, resume: bool = False, argv: list[str] | None = None, progress: bool = True,
        data: Dataset | None = None, model: nn.Module | None = None) -> nn.Module:
    """Train per `cfg` into run directory `out` (checked by train(); created if missing). -> the trained model.

    `data`: cfg.data's dataset when the caller has loaded it; `model`: start from these weights instead of a fresh
    model of cfg.model (its config must be cfg.model)."""
    t = cfg.train
    fabric = launch(cfg.runtime)
    rank, world = fabric.global_rank, fabric.world_size
    # Data and model. Every rank starts from rank 0's seed (DDP also broadcasts rank 0's weights); the
    # reparameterization noise differs between ranks, and so does the data stream (binarization).
    data = data or load_dataset(cfg.data.dataset, cfg.data.data_dir)
    train_x, val_x, steps_per_epoch = training_split(cfg, data, fabric)
    torch.manual_seed(t.seed * 1000)
    model = model if model is not None else build_model(cfg.model, data.data_shape)
    torch.manual_seed(t.seed * 1000 + rank)
    state = TrainState(torch.Generator(device=fabric.device).manual_seed(t.seed * 1000 + 1 + rank), fabric.device)
    saved, ema_weights = restore(out, model, state, rank, world) if resume else (None, None)
    objective, guard, ema = setup(fabric, cfg, model, state, saved, ema_weights)
    params = [p for p in model.parameters() if p.requires_grad]
    # Threads: pinned, the resumed run's own (fixed mode), or measured now on throwaway passes (threads.py).
    policy, chosen = choose_threads(cfg, fabric, objective, model, params, train_x, state, steps_per_epoch, resume)
    # The run directory: only now (everything above succeeded) does an earlier run in it (--overwrite) go.
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            clear_training_outputs(out)
        ckpt.write_json(out / "config.json", to_dict(cfg))
        write_provenance(out, data.files, argv, resume, threads=policy.info)
    log = MetricsLog(out / "metrics.jsonl", state.step if resume else None, t.tensorboard) if rank == 0 else None
    if log and chosen:
        log.write(chosen)

    # The loop: batch -> train_step -> log every log_every steps -> checkpoint -> end of epoch. A checkpoint comes
    # every checkpoint_every steps, every checkpoint_minutes, and when SIGTERM/SIGINT asks to stop (then it stops).
    scheduled = cfg.optim.schedule != "constant" or cfg.optim.lr_warmup_epochs > 0
    steps, preemption = t.epochs * steps_per_epoch, Preemption(t, world).start()  # its signal handlers until close()
    try:
        for epoch in range(state.step // steps_per_epoch, t.epochs):
            order = epoch_order(len(train_x), t.seed, epoch).to(fabric.device)
            first = state.step - epoch * steps_per_epoch
            state.start_epoch(first)
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{t.epochs}", file=sys.stderr,
                       disable=not progress or rank != 0, dynamic_ncols=True, leave=False)
            for i in bar:
                # a batch: this rank's share, binarized afresh from the data stream
                x = fabric.to_device(to_model_input(train_x[order[rank_slice(i, t.batch_size, rank, world)]],
                                                    cfg.model.likelihood, state.data_gen))
                kl_weight = cfg.objective.kl_weight(state.step, steps_per_epoch)
                if scheduled:
                    set_lr(guard.raw, lr_at(cfg.optim, state.step, steps_per_epoch))
                want_norm = (state.step + 1) % t.log_every == 0
                loss, terms, norm = train_step(objective, model, x, kl_weight, fabric, guard, state, params, ema,
                                               want_norm, cfg.optim.spectral_reg)
                if state.step % t.log_every == 0:
                    guard.settle(state.step)
                    log_step(fabric, log, state, loss, terms, norm, kl_weight, steps_per_epoch, bar,
                             guard.raw.param_groups[0]["lr"] if scheduled else None)
                # adaptive threads: re-measured when the step time drifts (never where results depend on the count)
                switched = policy.tick(state.step)
                if log and switched:
                    log.write(switched)
                # (an epoch's last step: the epoch-end checkpoint below, after its record)
                if preemption.checkpoint_due(state.step) and i + 1 < steps_per_epoch:
                    save(out, fabric, state, guard, model, ema, data.data_shape)
                    preemption.saved(state.step, steps, out, rank)  # stops here if a signal asked to
            bar.close()
            guard.settle(state.step)
            end_epoch(fabric, log, state, epoch, cfg, model, params, ema, val_x)
            save(out, fabric, state, guard, model, ema, data.data_shape)
            preemption.saved(state.step, steps, out, rank, finished=epoch + 1 == t.epochs)
    finally:
        preemption.close()
        if log:
            log.close()
    return model


def check_runtime(cfg: Config) -> None:
    """What a config cannot say about this machine: the accelerator exists, the strategy is one Fabric knows, the
    optional TensorBoard package is installed."""
    from lightning_fabric.strategies import STRATEGY_REGISTRY

    kind = cfg.runtime.accelerator
    if kind in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.accelerator {kind}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("runtime.accelerator mps: Apple's Metal backend is not available here; use cpu")
    strategies = ["auto", *sorted(STRATEGY_REGISTRY.available_strategies())]
    if cfg.runtime.strategy not in strategies:
        raise ConfigError(f"runtime.strategy must be one of {', '.join(strategies)}; got {cfg.runtime.strategy!r}")
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install 'hvae[tensorboard]'")


def _is_launcher() -> bool:
    """The process that checks and prepares the run directory: not the extra ranks a DDP launcher starts."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def train(config: Config | dict | None = None, out: str | os.PathLike | None = None, *, model: nn.Module | None = None,
          data: str | None = None, data_dir: str | None = None, resume: bool = False, auto_resume: bool = False,
          overwrite: bool = False, progress: bool = True, argv: list[str] | None = None,
          **changes) -> tuple[nn.Module, Path]:
    """Train a model into the run directory `out`, with the contracts of `hvae train`. -> (trained model, run dir).

    config: a Config, a dict in config.json's layout, or None (the defaults); `changes` set dotted keys by
    keyword with '__' for '.', e.g. train__epochs=5. model: start from this model's weights; it must be one that
    hvae built (hvae.build_model, hvae.load), so its config is known. data: a dataset name or a .npz/.npy path
    (data.dataset), data_dir: where its files are. resume: go on from the last checkpoint in `out`, with the run's
    own config (train__epochs may change). auto_resume: start the run if `out` is new or empty, resume it if `out`
    holds a run of this same config (train.epochs and runtime.accelerator may differ: this call's are used), refuse
    one of another config; so a requeued job repeats its command unchanged. overwrite: replace a non-empty `out`.
    A signal (SIGTERM, SIGINT) stops training after a checkpoint: TrainingStopped is raised.
    """
    if out is None:
        raise ConfigError("train needs out, the run directory")
    out = Path(out)
    if auto_resume and (resume or overwrite):
        raise ConfigError("auto_resume starts or resumes the run by itself; drop resume and overwrite")
    if resume:
        cfg = resumed_config(out, config, model, data, data_dir, changes)
    else:
        cfg = new_config(config, model, data, data_dir, changes)
        how = start_or_resume(out, cfg) if auto_resume else "start"
        if how == "resume":  # the run's own config, with this call's epochs and accelerator
            resume, model = True, None
            cfg = resumed_config(out, None, None, None, None, {"train__epochs": cfg.train.epochs,
                                                               "runtime__accelerator": cfg.runtime.accelerator})
        overwrite = overwrite or how == "restart"
        if how != "start" and _is_launcher():
            print(f"auto-resume: {out} holds this run; " + ("resuming it from its last checkpoint" if resume else
                  "it has no checkpoint yet, so it starts again"), file=sys.stderr)
    check_runtime(cfg)
    loaded = None  # other DDP ranks load the data inside fit()
    if _is_launcher():
        loaded = load_dataset(cfg.data.dataset, cfg.data.data_dir)  # bad data fails here, before DIR is touched
        check_sizes(cfg, loaded)
        if model is not None and tuple(getattr(model, "data_shape", loaded.data_shape)) != loaded.data_shape:
            raise ConfigError(f"model is for data of shape {model.data_shape}; the data is {loaded.data_shape}")
        if model is None:
            build_model(cfg.model, loaded.data_shape)  # a model that cannot be built for this data fails here
        if resume:
            ckpt.checkpoint_dir(out)
        else:
            prepare_new(out, overwrite)
    trained = fit(cfg, out, resume=resume, argv=argv, progress=progress, data=loaded, model=model)
    return trained, out


def resumed_config(out: Path, config, model, data, data_dir, changes: dict) -> Config:
    """The config of a resumed run: the run's own, where only the epochs and the accelerator may change."""
    if not out.is_dir():
        raise ConfigError(f"resume: no run directory {out}")
    extra = set(changes) - {"train__epochs", "runtime__accelerator"}
    if config is not None or model is not None or data is not None or data_dir is not None or extra:
        raise ConfigError("resume uses the run's saved config; only the epochs and the accelerator may change")
    return apply(ckpt.read_config(out), {k.replace("__", "."): v for k, v in changes.items() if v is not None})


def new_config(config, model: nn.Module | None, data, data_dir, changes: dict) -> Config:
    """The config of a new run: `config` (a Config, a dict, None), the model's own config when starting from a
    model, then the data and the dotted `changes`; paths made absolute."""
    cfg = config if isinstance(config, Config) else from_dict(config or {})
    if model is not None:
        if getattr(model, "config", None) is None:
            raise ConfigError("model: pass a model built by hvae.build_model or hvae.load (its config is saved "
                              "with the run), or pass config instead")
        cfg = replace(cfg, model=model.config)
    updates = {"data.dataset": data, "data.data_dir": data_dir, **{k.replace("__", "."): v for k, v in changes.items()}}
    return absolute_paths(apply(cfg, {k: v for k, v in updates.items() if v is not None}))


def check_sizes(cfg: Config, data: Dataset) -> None:
    """The split and batch sizes fit the data and the processes."""
    n_train = len(data.train_x) - cfg.data.validation
    if n_train < 1:
        raise DataError(f"validation size {cfg.data.validation} (data.validation) must be in [0, {len(data.train_x)}) "
                        f"(the training set has {len(data.train_x)} images)")
    if n_train < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} exceeds the {n_train} training images; lower it")
    world = cfg.runtime.devices * cfg.runtime.num_nodes
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be divisible by the {world} processes "
                          "(runtime.devices x runtime.num_nodes)")


def absolute_paths(cfg: Config) -> Config:
    """Dataset files and data folders as absolute paths: a run's data is read again later (eval, sample, resume)
    from wherever the user then is."""
    from .data import KNOWN

    absolute = {}
    if cfg.data.dataset not in KNOWN and Path(cfg.data.dataset).suffix in (".npz", ".npy"):
        absolute["data.dataset"] = str(Path(cfg.data.dataset).expanduser().absolute())
    if cfg.data.data_dir:
        absolute["data.data_dir"] = str(Path(cfg.data.data_dir).expanduser().absolute())
    return apply(cfg, absolute) if absolute else cfg


def ema_model(model: nn.Module, ema: EMA | None) -> nn.Module:
    """The model to evaluate: a copy holding the EMA weights when EMA is on, else the model itself."""
    if ema is None:
        return model
    copy = deepcopy(model)
    copy.load_state_dict(ema.shadow)
    return copy


@torch.no_grad()
def validation_elbo(model: nn.Module, val_x: Tensor, likelihood: str, device, batch: int = 1000) -> float:
    """Mean ELBO on the held-out split (fixed binarization; the training RNG stream is left untouched); for a model
    with only a stochastic bound, one draw of it per image."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    # one draw of the model's bound: its ELBO over explicit levels, or a stochastic bound (a diffusion model's VLB)
    bound = (lambda x: elbo(model, x)) if EXPLICIT_LEVELS in capabilities(model) else stochastic_bound_of(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x_all = test_input(val_x, likelihood)
        total = sum(bound(x_all[i:i + batch].to(device)).elbo.sum().item() for i in range(0, len(x_all), batch))
    model.train(was_training)
    return total / len(x_all)
