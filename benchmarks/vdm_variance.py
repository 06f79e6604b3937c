"""Estimator variance per example of one trained VDM: continuous time, discrete T, and the explicit-MHVAE ELBO.

The same network (a run's EMA weights) scores the first --images test images (fixed binarization) with each
estimator, --draws independent draws per image; the table gives each estimator's mean (nats, -ELBO) and the mean over
images of the per-image standard deviation over draws, and what that standard deviation means for the standard error
of a one-draw-per-image pass over the 10,000 test images (sd / 100, as the images' draws are independent).

    python benchmarks/vdm_variance.py runs/vdm --images 200 --draws 32
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import hvae  # noqa: E402
from hvae import checkpoint as ckpt  # noqa: E402
from hvae.data import load_dataset, test_input  # noqa: E402
from hvae.diffusion import vdm_bound  # noqa: E402
from hvae.objectives import elbo  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402


def per_image_draws(estimate, x: torch.Tensor, draws: int) -> torch.Tensor:
    """[draws, N] values of -ELBO per image."""
    return torch.stack([-estimate(x) for _ in range(draws)]).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = hvae.load(args.run)
    cfg = ckpt.read_config(args.run)
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    x = test_input(data.test_x, cfg.model.likelihood)[: args.images]
    trained_t = model.timesteps

    def with_t(steps: int, fn):
        def run(xb):
            model.timesteps = steps
            try:
                return fn(xb)
            finally:
                model.timesteps = trained_t
        return run

    estimators = {
        "continuous time, 1 draw": with_t(0, lambda xb: vdm_bound(model, xb).elbo),
        "continuous time, 8 stratified draws": with_t(0, lambda xb: vdm_bound(model, xb, draws=8).elbo),
        "discrete T = 1000, 1 draw": with_t(1000, lambda xb: vdm_bound(model, xb).elbo),
        "discrete T = 16, 1 draw": with_t(16, lambda xb: vdm_bound(model, xb).elbo),
        "explicit MHVAE levels T = 16 (objectives.elbo)": with_t(16, lambda xb: elbo(model, xb).elbo),
    }
    print(f"{args.run} ({cfg.model.name}, trained with T = {trained_t}); CPU: {cpu_name()}; first {args.images} test "
          f"images, {args.draws} draws each")
    print("| estimator | -ELBO, nats (mean) | per-image sd over draws | SE of one pass over 10k images |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for name, estimate in estimators.items():
            values = per_image_draws(estimate, x, args.draws)  # [draws, N]
            sd = values.std(0).mean().item()
            print(f"| {name} | {values.mean().item():.2f} | {sd:.2f} | {sd / math.sqrt(10_000):.3f} |")


if __name__ == "__main__":
    main()
