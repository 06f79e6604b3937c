"""Sample quality of several trained runs, one table: Fréchet distance, KID, precision and recall of --samples
samples at each temperature, the reference rows (training images; each model's reconstructions), and the seconds
each row took. Also times the feature network's training once, in a fresh cache.

    python benchmarks/sample_quality.py runs/fid/flat-vae runs/fid/best-hierarchical --temperatures 0.6,0.8,1 \
        --json runs/fid/quality.json

The figures are what `hvae eval RUN --fid-only --temperature ... --json` gives (the same library call); the rows are
also appended to each run's sample-quality.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import hvae  # noqa: E402
from hvae import checkpoint as ckpt  # noqa: E402
from hvae.data import load_dataset  # noqa: E402
from hvae.features import feature_network  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402
from hvae.sample_quality import representation, sample_quality  # noqa: E402


def time_feature_network(data, likelihood: str) -> dict:
    """Train the feature network from scratch in a throwaway cache: seconds and test accuracy."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"HVAE_CACHE": tmp}):
        start = time.perf_counter()
        net = feature_network(data, representation(likelihood), progress=False)
        return {"seconds": round(time.perf_counter() - start, 1), "name": net.name, "accuracy": net.accuracy}


def row(name: str, r: dict) -> str:
    seconds = r.get("sampling_seconds", 0) + r["seconds"]
    return (f"| {name} | {r['fid']:.3f} | {r['kid'] * 1e3:.2f} ± {r['kid_se'] * 1e3:.2f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--temperatures", default="1.0", help="comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-features", action="store_true", help="also train the feature network in a fresh cache")
    ap.add_argument("--json", type=Path, help="write every row here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    load = os.getloadavg()[0]
    report = {"cpu": cpu_name(), "threads": args.threads, "load_before": load, "runs": {}}
    lines = ["| model | images | Fréchet distance | KID x 1e3 | precision | recall | seconds |", "|---|---|---|---|---|---|---|"]
    for run in args.runs:
        cfg = ckpt.read_config(run)
        data = load_dataset(cfg.data.dataset, cfg.data.data_dir)
        if args.time_features and "features" not in report:
            report["features"] = time_feature_network(data, cfg.model.likelihood)
        result = sample_quality(hvae.load(run), data, cfg.model.likelihood, args.samples, temperatures,
                                progress=False, run_dir=run)
        report["runs"][run.name] = result
        for r in result["fid_curve"]:
            lines.append(row(f"{run.name} | samples, T = {r['temperature']:g}", r))
        for name, r in result["fid_reference"].items():
            lines.append(row(f"{run.name} | {name}", r))
        print(lines[-1], file=sys.stderr, flush=True)
    report["load_after"] = os.getloadavg()[0]
    print(f"CPU: {report['cpu']}, {args.threads} threads, load {load:.2f} before, {report['load_after']:.2f} after")
    if "features" in report:
        f = report["features"]
        print(f"feature network: {f['name']}, trained in {f['seconds']} s")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
