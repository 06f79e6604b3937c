"""The VDM's test VLB against training epochs and seconds: train in stages, evaluating after each.

Trains `hvae train --model vdm ...` to the first stage's epochs, then resumes it stage by stage (a resume replays an
uninterrupted run exactly on a CPU, so the stages do not change the run); after each stage the EMA weights are
evaluated on the first --limit test images (fixed binarization), --passes passes of --draws stratified draws per
image. Each line of RUN/curve.jsonl: epoch, training seconds so far (the sum of the run's epoch_seconds), the VLB
(elbo, nats; a one-sample bound, not an IW-NLL), elbo_se, its terms, bits/dim. Stops starting stages after
--minutes of wall time.

    python benchmarks/vdm_curve.py --out runs/vdm-curve --every 10 --minutes 90 --set optim.ema=0.999
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hvae.cli import main as hvae  # noqa: E402


def train_seconds(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r["epoch_seconds"] for r in records if "epoch_seconds" in r)


def evaluate(run: Path, limit: int, passes: int, draws: int, device: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert hvae(["eval", run, "--limit", limit, "--passes", passes, "--draws", draws, "--json", "--no-progress",
                     "--device", device]) == 0
    return json.loads(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", type=int, default=10, help="epochs per stage")
    ap.add_argument("--epochs", type=int, default=1000, help="stop after this many epochs")
    ap.add_argument("--minutes", type=float, default=120.0, help="start no stage after this much wall time")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="config keys for hvae train, as --set")
    args = ap.parse_args()
    start, epoch = time.perf_counter(), 0
    extra = [a for item in args.set for a in ("--set", item)]
    while epoch < args.epochs and (time.perf_counter() - start) / 60 < args.minutes:
        epoch = min(args.epochs, epoch + args.every)
        if (args.out / "checkpoints").exists():
            argv = ["train", "--resume", args.out, "--epochs", epoch, "--no-progress"]
        else:
            argv = ["train", "--model", "vdm", "--epochs", epoch, "--out", args.out, "--no-progress", *extra]
        assert hvae(argv) == 0
        result = evaluate(args.out, args.limit, args.passes, args.draws, args.device)
        line = {"epoch": epoch, "train_seconds": train_seconds(args.out), "wall_minutes": (time.perf_counter() - start) / 60,
                **{k: result[k] for k in ("elbo", "elbo_se", "reconstruction", "prior_kl", "diffusion", "bits_per_dim",
                                          "n_images", "passes", "draws")}}
        with open(args.out / "curve.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), file=sys.stderr)


if __name__ == "__main__":
    main()
