"""Training and IW-evaluation throughput: hvae vs a bare PyTorch loop, side by side, against the matmul roofline.

Everything runs in one process with the same thread count, alternating the contenders and taking medians,
so the ratios hold on a shared, noisy machine. Usage:
    python benchmarks/throughput.py [--repeats 5] [--threads 2] [--variant runtime.compile=true ...] [--json FILE]
    python benchmarks/throughput.py --device cuda --variant runtime.precision=bf16-mixed   # the same table on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bare import BareVAE, bare_epoch, bare_eval, bernoulli_binarize, integer_binarize  # noqa: E402
from clock import add_clock_option, start_clock  # noqa: E402

from hvae.config import Config, apply, parse_set  # noqa: E402
from hvae.data import load_dataset, test_input  # noqa: E402
from hvae.evaluate import chunk_for, evaluate  # noqa: E402
from hvae.models import build_model  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402
from hvae.loop import fit  # noqa: E402

LAYERS_ENC = [(784, 512), (512, 256), (256, 64)]
LAYERS_DEC = [(32, 256), (256, 512), (512, 784)]


def train_shapes(batch: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matmul in one training step: forward, grad-input (not for the data layer), grad-weight."""
    shapes = []
    for i, (n_in, n_out) in enumerate(LAYERS_ENC + LAYERS_DEC):
        shapes.append((batch, n_in, n_out))
        if i != 0:
            shapes.append((batch, n_out, n_in))
        shapes.append((n_out, batch, n_in))
    return shapes


def decoder_shapes(rows: int) -> list[tuple[int, int, int]]:
    return [(rows, n_in, n_out) for n_in, n_out in LAYERS_DEC]


def flops(shapes) -> int:
    return sum(2 * m * k * n for m, k, n in shapes)


