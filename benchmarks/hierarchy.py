"""Does the hierarchy pay? Flat VAE vs the seed's MHVAE (T = 2, 3) vs LadderVAE configurations.

Two stages, each a set of `hvae train` runs (niced, one torch thread each, at most --jobs at a time):
  select  candidates on a seeded validation split (data.validation=5000); ranks them by the last val_elbo
          in metrics.jsonl. The test set is never touched here.
  final   the chosen configurations on all 60,000 training images, then `hvae eval --k K --json`
          on the fixed-seed binarized test set (--limit N = its first N images) into RUN/eval-e<epochs>.json.
          With --extend, continue finished runs (`hvae train --resume RUN --epochs N`) and evaluate again.
  table   summarize finished run directories (no training).
  valiw   IW-NLL (k = --k, default 1000) and -ELBO on the first --limit images of each selection run's own
          validation split (the same seeded hold-out it was trained without): selection on the bound we report.
  speed   seconds per training step of each FINALS configuration, measured in one process, round-robin
          (so all models see the same load), one torch thread; reported x 468 steps as seconds/epoch.
  curve   each FINALS configuration from scratch (--seed), trained in stages to each --milestones epoch by exact
          resume (so the stages equal one run), evaluated after each stage on the first --limit test images
          into RUN/eval-e<N>.json and, at --full epochs, on all 10,000 into RUN/eval-e<N>-full.json.
  plot    test IW-NLL against epochs and against training seconds of run directories evaluated by `curve`:
          curves.png beside the first run, and the table of points. Seconds are the run's cumulative
          epoch_seconds, or with --speed FILE (written by `speed --json FILE`) epochs x that configuration's
          seconds/epoch measured round-robin in one process, which other jobs on the machine cannot skew.
Seconds per epoch is the median `epoch_seconds` of a run; its ratio is to the flat VAE's of the same stage,
trained side by side under the same load. Runs go to runs/hierarchy/<stage>/<name> (gitignored).

    python benchmarks/hierarchy.py select --epochs 6
    python benchmarks/hierarchy.py final --epochs 20 --k 1000 --limit 2000
    python benchmarks/hierarchy.py final --extend --epochs 100 --only best-ladder flat-vae-warmup --limit 2000
    python benchmarks/hierarchy.py select --epochs 20 --root runs/hierarchy/select20 --only mhvae-t3-warmup-fb ladder-prec-skip-ln-warmup
    python benchmarks/hierarchy.py table runs/hierarchy/final/* --at 20
    python benchmarks/hierarchy.py valiw runs/hierarchy/select/* --k 100 --limit 1000
    python benchmarks/hierarchy.py speed
    python benchmarks/hierarchy.py curve --seed 1 --root runs/hierarchy/seed1
    python benchmarks/hierarchy.py speed --json runs/hierarchy/speed.json
    python benchmarks/hierarchy.py plot runs/hierarchy/seed1/curve/* --speed runs/hierarchy/speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HVAE = [str(Path(sys.executable).with_name("hvae"))]
LADDER = ["--config", "configs/ladder.yaml"]

CANDIDATES: dict[str, list[str]] = {
    "flat-vae": ["--config", "configs/flat-vae.yaml"],
    "mhvae-t2": ["--config", "configs/mhvae-t2.yaml"],
    "ladder-res-skip-ln": LADDER,
    "ladder-res-noskip-ln": [*LADDER, "--set", "model.skip=false"],
    "ladder-res-skip-nonorm": [*LADDER, "--set", "model.norm=none"],
    "ladder-res-skip-bn": [*LADDER, "--set", "model.norm=batch"],
    "ladder-prec-skip-ln-warmup": [*LADDER, "--set", "model.posterior=precision", "--set", "objective.warmup_epochs=2"],
    "ladder-res-skip-ln-fb": [*LADDER, "--set", "objective.free_bits=2.0"],
    # Round 2, around the best of round 1 (precision + warm-up):
    "flat-vae-warmup": ["--config", "configs/flat-vae.yaml", "--set", "objective.warmup_epochs=2"],
    "ladder-prec-skip-ln": [*LADDER, "--set", "model.posterior=precision"],
    "ladder-res-skip-ln-warmup": [*LADDER, "--set", "objective.warmup_epochs=2"],
    "ladder-prec-skip-ln-warmup-t3": [*LADDER, "--set", "model.posterior=precision", "--set", "objective.warmup_epochs=2",
                                      "--set", "model.levels=3", "--set", "model.latent_dims=[32,16,8]"],
    "ladder-prec-skip-ln-warmup-32x2": [*LADDER, "--set", "model.posterior=precision", "--set", "objective.warmup_epochs=2",
                                        "--set", "model.latent_dims=[32,32]"],
    # Round 3 (20 epochs, --root runs/hierarchy/select20), the MHVAE T = 3 with warm-up + free bits against the
    # best ladder: chosen after its test figures at 20 epochs, so checked here on validation:
    "mhvae-t3-warmup-fb": ["--config", "configs/mhvae-t3.yaml", "--set", "objective.warmup_epochs=5",
                           "--set", "objective.free_bits=1.0"],
}

FINALS: dict[str, list[str]] = {
    "flat-vae": ["--config", "configs/flat-vae.yaml"],
    "flat-vae-warmup": ["--config", "configs/flat-vae.yaml", "--set", "objective.warmup_epochs=2"],
    "flat-vae-matched": ["--config", "configs/flat-vae-matched.yaml"],  # best-hierarchical's training options
    "best-ladder": ["--config", "configs/best-ladder.yaml"],
    "mhvae-t2": ["--config", "configs/mhvae-t2.yaml"],
    "mhvae-t3": ["--config", "configs/mhvae-t3.yaml"],
    # = configs/best-hierarchical.yaml (chosen on validation in round 3, see docs/hierarchical.md)
    "mhvae-t3-warmup-fb": ["--config", "configs/mhvae-t3.yaml", "--set", "objective.warmup_epochs=5",
                           "--set", "objective.free_bits=1.0"],
}


def train_cmd(args: list[str], out: Path, epochs: int, validation: int) -> list[str]:
    return ["nice", "-n", "10", *HVAE, "train", *args, "--epochs", str(epochs), "--set", "runtime.threads=1",
            "--set", f"data.validation={validation}", "--out", str(out), "--no-progress"]


def eval_cmd(out: Path, k: int, limit: int | None) -> list[str]:
    return ["OMP_NUM_THREADS=1", "nice", "-n", "10", *HVAE, "eval", str(out), "--k", str(k), "--json", "--no-progress",
            *(["--limit", str(limit)] if limit else [])]


def run_pool(jobs: list[tuple[str, list[list[str]], Path]], width: int) -> None:
    """Run each job's commands in order (train, then eval), `width` jobs at a time; logs beside the run."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < width:
            name, cmds, log = pending.pop(0)
            script = " && ".join(" ".join(c) for c in cmds)
            print(f"start {name}: {script}", file=sys.stderr)
            running.append((name, subprocess.Popen(["bash", "-c", script], cwd=ROOT, stdout=log.open("w"),
                                                   stderr=subprocess.STDOUT)))
        time.sleep(5)
        for name, proc in list(running):
            if proc.poll() is not None:
                print(f"done {name}: exit {proc.returncode}", file=sys.stderr)
                running.remove((name, proc))


