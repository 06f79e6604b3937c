"""Seconds per training epoch of each VDM denoiser as a ratio to the flat VAE, timed side by side in one process.

Each contender runs `--steps` training steps (objective, backward, hvae's fused Adam) on the same binarized batch of
128 Fashion-MNIST-shaped images, in rounds that alternate the contenders, so drift in the machine's speed touches all
alike; the figure is the median over rounds, scaled to an epoch of 60,000 images, and the paired ratio per round.

    python benchmarks/vdm_speed.py --rounds 5 --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hvae.config import Config, apply  # noqa: E402
from hvae.models import build_model  # noqa: E402
from hvae.optim import make_optimizer  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402

CONTENDERS = {
    "flat VAE (default)": {},
    "VDM, MLP denoiser 3 x 1024": {"model.name": "vdm"},
    "VDM, conv U-Net [32, 64]": {"model.name": "vdm", "model.denoiser": "unet"},
}


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.bernoulli(torch.full((128, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    configs = {name: apply(Config(), updates) for name, updates in CONTENDERS.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, cfg in configs.items():
            times[name].append(step_seconds(cfg, x, args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()), file=sys.stderr)
    base = times["flat VAE (default)"]
    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}; batch 128, {args.steps} steps x "
          f"{args.rounds} rounds")
    print("| model | ms / step | s / epoch (60,000 images) | ratio to the flat VAE (paired, min-max) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, base)]
        print(f"| {name} | {statistics.median(t) * 1e3:.1f} | {statistics.median(t) * (60000 // 128):.1f} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
