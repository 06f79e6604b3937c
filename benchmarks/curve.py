"""A model's test bound against training epochs and seconds: train in stages, evaluating after each.

Trains `hvae train ARGS --epochs E --out RUN` to the first stage, then resumes it stage by stage (a resume replays an
uninterrupted run exactly on a CPU, so the stages do not change the run). After each stage the run (its EMA weights
when on) is evaluated on the first --limit test images: the IW bound with --k samples for a model with explicit
levels, the VLB over --passes passes of --draws stratified draws per image for a diffusion model. Each line of
RUN/curve.jsonl: epoch, training seconds so far (the sum of the run's epoch_seconds), wall minutes, and the
evaluation's figures. Stops starting stages after --minutes of wall time or once the training seconds reach
--budget-seconds (so that models can be compared at equal training seconds): the stage that would pass the budget
is shortened to the epochs that end nearest it, at the run's mean seconds per epoch so far. Run again on the same
--out (e.g. after a stop), it continues the run from its last checkpoint and its curve from its last line.

    python benchmarks/curve.py --out runs/vdm-curve --every 10 --minutes 90 -- --model vdm --set optim.ema=0.999
    python benchmarks/curve.py --out runs/vae-8bit --budget-seconds 1800 -- --set model.likelihood=logistic
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

KEYS = ("elbo", "elbo_se", "iw_nll", "k", "reconstruction", "kl", "prior_kl", "diffusion", "bits_per_dim", "n_images",
        "passes", "draws")


def train_seconds(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r["epoch_seconds"] for r in records if "epoch_seconds" in r)


def epochs_done(run: Path) -> int:
    """Whole epochs of the run (0 if none): its last epoch record in metrics.jsonl."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((int(r["epoch"]) for r in map(json.loads, lines) if "epoch_seconds" in r), default=0)


def next_stage(epoch: int, every: int, spent: float, budget: float) -> int:
    """Epochs of the next stage: `every`, or, where that would pass the budget, the epochs that end nearest it at the
    mean seconds per epoch so far (0: stop here)."""
    if epoch == 0 or budget == float("inf"):
        return every
    return max(0, min(every, round((budget - spent) / (spent / epoch))))


def evaluate(run: Path, args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert hvae(["eval", run, "--limit", args.limit, "--k", args.k, "--passes", args.passes, "--draws",
                     args.draws, "--json", "--no-progress", "--device", args.device]) == 0
    return json.loads(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", type=int, default=10, help="epochs per stage")
    ap.add_argument("--epochs", type=int, default=10_000, help="stop after this many epochs")
    ap.add_argument("--minutes", type=float, default=120.0, help="start no stage after this much wall time")
    ap.add_argument("--budget-seconds", type=float, default=float("inf"),
                    help="end the last stage nearest these training seconds")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("train_args", nargs="*", help="after --: arguments for hvae train (not --epochs, --out)")
    args = ap.parse_args()
    start = time.perf_counter()

    def record(epoch: int) -> None:
        result = evaluate(args.out, args)
        line = {"epoch": epoch, "train_seconds": train_seconds(args.out),
                "wall_minutes": (time.perf_counter() - start) / 60, **{k: result[k] for k in KEYS if k in result}}
        with open(args.out / "curve.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), file=sys.stderr)

    # A run already there is continued from its last whole epoch (evaluated first if the curve lacks it), the next
    # stage ending on a multiple of --every as in an uninterrupted run.
    epoch = epochs_done(args.out) if (args.out / "checkpoints").exists() else 0
    curve = args.out / "curve.jsonl"
    if epoch and epoch not in {json.loads(x)["epoch"] for x in (curve.read_text().splitlines() if curve.exists() else [])}:
        record(epoch)
    while (epoch < args.epochs and (time.perf_counter() - start) / 60 < args.minutes
           and (epoch == 0 or train_seconds(args.out) < args.budget_seconds)):
        stage = min(next_stage(epoch, args.every, train_seconds(args.out) if epoch else 0.0, args.budget_seconds),
                    args.every - epoch % args.every)
        if stage < 1:
            break
        epoch = min(args.epochs, epoch + stage)
        if (args.out / "checkpoints").exists():
            argv = ["train", "--resume", args.out, "--epochs", epoch, "--no-progress"]
        else:
            argv = ["train", *args.train_args, "--epochs", epoch, "--out", args.out, "--no-progress"]
        assert hvae(argv) == 0
        record(epoch)


if __name__ == "__main__":
    main()