MILESTONES = [1, 3, 10, 20, 40, 70, 100]


def curve_job(name: str, out: Path, seed: int, milestones: list[int], full: set[int], k: int, limit: int) -> list[list[str]]:
    """Train `name` to each milestone by resuming the same run; evaluate after each stage."""
    cmds = []
    for i, epochs in enumerate(milestones):
        if i == 0:
            cmds.append(train_cmd([*FINALS[name], "--set", f"train.seed={seed}"], out, epochs, 0))
        else:
            cmds.append(["nice", "-n", "10", *HVAE, "train", "--resume", str(out), "--epochs", str(epochs), "--no-progress"])
        cmds.append([*eval_cmd(out, k, limit), ">", str(out / f"eval-e{epochs}.json")])
        if epochs in full:
            cmds.append([*eval_cmd(out, k, None), ">", str(out / f"eval-e{epochs}-full.json")])
    return cmds


def read_eval(path: Path) -> dict | None:
    text = path.read_text().strip() if path.exists() else ""
    return json.loads(text.splitlines()[-1]) if text else None


def curve_points(run: Path, sec_per_epoch: float | None = None) -> list[tuple[int, float, float]]:
    """(epoch, training seconds, IW-NLL) at every epoch with an eval-e<N>.json; seconds are cumulative
    epoch_seconds, or epoch x sec_per_epoch when given."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    seconds, total = {}, 0.0
    for line in lines:
        if "epoch_seconds" in line:
            total += line["epoch_seconds"]
            seconds[line["epoch"]] = line["epoch"] * sec_per_epoch if sec_per_epoch else total
    points = []
    for epoch, sec in sorted(seconds.items()):
        ev = read_eval(run / f"eval-e{epoch}.json")
        if ev:
            points.append((epoch, sec, ev["iw_nll"]))
    return points


def plot_curves(runs: list[Path], speed: dict[str, float], points_of=None, ylabel: str = "", out: Path | None = None,
                time_label: str = "") -> Path:
    """IW-NLL against epochs and against training seconds, one line per run, to `out` (curves.png beside the first
    run by default). points_of(run, sec_per_epoch) -> [(epoch, seconds, IW-NLL)]: curve_points by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    lows: list[float] = []
    for run in runs:
        points = (points_of or curve_points)(run, speed.get(run.name))
        if not points:
            continue
        epochs, seconds, nll = zip(*points)
        lows += nll
        by_epoch.plot(epochs, nll, marker="o", label=run.name)
        by_time.plot(seconds, nll, marker="o", label=run.name)
    time_label = time_label or ("training seconds (one torch thread): epochs x measured s/epoch" if speed
                                else "training seconds (one torch thread)")
    for ax, label in ((by_epoch, "epochs"), (by_time, time_label)):
        ax.set_xlabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    by_epoch.set_ylabel(ylabel or "test IW-NLL, k = 1000, first 2000 images (nats)")
    if lows:
        by_epoch.set_ylim(min(lows) - 1, min(lows) + 15)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    out = out or runs[0].parent / "curves.png"
    fig.savefig(out, dpi=110)
    return out


