"""The deep convolutional hierarchy (issue 20): candidates of `model.arch: spatial` against the conv ladder and the
conv flat VAE, at equal training seconds.

Stages (runs under runs/conv/<stage>/<name>, gitignored; one torch thread per run, --jobs runs at a time):
  speed   seconds per epoch of each configuration (training steps, batch 128, round-robin in one process, one
          thread): the ratios that set each candidate's epochs in `select`.
  select  every candidate (or --only) on the seeded validation split (data.validation=5000) for --seconds of
          training each (epochs = seconds / its measured s/epoch from --speed FILE), then its validation -ELBO
          and IW-NLL (k = --k on the first --limit validation images). The test set is not touched.
  table   summarize run directories: hierarchy.py's table, then each run's validation bounds as in select.
  plot    the budget runs' curves (benchmarks/curve.py's curve.jsonl in each run directory): test IW-NLL against
          epochs and training seconds, to --png (and the table of points).

    python benchmarks/conv.py speed --json runs/conv/speed.json
    python benchmarks/conv.py select --speed runs/conv/speed.json --seconds 480 --only sp-res sp-bottleneck
    python benchmarks/conv.py plot runs/s5/conv-ladder runs/s6/best-conv-s0 --png docs/conv-curves.png
The budget runs themselves go through benchmarks/curve.py (stages at equal training seconds); BENCHMARKS.md
section 13 gives their commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from hierarchy import HVAE, ROOT, plot_curves, run_pool, speed_stage, table, validation_iw  # noqa: E402

BEST = ["--config", "configs/best-conv.yaml"]
CONV_LADDER = ["--config", "configs/best-ladder.yaml", "--set", "model.arch=conv"]
SPATIAL = ["--set", "model.name=ladder", "--set", "model.arch=spatial", "--set", "model.levels=3", "--set",
           "model.groups=[1,2]", "--set", "model.latent_dim=8", "--set", "objective.warmup_epochs=2"]

SPECS: dict[str, list[str]] = {
    "conv-ladder": CONV_LADDER,  # the baseline that sets the budget: 150 epochs of it
    "sp-res": SPATIAL,  # 3 levels: one 14x14 group, two 7x7 groups, 8 channels each; residual 3x3 cells
    "sp-bottleneck": [*SPATIAL, "--set", "model.cell=bottleneck"],
    "sp-separable": [*SPATIAL, "--set", "model.cell=separable"],
    "sp-res-se": [*SPATIAL, "--set", "model.se=true"],
    "sp-res-balance": [*SPATIAL, "--set", "objective.balance=true"],
    "sp-res-nowarmup": [*SPATIAL, "--set", "objective.warmup_epochs=0"],
    "sp-res-22": [*SPATIAL, "--set", "model.levels=4", "--set", "model.groups=[2,2]"],
    "sp-res-03": [*SPATIAL, "--set", "model.groups=[0,3]"],  # every level at 7x7, none at 14x14
    # a vector level of 32 values above the groups (VDVAE's 1x1 top)
    "sp-res-vtop": [*SPATIAL, "--set", "model.vector_top=true", "--set", "model.levels=4", "--set",
                    "model.latent_dims=[8,8,8,32]"],
    # the two that helped (every group at 7x7; the vector top) with a cell after the upsampling to 14x14
    "sp-03-vtop-dec": [*SPATIAL, "--set", "model.groups=[0,3]", "--set", "model.vector_top=true", "--set",
                       "model.levels=4", "--set", "model.latent_dims=[8,8,8,32]", "--set", "model.decoder_cells=1"],
    "sp-res-cells2": [*SPATIAL, "--set", "model.cells=2"],
    "sp-res-precision": [*SPATIAL, "--set", "model.posterior=precision"],
    # the cosine lr schedule annealed over the screen's 10 epochs of sp-res (a budget run anneals over its own)
    "sp-res-cosine": [*SPATIAL, "--set", "optim.schedule=cosine", "--set", "optim.decay_epochs=10"],
    "conv-flat-map": [*SPATIAL, "--set", "model.levels=1", "--set", "model.groups=[0,1]"],  # one 7x7 latent map
    # the shipped presets: the screen's best, and its flat baseline (the same cells, the vector top as its one level)
    "best-conv": BEST,
    "conv-flat": ["--config", "configs/conv-flat.yaml"],
    # best-conv's variants (BENCHMARKS.md 13e): its collapsed third 7x7 group dropped; NVAE's spectral
    # regularization; an EMA of the weights for evaluation; KL balancing; a cosine lr schedule
    "bc-02": [*BEST, "--set", "model.levels=3", "--set", "model.groups=[0,2]", "--set", "model.latent_dims=[8,8,32]"],
    "bc-spectral": [*BEST, "--set", "optim.spectral_reg=0.01"],
    "bc-ema": [*BEST, "--set", "optim.ema=0.999"],
    "bc-balance": [*BEST, "--set", "objective.balance=true"],
    # the cosine lr schedule annealed to 0 over the screen's 10 epochs (a budget run anneals over its own)
    "bc-cosine": [*BEST, "--set", "optim.schedule=cosine", "--set", "optim.decay_epochs=10"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("speed", "select", "table", "plot"))
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (table)")
    parser.add_argument("--only", nargs="*", help="these configurations only")
    parser.add_argument("--json", type=Path, help="speed: also write {name: seconds/epoch} here")
    parser.add_argument("--speed", type=Path, help="select: the speed stage's JSON")
    parser.add_argument("--seconds", type=float, default=480.0, help="select: training seconds per candidate")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "conv")
    parser.add_argument("--png", type=Path, help="plot: the figure's path (default: curves.png beside the first run)")
    args = parser.parse_args(argv)
    names = args.only or list(SPECS)
    if args.stage == "table":
        report(args.runs, args.k, args.limit)
        return 0
    if args.stage == "plot":
        plot_budget(args.runs, args.png)
        return 0
    if args.stage == "speed":
        speed_stage({n: SPECS[n] for n in names}, args.json, "conv-ladder", "conv ladder")
        return 0
    if not args.speed:
        parser.error("select needs --speed FILE (from the speed stage), to give each candidate equal seconds")
    speeds = json.loads(args.speed.read_text())
    jobs = []
    for name in names:
        out = args.root / "select" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        epochs = max(1, round(args.seconds / speeds[name]))
        cmd = [*HVAE, "train", *SPECS[name], "--epochs", str(epochs), "--set", "runtime.threads=1",
               "--set", "data.validation=5000", "--out", str(out), "--no-progress"]
        jobs.append((name, [cmd], out.with_name(f"{name}.log")))
    run_pool(jobs, args.jobs)
    report([args.root / "select" / n for n in names], args.k, args.limit)
    return 0


def budget_points(run: Path, _sec_per_epoch: float | None = None) -> list[tuple[int, float, float]]:
    """(epoch, training seconds, IW-NLL) of each line of run/curve.jsonl (benchmarks/curve.py)."""
    lines = [json.loads(x) for x in (run / "curve.jsonl").read_text().splitlines() if x.strip()]
    return [(r["epoch"], r["train_seconds"], r["iw_nll"]) for r in lines if "iw_nll" in r]


def plot_budget(runs: list[Path], png: Path | None) -> None:
    """The figure of the budget runs, then their points as a table (k and images as each curve was evaluated)."""
    first = json.loads((runs[0] / "curve.jsonl").read_text().splitlines()[0])
    scope = f"k = {first['k']}, first {first['n_images']} images"
    print(plot_curves(runs, {}, budget_points, f"test IW-NLL, {scope} (nats)", png,
                      "training seconds (one torch thread, the other core busy)"))
    print(f"| run | epoch | training s | IW-NLL ({scope}) |\n|---|---|---|---|")
    for run in runs:
        for epoch, seconds, nll in budget_points(run):
            print(f"| {run.name} | {epoch} | {seconds:,.0f} | {nll:.2f} |")


def report(runs: list[Path], k: int, limit: int) -> None:
    """hierarchy.py's table of the runs, then their validation IW-NLL (k) and -ELBO on the first `limit` images of
    their own held-out split, best first, computed on one thread (not to take a core from a timed job)."""
    import torch

    torch.set_num_threads(1)
    print(table(runs))
    print("| run | val IW-NLL | val -ELBO | KL per level |\n|---|---|---|---|")
    for run in sorted((validation_iw(r, k, limit) for r in runs), key=lambda r: r["val_iw_nll"]):
        print(f"| {run['name']} | {run['val_iw_nll']:.2f} | {run['val_neg_elbo']:.2f} | "
              f"{', '.join(f'{v:.1f}' for v in run['kl_per_level'])} |")


if __name__ == "__main__":
    sys.exit(main())