def matmul_seconds(shapes, repeats: int = 7, clock=time.perf_counter, device: torch.device | str = "cpu") -> float:
    """Best-of-`repeats` time of running all the matmuls back to back (the roofline's time)."""
    mats = [(torch.randn(m, k, device=device), torch.randn(k, n, device=device)) for m, k, n in shapes]
    work = 2e11 if torch.device(device).type == "cuda" else 2e9  # FLOP per timing
    inner = max(1, int(work // max(1, flops(shapes))))
    for a, b in mats:
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(inner):
            for a, b in mats:
                a @ b
        best = min(best, (clock() - t0) / inner)
    return best


def paired_ratios(rates: list[float], reference: list[float]) -> dict:
    """Per-repeat ratios to the reference timed in the same repeat: their median and quartiles (the spread a
    single run's ratio has on this machine; the table's ratio is of the medians). With fewer than three repeats the
    "quartiles" are the lowest and highest ratio (statistics.quantiles would extrapolate beyond them)."""
    ratios = [a / b for a, b in zip(rates, reference)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 2 else [min(ratios), None, max(ratios)]
    return {"paired_ratio_median": statistics.median(ratios), "paired_ratio_quartiles": [q[0], q[2]]}


def hvae_epoch(cfg: Config) -> float:
    """Examples/s of `hvae train`'s loop over one epoch (its own epoch_seconds, set-up excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        fit(cfg, Path(tmp) / "run", progress=False)
        rec = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in reversed(rec) if "epoch_seconds" in r)
    return last["step"] * cfg.train.batch_size / last["epoch_seconds"]


def hvae_epoch_diff(cfg: Config, train_u8: torch.Tensor, steps: int, clock=time.thread_time) -> float:
    """Examples/s of `hvae train` as the time of a 2-epoch run minus that of a 1-epoch run on the same `steps`
    batches (saved as an .npz), so set-up and warm-up cancel. With the main thread's CPU time (one thread)
    other processes on the machine do not count; on a GPU the clock is wall time after a device sync."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "subset.npz"
        np.savez(npz, x_train=train_u8[: steps * cfg.train.batch_size].numpy(), x_test=train_u8[:10].numpy())
        for epochs in (1, 2):
            sized = apply(cfg, {"data.dataset": str(npz), "data.validation": 0, "train.epochs": epochs})
            t0 = clock()
            fit(sized, Path(tmp) / f"run{epochs}", progress=False)
            times.append(clock() - t0)
    return steps * cfg.train.batch_size / (times[1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="training steps per timing (hvae: a shortened epoch)")
    ap.add_argument("--variant", action="append", default=[], help="extra hvae config to time, e.g. runtime.compile=true")
    ap.add_argument("--lean", action="store_true",
                    help="also time a minimal hand-written loop: the bare one with fused Adam and integer binarization")
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--eval-chunk-mb", type=float, nargs="+", default=[8.0],
                    help="decoder-call sizes of hvae's evaluator to time (MB of activations; 8 is hvae's choice on CPU); "
                         "the decoder roofline is measured at the 8 MB size")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where every contender runs (hvae: runtime.accelerator)")
    ap.add_argument("--data-dir", type=Path, help="folder holding fashion-mnist/ (default: the usual places)")
    add_clock_option(ap)
    args = ap.parse_args()
    clock = start_clock(args)
    dev = torch.device(args.device)
    data = load_dataset("fashion-mnist", args.data_dir)
    flat = data.train_x.reshape(len(data.train_x), -1)
    # hvae trains one epoch over `steps` batches: the rest of the training set is held out as validation.
    base = {"train.epochs": 1, "train.batch_size": args.batch, "runtime.threads": args.threads, "train.log_every": 10**9,
            "data.validation": len(flat) - args.steps * args.batch, "runtime.accelerator": dev.type,
            **({"data.data_dir": str(args.data_dir)} if args.data_dir else {})}
    contenders = {"hvae (default)": apply(Config(), base)}
    other_model = set()  # another model or more samples per example: the default VAE's FLOP count does not apply
    for v in args.variant:
        variant = parse_set([v])
        contenders[f"hvae {v}"] = apply(Config(), {**base, **variant})
        if any(key.startswith("model.") or key.startswith("objective.") for key in variant):
            other_model.add(f"hvae {v}")

    # 1. Training: the hand-written loops and hvae epochs, alternating.
    hand_written = {"bare loop": (False, bernoulli_binarize)}
    if args.lean:
        hand_written["lean loop (bare + fused Adam + integer binarization)"] = (True, integer_binarize)
    loops = {}
    flat_dev = flat.to(dev)
    for name, (fused, binarize) in hand_written.items():
        model = BareVAE().to(dev)
        loops[name] = (model, torch.optim.Adam(model.parameters(), 1e-3, fused=fused), binarize)
        warm_up = min(20, len(flat) // args.batch)
        bare_epoch(model, loops[name][1], flat_dev, args.batch, steps=warm_up, binarize=binarize)
    bare = loops["bare loop"][0]
    speeds: dict[str, list[float]] = {**{k: [] for k in loops}, **{k: [] for k in contenders}}
    roof_times = []
    # see hvae_epoch_diff; a compiled run also takes the difference, as its first step compiles (or loads the cache)
    by_difference = args.clock == "cpu" or dev.type == "cuda"
    for cfg in contenders.values():  # a compiled run's first process-wide compile is not timed
        if cfg.runtime.compile:
            hvae_epoch_diff(cfg, data.train_x, 2, clock)
    for r in range(args.repeats):
        for name, (model, opt, binarize) in loops.items():
            t0 = clock()
            n = bare_epoch(model, opt, flat_dev, args.batch, steps=args.steps, binarize=binarize)
            speeds[name].append(n / (clock() - t0))
        for name, cfg in contenders.items():
            speeds[name].append(hvae_epoch_diff(cfg, data.train_x, args.steps, clock)
                                if by_difference or cfg.runtime.compile else hvae_epoch(cfg))
        roof_times.append(matmul_seconds(train_shapes(args.batch), clock=clock, device=dev))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in speeds.items()), file=sys.stderr)
    train_flop = flops(train_shapes(args.batch)) / args.batch  # per example
    roof = flops(train_shapes(args.batch)) / statistics.median(roof_times) / 1e9
    bare_med = statistics.median(speeds["bare loop"])
    rows = []
    for name, v in speeds.items():
        med = statistics.median(v)
        gflops = None if name in other_model else med * train_flop / 1e9
        rows.append({"what": f"train {name}", "examples_per_s": med, "gflops": gflops,
                     "pct_roofline": None if gflops is None else 100 * gflops / roof, "ratio_to_bare": med / bare_med,
                     **paired_ratios(v, speeds["bare loop"])})

    # 2. IW evaluation: importance samples decoded per second, hvae's evaluator vs the bare estimator.
    model = build_model(Config().model, data.data_shape).to(dev)
    x = test_input(data.test_x, "bernoulli")[: args.eval_images].to(dev)
    batch = min(100, len(x))  # evaluate's batch of images
    chunk = chunk_for(args.k, batch, 784)
    sizes = {("eval hvae" if len(args.eval_chunk_mb) == 1 else f"eval hvae ({mb:g} MB decoder calls)"): int(mb * 2**20)
             for mb in args.eval_chunk_mb}
    eval_speeds: dict[str, list[float]] = {**{name: [] for name in sizes}, "eval bare": []}
    bare.eval()
    eval_roof = []
    for r in range(max(1, args.repeats // 2)):
        for name, chunk_bytes in sizes.items():
            t0 = clock()
            evaluate(model, x, k=args.k, progress=False, device=dev, chunk_bytes=chunk_bytes)
            eval_speeds[name].append(len(x) * args.k / (clock() - t0))
        t0 = clock()
        bare_eval(bare, x.reshape(len(x), -1), k=args.k)
        eval_speeds["eval bare"].append(len(x) * args.k / (clock() - t0))
        eval_roof.append(matmul_seconds(decoder_shapes(chunk * batch), repeats=3, clock=clock, device=dev))
    dec_flop = flops(decoder_shapes(1))
    dec_roof = flops(decoder_shapes(chunk * batch)) / statistics.median(eval_roof) / 1e9
    bare_eval_med = statistics.median(eval_speeds["eval bare"])
    for name, v in eval_speeds.items():
        med = statistics.median(v)
        rows.append({"what": name, "samples_per_s": med, "gflops": med * dec_flop / 1e9,
                     "pct_roofline": 100 * med * dec_flop / 1e9 / dec_roof, "ratio_to_bare": med / bare_eval_med,
                     **paired_ratios(v, eval_speeds["eval bare"])})
    result = {"cpu": cpu_name(), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "threads": args.threads, "clock": args.clock, "torch": torch.__version__, "batch": args.batch,
              "train_roofline_gflops": roof, "decoder_roofline_gflops": dec_roof, "train_flop_per_example": train_flop,
              "decoder_flop_per_sample": dec_flop, "k": args.k, "eval_images": len(x), "rows": rows,
              "raw": {**speeds, **eval_speeds}}
    print(f"CPU: {result['cpu']}, {args.threads} threads, device: {result['device']}, torch {torch.__version__}, "
          f"clock: {args.clock}")
    print(f"matmul roofline: training shapes {roof:.1f} GFLOP/s, decoder shapes ({chunk * batch} rows) {dec_roof:.1f} GFLOP/s")
    print("| what | per second | GFLOP/s | % of roofline | ratio to bare | paired ratio, quartiles |\n|---|---|---|---|---|---|")
    for row in rows:
        rate = row.get("examples_per_s") or row.get("samples_per_s")
        q1, q3 = row["paired_ratio_quartiles"]
        flop = "- | -" if row["gflops"] is None else f"{row['gflops']:.1f} | {row['pct_roofline']:.0f}%"
        print(f"| {row['what']} | {rate:,.0f} | {flop} | {row['ratio_to_bare']:.2f} "
              f"| {row['paired_ratio_median']:.2f} ({q1:.2f}-{q3:.2f}) |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