def summarize(run: Path, at: int | None = None) -> dict:
    """Validation ELBO, median seconds/epoch over the first `at` epochs (all if None) and, if evaluated
    there, the eval JSON of one run directory."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs = [x for x in lines if "epoch_seconds" in x and (at is None or x["epoch"] <= at)]
    row = {"name": run.name, "epochs": len(epochs), "sec_per_epoch": statistics.median(x["epoch_seconds"] for x in epochs),
           "val_elbo": epochs[-1].get("val_elbo"), "train_elbo": epochs[-1]["train_elbo"]}
    ev = read_eval(run / f"eval-e{len(epochs)}.json")
    if ev:
        row.update(iw_nll=ev["iw_nll"], neg_elbo=-ev["elbo"], kl_per_level=ev["kl_per_level"],
                   active_units_per_level=ev["active_units_per_level"], k=ev["k"], n_images=ev["n_images"])
    return row


def table(runs: list[Path], at: int | None = None) -> str:
    rows = [summarize(r, at) for r in runs if (r / "metrics.jsonl").exists()]
    flat = next((r["sec_per_epoch"] for r in rows if r["name"] == "flat-vae"), None)
    out = ["| run | epochs | val ELBO | IW-NLL | -ELBO | KL per level (1 first) | active units | s/epoch | x flat |",
           "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for r in sorted(rows, key=lambda r: -(r["val_elbo"] or -1e9) if r.get("iw_nll") is None else r["iw_nll"]):
        kl = ", ".join(f"{v:.1f}" for v in r.get("kl_per_level", []))
        ratio = f"{r['sec_per_epoch'] / flat:.2f}" if flat else ""
        out.append(f"| {r['name']} | {r['epochs']} | {fmt(r['val_elbo'])} | {fmt(r.get('iw_nll'))} | "
                   f"{fmt(r.get('neg_elbo'))} | {kl} | {r.get('active_units_per_level', '')} | "
                   f"{r['sec_per_epoch']:.1f} | {ratio} |")
    return "\n".join(out)


def validation_iw(run: Path, k: int, limit: int) -> dict:
    """-ELBO and IW-NLL on the run's validation split (fixed-seed binarization), first `limit` images."""
    import hvae
    from hvae.config import from_dict
    from hvae.data import load_dataset, split_validation, test_input
    from hvae.evaluate import evaluate

    cfg = from_dict(json.loads((run / "config.json").read_text()))
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    _, _, val_x, _ = split_validation(data.train_x, data.train_y, cfg.data.validation, cfg.train.seed)
    if not len(val_x):
        raise SystemExit(f"{run} was trained without a validation split")
    result = evaluate(hvae.load(run), test_input(val_x, cfg.model.likelihood)[:limit], k=k, progress=False)
    return {"name": run.name, "val_iw_nll": result["iw_nll"], "val_neg_elbo": -result["elbo"],
            "kl_per_level": result["kl_per_level"]}


