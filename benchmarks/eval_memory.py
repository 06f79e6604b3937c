"""Peak memory of IW-NLL evaluation with k = 5000: chunked over k, so memory does not grow with k or N.

Each measurement runs in a fresh subprocess and reports its time, its resident memory just before evaluating
(VmRSS: the model, the data, torch), the peak before evaluating (ru_maxrss: also the data loading's transient
peak) and the peak at the end (ru_maxrss).
    python benchmarks/eval_memory.py [--k 5000] [--images 100 1000 10000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from hvae.config import Config
from hvae.data import load_dataset, test_input
from hvae.evaluate import evaluate
from hvae.models import build_model
torch.set_num_threads(int(sys.argv[3]))
data = load_dataset("fashion-mnist")
x = test_input(data.test_x, "bernoulli")[: int(sys.argv[2])]
torch.manual_seed(0)
model = build_model(Config().model, data.data_shape)
def current_rss_kib():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
now = current_rss_kib()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = evaluate(model, x, k=int(sys.argv[1]), progress=False)
print(json.dumps({"k": out["k"], "images": out["n_images"], "seconds": time.perf_counter() - t0,
                  "rss_before_eval_mib": None if now is None else now / 1024, "peak_rss_before_eval_mib": base / 1024,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5000)
    ap.add_argument("--images", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for n in args.images:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.k), str(n), str(args.threads)],
                              capture_output=True, text=True, check=True)
        print(json.dumps(json.loads(proc.stdout.strip().splitlines()[-1])))


if __name__ == "__main__":
    main()
