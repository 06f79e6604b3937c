"""The training step's update guard with and without a host-device sync per step, side by side.

`hvae train` keeps the guard's verdict on the device where a sync costs (not on a CPU, see hvae.optim.defer_guard).
This times `hvae train`'s loop both ways on one device, alternating, each as a 2-epoch minus a 1-epoch run, and
reports how far the two runs' final weights are apart (0 on a CPU, where both are bit for bit the same).

    python benchmarks/guard_sync.py --device cuda --repeats 5 --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hvae.optim as tr  # noqa: E402
from hvae.loop import fit  # noqa: E402
from clock import add_clock_option, start_clock  # noqa: E402
from throughput import hvae_epoch_diff  # noqa: E402

from hvae.config import Config, apply  # noqa: E402
from hvae.data import load_dataset  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402


def final_weights(cfg: Config, train_u8: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        fit(apply(cfg, {"data.validation": len(train_u8) - steps * cfg.train.batch_size}), Path(tmp) / "run",
                 progress=False)
        return load_file(Path(tmp) / "run" / "checkpoints" / "last" / "model.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path)
    add_clock_option(ap)
    args = ap.parse_args()
    clock = start_clock(args)
    dev = torch.device(args.device)
    data = load_dataset("fashion-mnist", args.data_dir)
    cfg = apply(Config(), {"train.epochs": 1, "runtime.threads": args.threads, "train.batch_size": args.batch, "runtime.accelerator": dev.type,
                           **({"data.data_dir": str(args.data_dir)} if args.data_dir else {})})
    real = tr.defer_guard
    ways = {"host-side guard (a sync per step)": lambda *a: False, "device-side guard (no sync)": lambda *a: True}
    speeds: dict[str, list[float]] = {name: [] for name in ways}
    weights = {}
    try:
        for name, decide in ways.items():
            tr.defer_guard = decide
            weights[name] = final_weights(cfg, data.train_x, args.steps)
        for _ in range(args.repeats):
            for name, decide in ways.items():
                tr.defer_guard = decide
                speeds[name].append(hvae_epoch_diff(cfg, data.train_x, args.steps, clock))
    finally:
        tr.defer_guard = real
    a, b = weights.values()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    default = "device-side" if real(cfg.optim, tr.make_optimizer(cfg.optim, [torch.zeros(1, requires_grad=True)]), dev, None) \
        else "host-side"
    print(f"{where}, torch {torch.__version__}, {args.steps} steps of batch {cfg.train.batch_size}; "
          f"hvae train's default here: the {default} guard")
    base = statistics.median(speeds[next(iter(ways))])
    for name, v in speeds.items():
        print(f"{name}: {statistics.median(v):,.0f} examples/s ({statistics.median(v) / base:.2f}x)")
    print(f"largest gap between the two runs' final weights: {gap:.3g}")


if __name__ == "__main__":
    main()
