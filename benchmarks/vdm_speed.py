"""Seconds per training epoch of each VDM denoiser as a ratio to the flat VAE, timed side by side in one process.

Each contender runs `--steps` training steps (objective, backward, hvae's fused Adam) on the same batch of 128
Fashion-MNIST-shaped images (binarized, or 8-bit with --data 8bit), in rounds that alternate the contenders, so drift in the machine's speed touches all
alike; the figure is the median over rounds, scaled to an epoch of 60,000 images, and the paired ratio per round.

    python benchmarks/vdm_speed.py --rounds 5 --steps 20 --threads 2
    python benchmarks/vdm_speed.py --data 8bit --rounds 5 --steps 10 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hvae.config import Config, apply  # noqa: E402
from hvae.bins import bin_centres  # noqa: E402
from hvae.data import to_model_input  # noqa: E402
from hvae.models import build_model  # noqa: E402
from hvae.optim import make_optimizer  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402

ALL_BINS = "VDM, MLP denoiser 3 x 1024, all 256 bins per value (before bins.py)"
CONTENDERS = {  # per --data; the first of each is the baseline
    "binarized": {
        "flat VAE (default)": {},
        "VDM, MLP denoiser 3 x 1024": {"model.name": "vdm"},
        "VDM, conv U-Net [32, 64]": {"model.name": "vdm", "model.denoiser": "unet"},
    },
    "8bit": {
        "flat VAE, discretized logistic": {"model.likelihood": "logistic"},
        "VDM, MLP denoiser 3 x 1024, 256 bins": {"model.name": "vdm", "model.likelihood": "categorical"},
        ALL_BINS: {"model.name": "vdm", "model.likelihood": "categorical"},
    },
}


def brute_grid_mean(m: torch.Tensor, precision: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bins.grid_gaussian_mean by a softmax over all V bins: what the x-prediction computed before bins.py."""
    c = bin_centres(vocab_size, m.dtype, m.device)
    return torch.softmax(-0.5 * precision.unsqueeze(-1) * (c - m.unsqueeze(-1)).square(), dim=-1) @ c


def all_bins():
    """The 256-bin computations bins.py replaced, patched in: the x-prediction's mean and the likelihood's window
    (a half width of V bins: the softmax runs over all of them)."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("hvae.models.vdm.grid_gaussian_mean", brute_grid_mean))
    stack.enter_context(mock.patch("hvae.likelihoods.window_half_width", lambda std, v: v))
    return stack


def step_seconds(cfg: Config, x: torch.Tensor, steps: int) -> float:
    """Mean seconds of one training step after one untimed warm-up step."""
    torch.manual_seed(0)
    model = build_model(cfg.model, x.shape[1:])
    optimizer = make_optimizer(cfg.optim, model.parameters())
    objective = cfg.objective

    def step():
        loss = -objective(model, x, 1.0)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", choices=tuple(CONTENDERS), default="binarized",
                    help="binarized images (VAE, MLP and U-Net VDMs) or 8-bit ones (logistic VAE, 256-bin VDM)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    configs = {name: apply(Config(), updates) for name, updates in CONTENDERS[args.data].items()}
    # 8-bit: what the loop feeds each likelihood, the [-1, 1] grid (logistic) or k/255 (categorical)
    inputs = {name: to_model_input(images, cfg.model.likelihood) for name, cfg in configs.items()}
    if args.data == "binarized":  # the batch section 9d was measured on
        binary = torch.bernoulli(torch.full((128, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
        inputs = {name: binary for name in configs}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, cfg in configs.items():
            with all_bins() if name == ALL_BINS else contextlib.nullcontext():
                times[name].append(step_seconds(cfg, inputs[name], args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()), file=sys.stderr)
    base = next(iter(times.values()))
    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}; batch 128, {args.steps} steps x "
          f"{args.rounds} rounds")
    print(f"| model | ms / step | s / epoch (60,000 images) | ratio to {next(iter(times))} (paired, min-max) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, base)]
        print(f"| {name} | {statistics.median(t) * 1e3:.1f} | {statistics.median(t) * (60000 // 128):.1f} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
