"""The conv decoders' one-channel output layer: nn.ConvTranspose2d (oneDNN) vs hvae's matmul + col2im form.

Times, side by side in one process (alternating, medians of repeats), the layer alone at the conv decoder's
shape (forward + backward as in training, forward only as in evaluation) and the default conv VAE with
either layer: training examples/s and IW-evaluation samples/s. Usage:
    python benchmarks/conv_output_layer.py [--threads 2] [--repeats 7] [--clock cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from clock import add_clock_option, start_clock  # noqa: E402

from hvae.config import Config, apply  # noqa: E402
from hvae.data import load_dataset, test_input, to_model_input  # noqa: E402
from hvae.evaluate import evaluate  # noqa: E402
from hvae.models import build_model  # noqa: E402
from hvae.nets import OneChannelConvTranspose2d  # noqa: E402
from hvae.objectives import ElboObjective  # noqa: E402
from hvae.rundir import cpu_name  # noqa: E402
from hvae.loop import Objective  # noqa: E402
from hvae.optim import make_optimizer  # noqa: E402

KINDS = {"nn.ConvTranspose2d": nn.ConvTranspose2d, "hvae OneChannelConvTranspose2d": OneChannelConvTranspose2d}


def layer_timers(kind: type, batch: int) -> dict:
    """Per-call timers of the decoder's output layer (32 channels at 14x14 -> 1 x 28 x 28)."""
    torch.manual_seed(0)
    layer = kind(32, 1, 4, stride=2, padding=1)
    x0 = torch.randn(batch, 32, 14, 14)

    def train_calls(n: int = 10):
        for _ in range(n):
            x = x0.clone().requires_grad_()
            layer(x).sum().backward()

    @torch.no_grad()
    def eval_calls(n: int = 10):
        for _ in range(n):
            layer(x0)

    return {"layer train (fwd + bwd), calls": (train_calls, 10), "layer eval (fwd), calls": (eval_calls, 10)}


def model_timers(kind: type, data, batch: int, k: int, images: int) -> dict:
    """Timers of the default conv VAE whose output layer is `kind`: a training step, an IW evaluation."""
    torch.manual_seed(0)
    cfg = apply(Config(), {"model.arch": "conv"})
    model = build_model(cfg.model, data.data_shape)
    for module in model.modules():
        if isinstance(module, nn.ConvTranspose2d) and module.out_channels == 1:
            module.__class__ = kind  # Why: the same parameters under the other forward
    objective, optimizer = Objective(model, ElboObjective()), make_optimizer(cfg.optim, model.parameters())
    gen = torch.Generator().manual_seed(0)
    x_test = test_input(data.test_x, "bernoulli")[:images]

    def train_steps(n: int = 5):
        for i in range(n):
            x = to_model_input(data.train_x[i * batch:(i + 1) * batch], "bernoulli", gen)
            obj, _ = objective(x, torch.tensor(1.0))
            (-obj.mean()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return {"conv VAE training (5 steps)": (train_steps, 5 * batch),
            "conv VAE IW eval": (lambda: evaluate(model, x_test, k=k, progress=False), images * k)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--images", type=int, default=20)
    add_clock_option(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    clock = start_clock(args)
    data = load_dataset("fashion-mnist")
    timers = {name: {**layer_timers(kind, args.batch), **model_timers(kind, data, args.batch, args.k, args.images)}
              for name, kind in KINDS.items()}
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, per_kind in timers.items():
            for what, (fn, items) in per_kind.items():
                fn()  # warm-up of this repeat
                t0 = clock()
                fn()
                rates.setdefault((what, name), []).append(items / (clock() - t0))
    ref, new = KINDS
    rows = []
    for what in timers[ref]:
        a, b = statistics.median(rates[(what, ref)]), statistics.median(rates[(what, new)])
        rows.append({"what": what, "per_s_torch": a, "per_s_hvae": b, "speedup": b / a})
    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}, clock: {args.clock}")
    print("| what | nn.ConvTranspose2d per s | hvae per s | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['per_s_torch']:,.0f} | {r['per_s_hvae']:,.0f} | {r['speedup']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "clock": args.clock,
                                         "torch": torch.__version__, "rows": rows,
                                         "raw": {f"{w} / {n}": v for (w, n), v in rates.items()}}, indent=2))


if __name__ == "__main__":
    main()
