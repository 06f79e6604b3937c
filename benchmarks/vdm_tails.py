"""The tail of a VDM's per-draw losses, as trained and with its bin-posterior correction bounded after training.

One run's EMA model scores the first --images test images with --draws stratified (t, eps) draws each; each bound
(0: as trained) sees the same draws. Per row: the mean -VLB with its standard error over the draws, the median, the
largest draw and the count of draws above 1000 nats.

    python benchmarks/vdm_tails.py runs/vdm --images 10000 --draws 4 --bounds 0,50,20,10
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
from hvae.diffusion import vdm_terms  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--bounds", default="0,50,20,10", help="correction bounds A, comma-separated (0: unbounded)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = hvae.load(args.run)
    cfg = ckpt.read_config(args.run)
    x = test_input(load_dataset(cfg.data.dataset, cfg.data.data_dir).test_x, cfg.model.likelihood)[: args.images]
    print(f"{args.run}; CPU: {cpu_name()}; first {len(x)} test images, {args.draws} draws each")
    print("| correction bound | -VLB, mean ± SE over draws | median draw | largest draw | draws > 1000 nats |")
    print("|---|---|---|---|---|")
    for bound in (float(b) for b in args.bounds.split(",")):
        model.correction_bound = bound
        generator = torch.Generator().manual_seed(0)  # the same draws for every bound
        with torch.no_grad():
            losses = torch.cat([-vdm_terms(model, x[i:i + args.batch_size], generator=generator).elbo
                                for _ in range(args.draws) for i in range(0, len(x), args.batch_size)]).double()
        se = losses.std() / math.sqrt(len(losses))
        print(f"| {bound:g} | {losses.mean():.2f} ± {se:.2f} | {losses.median():.2f} | {losses.max():.6g} | "
              f"{int((losses > 1000).sum())} of {len(losses)} |", flush=True)


if __name__ == "__main__":
    main()
