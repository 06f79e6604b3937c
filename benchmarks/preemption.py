"""What surviving preemption costs and what a preemption loses (BENCHMARKS.md, "Preemption").

    python benchmarks/preemption.py save   # checkpoint write time of three models, as a share of an epoch
    python benchmarks/preemption.py sync   # the per-step stop/checkpoint agreement under DDP (2 gloo processes)
    python benchmarks/preemption.py lost   # steps lost after SIGTERM, and after SIGKILL with checkpoint_minutes

Fashion-MNIST (the IDX files in /usr/share/datasets/fashion-mnist or --data-dir), one torch thread throughout.
`save` times `hvae.loop.save` (the loop's own checkpoint: state, optimizer, fsync'd safetensors, renames) at the
epoch ends of a real `fit` over a slice of the training set, and the epoch from the same run, scaled to the full
60,000 images. `lost` runs real `hvae train` processes and signals them at random times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import hvae.loop as loop  # noqa: E402
from hvae import checkpoint as ckpt  # noqa: E402
from hvae.config import apply, resolve  # noqa: E402
from hvae.data import load_dataset  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402

MODELS = {"default VAE": ([], []),
          "best-hierarchical (MHVAE, T = 3)": ([ROOT / "configs/best-hierarchical.yaml"], []),
          "conv LadderVAE (best-ladder + model.arch=conv)": ([ROOT / "configs/best-ladder.yaml"], ["model.arch=conv"])}


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def measure_save(args) -> None:
    """Per model: the median loop.save time and the median epoch time over `--steps`-step epochs, scaled."""
    data = load_dataset("fashion-mnist", args.data_dir)
    for name, (presets, sets) in MODELS.items():
        cfg = apply(resolve(presets, {}, sets), {"train.epochs": args.epochs, "runtime.threads": 1,
                                                 "train.checkpoint_minutes": 0, "data.data_dir": args.data_dir})
        n = args.steps * cfg.train.batch_size
        part = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
        saves, real = [], loop.save

        def timed(*a, **kw):
            start = time.perf_counter()
            real(*a, **kw)
            saves.append(time.perf_counter() - start)

        loop.save = timed
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            loop.fit(cfg, Path(tmp) / "run", progress=False, data=part)
            epochs = [r["epoch_seconds"] for r in map(json.loads, (Path(tmp) / "run/metrics.jsonl").read_text()
                                                          .splitlines()) if "epoch_seconds" in r][1:]  # warm ones
            size = sum(f.stat().st_size for f in (Path(tmp) / "run/checkpoints/last").iterdir())
        loop.save = real
        save, epoch = statistics.median(saves[1:]), statistics.median(epochs) * len(data.train_x) / n
        print(json.dumps({"model": name, "checkpoint_mb": round(size / 2**20, 2), "save_s": round(save, 4),
                          "epoch_s_60k": round(epoch, 1), "share": f"{100 * save / epoch:.3f}%",
                          "saves": len(saves), "load": load()}), flush=True)


def _sync_rank(rank: int, args) -> None:
    """One of two gloo ranks: DDP steps of the default VAE (local batch 64), each followed by the loop's agreement
    (Preemption.checkpoint_due: an exchange every AGREE_EVERY steps, read AGREE_EVERY steps later) or, in alternate
    blocks, a blocking all-reduce of the same flags at every step (the plain way), or nothing (the control: on a
    loaded machine an empty window after a step already takes milliseconds now and then). The time spent in that
    call is timed call by call (not as a difference of step times, which the load of a shared machine swamps), in
    wall time and in CPU time of the main thread. Rank 0 prints medians, 90th percentiles and the mean share of a
    step."""
    from hvae.config import Config
    from hvae.models import build_model
    from hvae.preemption import Preemption

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)
    cfg = Config()
    model = build_model(cfg.model, (1, 28, 28))
    objective = torch.nn.parallel.DistributedDataParallel(loop.Objective(model, cfg.objective))
    opt = torch.optim.Adam(model.parameters(), fused=True)
    x, kl_weight = torch.bernoulli(torch.rand(64, 1, 28, 28)), torch.tensor(1.0)
    preemption = Preemption(cfg.train, world=2).start()
    arms = ("nothing (control)", "the loop's", "blocking, every step")
    steps, calls, cpu, step_count = [], {arm: [] for arm in arms}, {arm: [] for arm in arms}, 0
    for block in range(len(arms) * (args.blocks + 1)):
        arm = arms[block % len(arms)]
        for step in range(args.block_steps):
            start = time.perf_counter()
            loss = -objective(x, kl_weight)[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mid, mid_cpu = time.perf_counter(), time.thread_time()
            step_count += 1
            if arm == "the loop's":
                preemption.checkpoint_due(step_count)
            elif arm == "blocking, every step":
                torch.distributed.all_reduce(torch.zeros(2), torch.distributed.ReduceOp.MAX, group=preemption.group)
            if block >= len(arms):  # the first round of blocks warms up
                steps.append(mid - start)
                calls[arm].append(time.perf_counter() - mid)
                cpu[arm].append(time.thread_time() - mid_cpu)
    preemption.close()
    if rank == 0:
        def ms(values, q):
            return round(1e3 * statistics.quantiles(values, n=10)[8] if q == 90 else 1e3 * statistics.median(values), 3)

        step = statistics.median(steps)
        print(json.dumps({"step_ms": ms(steps, 50), "load": load(), **{
            arm: {"median_ms": ms(v, 50), "p90_ms": ms(v, 90), "mean_share": f"{100 * statistics.fmean(v) / step:.2f}%",
                  "cpu_median_ms": ms(cpu[arm], 50), "cpu_mean_share": f"{100 * statistics.fmean(cpu[arm]) / step:.2f}%"}
            for arm, v in calls.items()}}), flush=True)
    torch.distributed.destroy_process_group()


def measure_lost(args) -> None:
    """Real `hvae train` processes (default VAE, log_every 1), signalled at random times: SIGTERM (the steps run
    after the signal, and lost), then SIGKILL with checkpoint_minutes (the steps and seconds lost)."""
    rng = random.Random(0)
    for kind in args.signals:
        for trial in range(args.trials):
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                out = Path(tmp) / "run"
                cmd = [sys.executable, "-m", "hvae", "train", "--epochs", "1000", "--set", "runtime.threads=1",
                       "--set", "train.log_every=1", "--set", f"train.checkpoint_minutes={args.minutes}",
                       "--no-progress", "--out", str(out)] + (["--data-dir", args.data_dir] if args.data_dir else [])
                proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
                while not steps_logged(out):
                    time.sleep(0.01)
                start, first = time.perf_counter(), steps_logged(out)[-1]
                wait = rng.uniform(*(args.term_after if kind == "SIGTERM" else args.kill_after))
                time.sleep(wait)
                seen = steps_logged(out)[-1]
                proc.send_signal(getattr(signal, kind))
                proc.communicate()
                rate = (seen - first) / (time.perf_counter() - start)  # steps per second (approximately)
                done, saved = steps_logged(out)[-1], ckpt.load_state(ckpt.checkpoint_dir(out))["step"]
                print(json.dumps({"signal": kind, "after_s": round(wait, 1), "exit": proc.returncode,
                                  "step_seen": seen, "last_step_done": done, "checkpoint_step": saved,
                                  "checkpoint": "epoch end" if saved % 468 == 0 else "timed or stop",
                                  "steps_lost": done - saved, "seconds_lost": round((done - saved) / rate, 2),
                                  "steps_per_s": round(rate, 1), "load": load()}), flush=True)


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("save", "sync", "lost"))
    ap.add_argument("--data-dir", help="folder holding fashion-mnist/ (default: the system's)")
    ap.add_argument("--tmp", default=None, help="where the runs are written (default: the system's temp folder)")
    ap.add_argument("--steps", type=int, default=40, help="save: steps per (sliced) epoch")
    ap.add_argument("--epochs", type=int, default=4, help="save: epochs (the first is a warm-up)")
    ap.add_argument("--blocks", type=int, default=5, help="sync: blocks of each kind")
    ap.add_argument("--block-steps", type=int, default=30, help="sync: steps per block")
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--trials", type=int, default=3, help="lost: processes per signal")
    ap.add_argument("--signals", nargs="+", default=["SIGTERM", "SIGKILL"], choices=("SIGTERM", "SIGKILL"))
    ap.add_argument("--minutes", type=float, default=0.05, help="lost: train.checkpoint_minutes")
    ap.add_argument("--term-after", type=float, nargs=2, default=(3.0, 8.0), help="lost: SIGTERM after U(a, b) s")
    ap.add_argument("--kill-after", type=float, nargs=2, default=(4.0, 25.0), help="lost: SIGKILL after U(a, b) s")
    args = ap.parse_args()
    print(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "load": load()}))
    if args.what == "save":
        measure_save(args)
    elif args.what == "sync":
        torch.multiprocessing.spawn(_sync_rank, args=(args,), nprocs=2)
    else:
        measure_lost(args)


if __name__ == "__main__":
    main()
