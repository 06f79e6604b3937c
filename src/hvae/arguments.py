"""The argparse side of hvae's command line: the parser of every subcommand, value types that check a flag's range
(so bad values are one-line usage errors naming the flag), and the flags several commands share, declared once
(argparse parents). cli.py holds what each command does."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from . import explore
from .errors import ConfigError


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


# The named flags of `hvae train`, each a shortcut for one config key.
TRAIN_FLAGS = {"model": "model.name", "levels": "model.levels", "dataset": "data.dataset", "data_dir": "data.data_dir",
               "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr", "seed": "train.seed",
               "device": "runtime.accelerator", "devices": "runtime.devices", "strategy": "runtime.strategy",
               "precision": "runtime.precision"}


class UsageError(ConfigError):
    """A command-line syntax error (argparse's), reported in one line like any other bad input."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors raise UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        # "argument --k: must be >= 1; got 0" (from the types below) reads better as "--k must be >= 1; got 0"
        message = re.sub(r"^argument ([-\w]+): (?=must |is )", r"\1 ", message)
        err = UsageError(f"{message} (see {self.prog} --help)")
        err.prog = self.prog
        raise err


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hvae", description="Variational autoencoders: train, evaluate, generate.")
    sub, p = parser.add_subparsers(dest="command", required=True), parents()
    command = lambda name, *shared, **kw: sub.add_parser(name, parents=[p[s] for s in shared], **kw)  # noqa: E731
    t = command("train", "progress", help="train a model into a run directory")
    t.add_argument("--config", action="append", default=[],
                   help="YAML preset (sections model/data/objective/optim/train/runtime); several merge in order")
    for flag, key in TRAIN_FLAGS.items():
        kind = {"levels": int, "epochs": int, "batch_size": int, "lr": float, "seed": int, "devices": int}.get(flag, str)
        t.add_argument(f"--{flag.replace('_', '-')}", type=kind, help=key)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. optim.ema=0.999")
    t.add_argument("--out", type=Path, help="run directory (refused if it exists and is not empty)")
    t.add_argument("--overwrite", action="store_true", help="allow --out to be an existing non-empty run directory")
    t.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.add_argument("--auto-resume", action="store_true",
                   help="with --out DIR: start the run if DIR is new or empty, resume it if DIR holds a run of this "
                        "config (--epochs and --device may differ), refuse another config (for requeued jobs)")

    e = command("eval", "run", "ema", "progress", help="ELBO terms, IW-NLL, bits/dim, active units")
    e.add_argument("--k", type=at_least(1), default=1000, help="importance samples (default 1000)")
    e.add_argument("--limit", type=at_least(1), help="evaluate the first N test images only")
    e.add_argument("--batch-size", type=at_least(1), default=100)
    e.add_argument("--threads", type=at_least(0), help="torch CPU threads of this evaluation (0: measure the fastest; "
                   "default: the run's runtime.threads)")
    e.add_argument("--passes", type=at_least(2), default=10,
                   help="passes over the images for a stochastic bound (a diffusion VLB), for its standard error")
    e.add_argument("--draws", type=at_least(1), default=8,
                   help="draws of a stochastic bound per image and pass (a VLB's times stratified per image)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--fid", action="store_true",
                   help="also sample quality: Fréchet distance, KID, precision/recall on a LeNet of the data set")
    e.add_argument("--fid-only", action="store_true", help="sample quality only (skip the likelihood bounds)")
    e.add_argument("--samples", type=at_least(10), default=10_000, help="samples for --fid (default 10000)")
    e.add_argument("--temperature", type=numbers(low=0), default=[1.0],
                   help="--fid: sampling temperatures (the prior's std scale), e.g. 0.8,0.9,1.0")

    s = command("sample", "run", "seed", help="draw from the prior and decode")
    s.add_argument("--n", type=at_least(1), default=64)
    s.add_argument("--temperature", type=numbers(low=0), default=[1.0],
                   help="scales the prior's std (0: its mean); one value, or one per level (level 1 first)")
    s.add_argument("--steps", type=at_least(1), help="diffusion models: ancestral sampling steps (default: T, or 256)")
    s.add_argument("--chain", type=at_least(2), metavar="FRAMES",
                   help="diffusion models: draw the denoising chain instead, FRAMES predictions per sample")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = command("reconstruct", "run", "seed", help="test images and their reconstructions")
    r.add_argument("--n", type=at_least(1), default=16)
    i = command("interpolate", "run", "seed", help="decode paths between encoded test images")
    i.add_argument("--n", type=at_least(1), default=16, help="pairs")
    i.add_argument("--steps", type=at_least(2), default=10)
    i.add_argument("--spherical", action="store_true", help="slerp instead of linear")
    for g in (s, r, i):
        g.add_argument("--out", type=Path, help=f"PNG path (default RUN/{g.prog.split()[-1]}.png)")

    n = command("encode", "run", "ema", help="posterior means of test images (every level) to an .npz file")
    n.add_argument("--out", type=Path, help="NPZ path (default RUN/latents.npz)")
    n.add_argument("--limit", type=at_least(1), help="the first N test images only")
    lv = command("levels", "run", "seed", help="what each level controls: keep the top levels, redraw the rest")
    lv.add_argument("--n", type=at_least(1), default=6, help="test images (rows)")
    lv.add_argument("--samples", type=at_least(1), default=3, help="redraws per number of kept levels")
    lv.add_argument("--temperature", type=numbers(), default=[1.0], help="one value, or one per level (level 1 first)")
    lv.add_argument("--out", type=Path, help="PNG path (default RUN/levels.png)")

    ed = command("edit", help="edit latents: interpolate, attribute arithmetic, traversals (PNG grids)")
    actions, edit = ed.add_subparsers(dest="action", required=True), [p["run"], p["ema"]]
    a = actions.add_parser("interpolate", parents=edit, help="decode the path between two test images")
    a.add_argument("--a", type=int, default=0, help="index of the first test image")
    a.add_argument("--b", type=int, default=1, help="index of the second test image")
    a.add_argument("--steps", type=at_least(2), default=10)
    a.add_argument("--method", choices=("linear", "spherical", "both"), default="both")
    b = actions.add_parser("arithmetic", parents=edit, help="add mean_z(class TO) - mean_z(class FROM) to class FROM")
    b.add_argument("--from", dest="from_class", type=int, required=True, help="class of the edited images (B)")
    b.add_argument("--to", dest="to_class", type=int, required=True, help="class the edit moves towards (A)")
    b.add_argument("--n", type=int, default=8, help="images of class FROM to edit")
    b.add_argument("--scales", type=numbers(), default=[0.0, 0.5, 1.0, 1.5], help="multiples of the vector")
    b.add_argument("--limit", type=at_least(1), help="take class means over the first N test images (default all)")
    c = actions.add_parser("traverse", parents=edit, help="vary one latent dimension at a time")
    c.add_argument("--index", type=int, default=0, help="test image whose posterior mean is the starting point")
    c.add_argument("--dims", type=integers, help="dimensions to vary (default: the 10 with the highest KL)")
    c.add_argument("--span", type=lambda v: numbers(above=0)(v)[0], default=3.0, help="z_d runs from -SPAN to SPAN")
    c.add_argument("--steps", type=at_least(2), default=9)
    for action in (a, b, c):
        action.add_argument("--out", type=Path, help="PNG path (default RUN/edit-ACTION.png)")

    rp = command("report", "run", "ema", "progress", "seed", help="one self-contained HTML page: metrics, pictures")
    rp.add_argument("--out", type=Path, help="HTML path (default RUN/report.html)")
    rp.add_argument("--k", type=at_least(1), default=100, help="importance samples for iw_nll (default 100)")
    rp.add_argument("--limit", type=at_least(1), default=1000, help="test images evaluated and projected (default 1000)")
    rp.add_argument("--n", type=at_least(1), default=64, help="samples shown")
    rp.add_argument("--temperature", type=lambda v: numbers(low=0)(v)[0], default=1.0)
    rp.add_argument("--tsne", action="store_true", help="add a t-SNE view (needs scikit-learn)")
    explore.add_parser(sub, p)
    return parser
