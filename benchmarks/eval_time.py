"""Evaluation time of a VDM's VLB against a VAE's IW-NLL, on all 10,000 test images, side by side in one process.

Issue 15's figure: the VLB's standard error on the 10k test images at most 0.5 nats, in no more evaluation time than
the IW-NLL with k = 1000 takes for the VAE. Each repeat evaluates both runs (their EMA weights when on) at the same
thread count, the VAE first on odd repeats and the VDM first on even ones; the line per repeat gives both times and
their ratio, and the VLB with its standard error.

    python benchmarks/eval_time.py --vae runs/fid/flat-vae --vdm runs/vdm --passes 10 --draws 8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import hvae  # noqa: E402
from hvae import checkpoint as ckpt  # noqa: E402
from hvae.data import load_dataset, test_input  # noqa: E402
from hvae.evaluate import evaluate  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402


def test_images(run: Path) -> torch.Tensor:
    cfg = ckpt.read_config(run)
    return test_input(load_dataset(cfg.data.dataset, cfg.data.data_dir).test_x, cfg.model.likelihood)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", type=Path, required=True, help="a run with explicit levels (IW-NLL)")
    ap.add_argument("--vdm", type=Path, required=True, help="a diffusion run (VLB)")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, help="the first N test images only (default: all)")
    ap.add_argument("--correction-bound", type=float, help="evaluate the VDM with model.correction_bound set to this "
                    "(the same weights, the net's correction bounded: a valid bound of its own)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"vae": hvae.load(args.vae), "vdm": hvae.load(args.vdm)}
    if args.correction_bound is not None:
        models["vdm"].correction_bound = args.correction_bound
    images = {"vae": test_images(args.vae)[: args.limit], "vdm": test_images(args.vdm)[: args.limit]}
    options = {"vae": {"k": args.k}, "vdm": {"passes": args.passes, "draws": args.draws}}
    print(f"CPU: {cpu_name()}; {args.threads} threads; {len(images['vae'])} / {len(images['vdm'])} test images")
    rows = []
    for repeat in range(args.repeats):
        seconds, results = {}, {}
        for name in ("vae", "vdm") if repeat % 2 == 0 else ("vdm", "vae"):
            start = time.perf_counter()
            with torch.no_grad():
                results[name] = evaluate(models[name], images[name], progress=False, **options[name])
            seconds[name] = time.perf_counter() - start
        row = {"repeat": repeat, "vae_seconds": seconds["vae"], "vdm_seconds": seconds["vdm"],
               "ratio": seconds["vdm"] / seconds["vae"], "vae_iw_nll": results["vae"]["iw_nll"],
               "vdm_vlb": -results["vdm"]["elbo"], "vdm_vlb_se": results["vdm"]["elbo_se"]}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
