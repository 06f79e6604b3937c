"""The argparse side of hvae's command line: value types that check a flag's range (so bad values are one-line
usage errors naming the flag), and the flags several commands share, declared once (argparse parents)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32); got {value}")
    return value


def numbers(low: float | None = None, above: float | None = None):
    """An argparse type: comma-separated finite numbers (>= low, > above)."""
    def parse(text: str) -> list[float]:
        values = [float(v) for v in text.split(",") if v.strip()]
        if not values or not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"must be finite numbers, e.g. 0,0.5,1; got {text!r}")
        if (low is not None and min(values) < low) or (above is not None and min(values) <= above):
            raise argparse.ArgumentTypeError(f"must be {'>=' if low is not None else '>'} "
                                             f"{low if low is not None else above}; got {text}")
        return values
    parse.__name__ = "number list"
    return parse


def integers(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("is empty; give dimensions like 0,3,5, or leave it out for the 10 most informative")
    return values


def device(name: str) -> str:
    """--device: cpu, cuda, cuda:N or mps, present on this machine."""
    try:
        kind = torch.device(name)
    except RuntimeError:
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{name!r} is not a device hvae runs on; use cpu, cuda (cuda:N) or mps")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"this PyTorch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("Apple's Metal backend is not available here; use --device cpu")
    return name


def parents() -> dict[str, argparse.ArgumentParser]:
    """The flags several commands share, declared once."""
    made = {name: argparse.ArgumentParser(add_help=False) for name in ("run", "ema", "progress", "seed")}
    made["run"].add_argument("run", type=Path)
    made["run"].add_argument("--device", type=device, help="cpu | cuda | cuda:N (default: cuda when present, else cpu)")
    made["run"].add_argument("--data-dir", help="override the run's data.data_dir")
    made["ema"].add_argument("--no-ema", action="store_true", help="use the raw weights even when the run has EMA")
    made["progress"].add_argument("--no-progress", action="store_true", help="no progress bar")
    made["seed"].add_argument("--seed", type=seed, default=0)
    return made
