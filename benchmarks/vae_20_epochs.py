"""The core VAE figure: hvae's default VAE vs the bare PyTorch loop, 20 epochs each on Fashion-MNIST, evaluated
with k = 1000 importance samples on the fixed-seed binarized test set (full 10k and the first 2000).

    python benchmarks/vae_20_epochs.py --out runs/bench-vae20 [--epochs 20] [--threads 2] [--k 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bare import BareVAE, bare_epoch, bare_eval  # noqa: E402

import hvae  # noqa: E402
from hvae.data import load_dataset, test_input  # noqa: E402
from hvae.evaluate import evaluate  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402


def split_means(fn, x, first: int = 2000) -> tuple[dict, dict]:
    """Evaluate the first `first` images and the rest; return (first-N means, full-set means)."""
    a, b = fn(x[:first]), fn(x[first:])
    full = {k: (a[k] * first + b[k] * (len(x) - first)) / len(x) for k in a if isinstance(a[k], float)}
    return a, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="run directory for hvae's model (must not exist)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    x_test = test_input(data.test_x, "bernoulli")
    result: dict = {"cpu": cpu_name(), "threads": args.threads, "epochs": args.epochs, "k": args.k}

    # 1. The bare loop, Adam 1e-3, batch 128.
    torch.manual_seed(0)
    bare = BareVAE()
    opt = torch.optim.Adam(bare.parameters(), 1e-3)
    flat = data.train_x.reshape(len(data.train_x), -1)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        bare_epoch(bare, opt, flat)
    result["bare_train_seconds"] = time.perf_counter() - t0
    bare.eval()
    torch.manual_seed(0)
    first, full = split_means(lambda x: bare_eval(bare, x.reshape(len(x), -1), k=args.k), x_test)
    result["bare"] = {"first2000": first, "full": full}
    print(json.dumps(result), file=sys.stderr)

    # 2. `hvae train` with its defaults (a subprocess, exactly as a user runs it), then hvae's evaluator.
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hvae", "train", "--epochs", str(args.epochs), "--out", str(args.out),
                    "--set", f"runtime.threads={args.threads}", "--no-progress"], check=True)
    result["hvae_train_seconds_wall"] = time.perf_counter() - t0
    epochs = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    result["hvae_train_seconds_loop"] = sum(r["epoch_seconds"] for r in epochs if "epoch_seconds" in r)
    model = hvae.load(args.out)
    first, full = split_means(lambda x: evaluate(model, x, k=args.k, progress=False), x_test)
    result["hvae"] = {"first2000": first, "full": full}
    result["train_time_ratio_bare_over_hvae_loop"] = result["bare_train_seconds"] / result["hvae_train_seconds_loop"]
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