def step_speed(specs: dict[str, list[str]], rounds: int = 5, steps: int = 20) -> dict[str, float]:
    """Median over `rounds` of the mean time of `steps` training steps (batch 128, hvae train's optimizer) of each
    configuration (name -> its `hvae train` flags: --config FILE / --set KEY=VALUE), round-robin -> seconds/epoch."""
    import torch

    from hvae.config import Config, apply, load_yaml, parse_set
    from hvae.models import build_model
    from hvae.optim import make_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((128, 1, 28, 28), 0.3))
    setups = {}
    for name, args in specs.items():
        updates = {}
        for flag, value in zip(args[::2], args[1::2]):
            updates.update(load_yaml(ROOT / value) if flag == "--config" else parse_set([value]))
        cfg = apply(Config(), updates)
        model = build_model(cfg.model, (1, 28, 28))
        setups[name] = (model, make_optimizer(cfg.optim, model.parameters()), cfg.objective)  # as hvae train
    times: dict[str, list[float]] = {n: [] for n in specs}
    for _ in range(rounds):
        for name, (model, opt, spec) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss = -spec(model, x, spec.kl_weight(10**9, 1))[0].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[name].append((time.perf_counter() - start) / steps)
    return {n: statistics.median(t) * (60000 // 128) for n, t in times.items()}


def speed_stage(specs: dict[str, list[str]], json_path: Path | None, base: str, label: str) -> dict[str, float]:
    """step_speed of the configurations, written to json_path when given, printed as a table of ratios to `base`."""
    speeds = step_speed(specs)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(speeds, indent=2))
    ref = speeds.get(base)
    print(f"| configuration | s/epoch (468 steps, 1 thread) | x {label} |\n|---|---|---|")
    for name, sec in speeds.items():
        print(f"| {name} | {sec:.1f} | {sec / ref:.2f} |" if ref else f"| {name} | {sec:.1f} | |")
    return speeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("select", "final", "table", "valiw", "speed", "curve", "plot"))
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (table)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="run only these names")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--limit", type=int, help="evaluate the first N test images (default: all 10,000)")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "hierarchy")
    parser.add_argument("--extend", action="store_true", help="final: resume finished runs to --epochs")
    parser.add_argument("--at", type=int, help="table: summarize at this epoch")
    parser.add_argument("--json", type=Path, help="speed: also write {name: seconds/epoch} here")
    parser.add_argument("--speed", type=Path, help="plot: seconds/epoch per configuration (from speed --json)")
    parser.add_argument("--seed", type=int, default=0, help="curve: train.seed of the runs")
    parser.add_argument("--milestones", type=int, nargs="*", default=MILESTONES, help="curve: evaluate at these epochs")
    parser.add_argument("--full", type=int, nargs="*", default=[20, 100], help="curve: also evaluate all 10,000 here")
    args = parser.parse_args(argv)
    if args.stage == "table":
        print(table(args.runs, args.at))
        return 0
    if args.stage == "speed":
        speed_stage({n: FINALS[n] for n in args.only or FINALS}, args.json, "flat-vae", "flat")
        return 0
    if args.stage == "valiw":
        rows = sorted((validation_iw(run, args.k, args.limit or 5000) for run in args.runs), key=lambda r: r["val_iw_nll"])
        print("| run | val IW-NLL | val -ELBO | KL per level |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['val_iw_nll']:.2f} | {r['val_neg_elbo']:.2f} | "
                  f"{', '.join(f'{v:.1f}' for v in r['kl_per_level'])} |")
        return 0
    if args.stage == "plot":
        speed = json.loads(args.speed.read_text()) if args.speed else {}
        print(plot_curves(args.runs, speed))
        print("| run | " + " | ".join(f"e{m}" for m in args.milestones) + " |")
        print("|---|" + "---|" * len(args.milestones))
        for run in args.runs:
            at = {e: (s, v) for e, s, v in curve_points(run, speed.get(run.name))}
            cells = [f"{at[m][1]:.2f} ({at[m][0]:.0f} s)" if m in at else "" for m in args.milestones]
            print(f"| {run.name} | " + " | ".join(cells) + " |")
        return 0
    if args.stage == "curve":
        names = args.only or list(FINALS)
        jobs = []
        for name in names:
            out = args.root / "curve" / name
            out.parent.mkdir(parents=True, exist_ok=True)
            cmds = curve_job(name, out, args.seed, sorted(args.milestones), set(args.full), args.k, args.limit or 2000)
            jobs.append((name, cmds, out.with_name(f"{name}.log")))
        run_pool(jobs, args.jobs)
        return 0
    specs = CANDIDATES if args.stage == "select" else FINALS
    names = args.only or list(specs)
    jobs = []
    for name in names:
        out = args.root / args.stage / name
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.extend:
            cmds = [["nice", "-n", "10", *HVAE, "train", "--resume", str(out), "--epochs", str(args.epochs), "--no-progress"]]
        else:
            cmds = [train_cmd(specs[name], out, args.epochs, 5000 if args.stage == "select" else 0)]
        if args.stage == "final":
            cmds.append([*eval_cmd(out, args.k, args.limit), ">", str(out / f"eval-e{args.epochs}.json")])
        jobs.append((name, cmds, out.with_name(f"{name}-e{args.epochs}.log")))
    run_pool(jobs, args.jobs)
    print(table([args.root / args.stage / n for n in names], args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
