"""Round-trip latency of a slider move in `hvae explore`: request -> decoded PNG back, median and 95th percentile.

For each model (the default VAE; configs/best-hierarchical.yaml), a run directory is written into a temporary folder
with weights from hvae.build_model (seeded, untrained: a decode costs the same whatever the weights), and the
explorer serves it from a child process with `--threads` torch threads. This process is the page: one keep-alive
connection, POST /api/decode {"z": [...]} with one coordinate moved a little each time, as a dragged slider sends,
`--warmup` untimed requests first, then `--requests` timed ones, one after another. Beside the figures: the decode
alone (decode_means + PNG, in this process, same thread count), the CPU and the load average at the start and end.

    python benchmarks/explore_latency.py --requests 200 --threads 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from hvae.checkpoint import save_checkpoint, write_json  # noqa: E402
from hvae.config import resolve, to_dict  # noqa: E402
from hvae.editing import decode_means  # noqa: E402
from hvae.models import build_model  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402
from hvae.visualize import png_bytes, to_unit_range  # noqa: E402

MODELS = {"default VAE (784-512-256 -> 32)": [], "best-hierarchical (MHVAE T = 3, 32/16/8)":
          [ROOT / "configs" / "best-hierarchical.yaml"]}
SERVER = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from hvae import explore
explorer = explore.open_run(sys.argv[1], "cpu", sys.argv[3] or None)
server = explore.Server(explorer, "127.0.0.1", 0)
explorer.start()
print(server.url, flush=True)
server.serve_forever()
"""


def make_run(folder: Path, presets: list[Path]):
    """A run directory holding an untrained model of the config (seed 0): config.json + checkpoints/last."""
    cfg = resolve(presets, {}, [])
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28))
    folder.mkdir(parents=True)
    write_json(folder / "config.json", to_dict(cfg))
    save_checkpoint(folder, model.state_dict(), {"data_shape": [1, 28, 28]})
    return model.eval(), cfg


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def round_trips(url: str, size: int, n: int, warmup: int) -> list[float]:
    """Seconds of each of n slider moves (after `warmup` untimed ones) over one keep-alive connection."""
    host, port = url.split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    z, seconds = [0.0] * size, []
    for i in range(warmup + n):
        z[i % size] = ((i * 0.37) % 6) - 3  # a slider dragged over its range [-3, 3]
        body = json.dumps({"z": z}).encode()
        start = time.perf_counter()
        conn.request("POST", "/api/decode", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        png = response.read()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        assert response.status == 200 and png[:4] == b"\x89PNG", png[:200]
    conn.close()
    return seconds


def decode_only(model, likelihood: str, size: int, n: int) -> list[float]:
    seconds = []
    for i in range(n):
        z = torch.full((1, size), (i % 7) / 7.0)
        start = time.perf_counter()
        png_bytes(to_unit_range(decode_means(model, z), likelihood), nrow=1, scale=1)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (and of decode alone)")
    parser.add_argument("--data-dir", default="", help="folder holding fashion-mnist/ (default: the usual places)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch threads {args.threads}; {load()}")
    for name, presets in MODELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            model, cfg = make_run(Path(tmp) / "run", presets)
            proc = subprocess.Popen([sys.executable, "-c", SERVER, str(Path(tmp) / "run"), str(args.threads),
                                     args.data_dir], stdout=subprocess.PIPE, text=True)
            try:
                url = proc.stdout.readline().strip()
                size = json.loads(http_get(url + "api/info"))["latent_size"]
                trips = round_trips(url, size, args.requests, args.warmup)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            alone = decode_only(model, cfg.model.likelihood, size, args.requests)
        ms = [1000 * s for s in trips]
        print(json.dumps({"model": name, "requests": len(ms), "median_ms": round(statistics.median(ms), 2),
                          "p95_ms": round(percentile(ms, 0.95), 2), "max_ms": round(max(ms), 2),
                          "decode_png_median_ms": round(1000 * statistics.median(alone), 2)}))
    print(load())


def http_get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


if __name__ == "__main__":
    main()
