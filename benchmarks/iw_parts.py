"""The IW-NLL of a run on all test images in parts that survive a stop: each part (--part-size images) is evaluated as
`hvae eval` would (the run's EMA weights when on, fixed binarization, k importance samples, its own seed = its index)
and written to RUN/iw-k<K>/part-<i>.json; run again, it evaluates only the parts that are missing, then combines
them: the means over all images, weighted by the parts' sizes, and the standard error of the IW-NLL from the spread of
the part means. Active units need every image at once, so they come from one cheap k = 1 pass over all of them
(--au), which also gives the one-sample ELBO terms and KL per level.

    taskset -c 1 python benchmarks/iw_parts.py runs/s6/best-conv-s0 --k 1000 --threads 1
    python benchmarks/iw_parts.py runs/s6/best-conv-s0 --k 1000 --combine-only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MEAN_KEYS = ("iw_nll", "elbo", "reconstruction", "kl", "bits_per_dim")


def combine(parts: list[dict]) -> dict:
    """Size-weighted means of the parts' metrics (MEAN_KEYS and kl_per_level), the IW-NLL's standard error from the
    spread of the part means (sd / sqrt(parts), each part a mean over its images), images and seconds summed."""
    n = sum(p["n_images"] for p in parts)
    out = {key: sum(p[key] * p["n_images"] for p in parts) / n for key in MEAN_KEYS}
    out["kl_per_level"] = [sum(p["kl_per_level"][t] * p["n_images"] for p in parts) / n
                           for t in range(len(parts[0]["kl_per_level"]))]
    means = [p["iw_nll"] for p in parts]
    out["iw_nll_se"] = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
    out |= {"k": parts[0]["k"], "n_images": n, "parts": len(parts), "seconds": sum(p["seconds"] for p in parts)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--part-size", type=int, default=1000)
    ap.add_argument("--limit", type=int, help="the first N test images only (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--au", action=argparse.BooleanOptionalAction, default=True,
                    help="also the k = 1 pass over all images for active units and the ELBO terms")
    ap.add_argument("--combine-only", action="store_true", help="evaluate nothing; combine the parts there are")
    args = ap.parse_args(argv)

    import torch

    import hvae
    from hvae.checkpoint import read_config, write_json
    from hvae.data import test_set
    from hvae.evaluate import evaluate

    torch.set_num_threads(args.threads)
    folder = args.run / f"iw-k{args.k}"
    folder.mkdir(exist_ok=True)
    cfg = read_config(args.run)
    x, _ = test_set(cfg.data.dataset, cfg.data.data_dir, cfg.model.likelihood)
    x = x[:args.limit] if args.limit else x
    model = None
    starts = range(0, len(x), args.part_size)
    for i, lo in enumerate(starts):
        path = folder / f"part-{i}.json"
        if path.exists() or args.combine_only:
            continue
        model = model or hvae.load(args.run)
        t0 = time.perf_counter()
        result = evaluate(model, x[lo:lo + args.part_size], k=args.k, seed=i, progress=False)
        write_json(path, result | {"first_image": lo})
        print(f"part {i}: images {lo}-{lo + result['n_images'] - 1}, IW-NLL {result['iw_nll']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    parts = [json.loads((folder / f"part-{i}.json").read_text()) for i in range(len(starts))
             if (folder / f"part-{i}.json").exists()]
    if not parts:
        raise SystemExit(f"no parts in {folder} yet; run without --combine-only")
    out = combine(parts) | {"complete": len(parts) == len(starts)}
    if args.au and out["complete"]:
        au_path = folder / "au-k1.json"
        if not au_path.exists():
            write_json(au_path, evaluate(model or hvae.load(args.run), x, k=1, progress=False))
        au = json.loads(au_path.read_text())
        out |= {"active_units": au["active_units"], "active_units_per_level": au["active_units_per_level"],
                "elbo_k1_pass": au["elbo"], "kl_per_level_k1_pass": au["kl_per_level"]}
    write_json(folder / "combined.json", out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
