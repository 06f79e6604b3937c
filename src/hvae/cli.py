"""hvae's command line: argparse subcommands that call library functions.

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, apply, from_dict, load_yaml, parse_set
from .data import KNOWN, DataError, load_dataset, test_input
from .errors import InputError, RunDirError
from .rundir import prepare_new

BAD_INPUT = InputError


class UsageError(ConfigError):
    """A command-line syntax error (argparse's), reported in one line like any other bad input."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors raise UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        err = UsageError(f"{message} (see {self.prog} --help)")
        err.prog = self.prog
        raise err


def device_for(name: str | None) -> str:
    """The device a command runs on: --device (checked to exist here), else CUDA when available, else CPU."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name!r} is not a device hvae runs on; use cpu, cuda (cuda:N for one GPU) or mps")
    check_accelerator(device.type)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"numbered 0..{torch.cuda.device_count() - 1}")
    return name


def check_accelerator(kind: str) -> None:
    """A clear error for a GPU this machine does not have (instead of a traceback from deep inside torch)."""
    if kind in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(f"--device {kind}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: Apple's Metal backend is not available here; use --device cpu")


DEVICE_HELP = "cpu | cuda | cuda:N (default: cuda when a GPU is available, else cpu)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hvae", description="Variational autoencoders: train, evaluate, generate.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model into a run directory")
    t.add_argument("--config", action="append", default=[],
                   help="YAML preset (sections model/data/train); several are merged in order, later ones win")
    t.add_argument("--model", help="vae | mhvae | ladder (model.name)")
    t.add_argument("--levels", type=int, help="latent levels of mhvae/ladder (model.levels)")
    t.add_argument("--dataset", help="fashion-mnist | mnist | PATH.npz | PATH.npy (data.dataset)")
    t.add_argument("--data-dir", help="folder holding the IDX files (data.data_dir)")
    t.add_argument("--epochs", type=int, help="train.epochs")
    t.add_argument("--batch-size", type=int, help="global batch size (train.batch_size)")
    t.add_argument("--lr", type=float, help="train.lr")
    t.add_argument("--seed", type=int, help="train.seed")
    t.add_argument("--device", help="cpu | cuda | auto (train.accelerator)")
    t.add_argument("--devices", type=int, help="processes/devices (train.devices)")
    t.add_argument("--strategy", help="auto | ddp | ... (train.strategy)")
    t.add_argument("--precision", help="32-true | bf16-mixed | 16-mixed (train.precision)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. train.ema=0.999")
    t.add_argument("--out", type=Path, help="run directory (refused if it exists and is not empty)")
    t.add_argument("--overwrite", action="store_true", help="allow --out to be an existing non-empty run directory")
    t.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="ELBO terms, IW-NLL, bits/dim, active units")
    e.add_argument("run", type=Path)
    e.add_argument("--k", type=int, default=1000, help="importance samples (default 1000)")
    e.add_argument("--limit", type=int, help="evaluate the first N test images only")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even when the run has EMA")
    e.add_argument("--data-dir", help="override the run's data.data_dir")
    e.add_argument("--device", default=None, help=DEVICE_HELP)
    e.add_argument("--no-progress", action="store_true")

    for name, text in (("sample", "draw from the prior and decode"), ("reconstruct", "test images and their reconstructions"),
                       ("interpolate", "decode paths between encoded test images")):
        g = sub.add_parser(name, help=text)
        g.add_argument("run", type=Path)
        g.add_argument("--n", type=int, default=64 if name == "sample" else 16, help="images / pairs")
        g.add_argument("--out", type=Path, help=f"PNG path (default RUN/{name}.png)")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--device", default=None, help=DEVICE_HELP)
        g.add_argument("--data-dir", help="override the run's data.data_dir")
        if name == "sample":
            g.add_argument("--temperature", type=_float_list, default=[1.0],
                           help="scales the prior's std (0: its mean); one value, or one per level (level 1 first)")
        if name == "interpolate":
            g.add_argument("--steps", type=int, default=10)
            g.add_argument("--spherical", action="store_true", help="slerp instead of linear")
    n = sub.add_parser("encode", help="posterior means of test images (every level) to an .npz file")
    n.add_argument("run", type=Path)
    n.add_argument("--out", type=Path, help="NPZ path (default RUN/latents.npz)")
    n.add_argument("--limit", type=int, help="the first N test images only")
    n.add_argument("--device", default=None, help=DEVICE_HELP)
    n.add_argument("--data-dir", help="override the run's data.data_dir")
    n.add_argument("--no-ema", action="store_true")
    lv = sub.add_parser("levels", help="what each level controls: keep the top levels of test images, redraw the rest")
    lv.add_argument("run", type=Path)
    lv.add_argument("--n", type=int, default=6, help="test images (rows)")
    lv.add_argument("--samples", type=int, default=3, help="redraws per number of kept levels")
    lv.add_argument("--temperature", type=_float_list, default=[1.0], help="one value, or one per level (level 1 first)")
    lv.add_argument("--out", type=Path, help="PNG path (default RUN/levels.png)")
    lv.add_argument("--seed", type=int, default=0)
    lv.add_argument("--device", default=None, help=DEVICE_HELP)
    lv.add_argument("--data-dir", help="override the run's data.data_dir")
    add_view_parsers(sub)
    return parser


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,3,5; got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0,0.5,1; got {text!r}") from None


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32); got {seed}")


def check_finite(flag: str, values) -> None:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{flag} must be finite numbers; got {','.join(map(str, values))}")


def check_temperatures(flag: str, temps: list[float]) -> None:
    check_finite(flag, temps)
    if not temps or min(temps) < 0:
        raise ConfigError(f"{flag} must be >= 0 (one value, or one per level); got {' '.join(map(str, temps))}")


def write_output(out: Path, write) -> Path:
    """Run write(out), turning an unwritable --out (a folder, a file as parent, no permission) into bad input."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(out)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None
    return out


def add_view_parsers(sub) -> None:
    """`hvae edit interpolate|arithmetic|traverse RUN ...` and `hvae report RUN ...`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("run", type=Path)
    common.add_argument("--out", type=Path, help="PNG path (default RUN/edit-ACTION.png)")
    common.add_argument("--device", default=None, help=DEVICE_HELP)
    common.add_argument("--data-dir", help="override the run's data.data_dir")
    common.add_argument("--no-ema", action="store_true", help="use the raw weights even when the run has EMA")
    ed = sub.add_parser("edit", help="edit latents: interpolate, attribute arithmetic, traversals (PNG grids)")
    actions = ed.add_subparsers(dest="action", required=True)
    i = actions.add_parser("interpolate", parents=[common], help="decode the path between two test images")
    i.add_argument("--a", type=int, default=0, help="index of the first test image")
    i.add_argument("--b", type=int, default=1, help="index of the second test image")
    i.add_argument("--steps", type=int, default=10)
    i.add_argument("--method", choices=("linear", "spherical", "both"), default="both")
    a = actions.add_parser("arithmetic", parents=[common],
                           help="add mean_z(class TO) - mean_z(class FROM) to images of class FROM")
    a.add_argument("--from", dest="from_class", type=int, required=True, help="class of the edited images (B)")
    a.add_argument("--to", dest="to_class", type=int, required=True, help="class the edit moves towards (A)")
    a.add_argument("--n", type=int, default=8, help="images of class FROM to edit")
    a.add_argument("--scales", type=_float_list, default=[0.0, 0.5, 1.0, 1.5], help="multiples of the vector")
    a.add_argument("--limit", type=int, help="take class means over the first N test images (default all)")
    t = actions.add_parser("traverse", parents=[common], help="vary one latent dimension at a time")
    t.add_argument("--index", type=int, default=0, help="test image whose posterior mean is the starting point")
    t.add_argument("--dims", type=_int_list, help="dimensions to vary (default: the 10 with the highest KL)")
    t.add_argument("--span", type=float, default=3.0, help="z_d runs from -SPAN to SPAN")
    t.add_argument("--steps", type=int, default=9)
    r = sub.add_parser("report", help="one self-contained HTML page: config, metrics, pictures, curves")
    r.add_argument("run", type=Path)
    r.add_argument("--out", type=Path, help="HTML path (default RUN/report.html)")
    r.add_argument("--k", type=int, default=100, help="importance samples for iw_nll (default 100)")
    r.add_argument("--limit", type=int, default=1000, help="test images evaluated and projected (default 1000)")
    r.add_argument("--n", type=int, default=64, help="samples shown")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tsne", action="store_true", help="add a t-SNE view (needs scikit-learn)")
    r.add_argument("--device", default=None, help=DEVICE_HELP)
    r.add_argument("--data-dir", help="override the run's data.data_dir")
    r.add_argument("--no-ema", action="store_true")
    r.add_argument("--no-progress", action="store_true")


def resolve_train_config(args) -> Config:
    if args.resume:
        if not args.resume.is_dir():
            raise RunDirError(f"--resume {args.resume}: no such run directory; pass the --out folder of hvae train")
        if args.out and args.out != args.resume:
            raise ConfigError("--resume DIR continues DIR itself; drop --out (or give the same folder)")
        cfg = from_dict(ckpt.read_json(args.resume / "config.json"))
        others = [f for f in ("config", "model", "levels", "dataset", "data_dir", "batch_size", "lr", "seed", "devices",
                              "strategy", "precision") if getattr(args, f)]
        if others or args.set:
            raise ConfigError("--resume uses the run's saved config; only --epochs and --device may change "
                              f"(got --{(others or ['set'])[0].replace('_', '-')})")
        changes = {"train.epochs": args.epochs, "train.accelerator": args.device}
        return apply(cfg, {k: v for k, v in changes.items() if v is not None})
    if not args.out:
        raise ConfigError("hvae train needs --out DIR (the run directory) or --resume DIR")
    updates = {}
    for preset in args.config:  # later files win, key by key
        updates.update(load_yaml(preset))
    flags = {"model.name": args.model, "model.levels": args.levels, "data.dataset": args.dataset, "data.data_dir": args.data_dir,
             "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.lr": args.lr,
             "train.seed": args.seed, "train.accelerator": args.device, "train.devices": args.devices,
             "train.strategy": args.strategy, "train.precision": args.precision}
    updates.update({k: v for k, v in flags.items() if v is not None})
    updates.update(parse_set(args.set))
    cfg = apply(Config(), updates)
    # Why absolute: the run's data is read again later (eval, sample, resume) from wherever the user then is.
    absolute = {}
    if cfg.data.dataset not in KNOWN and Path(cfg.data.dataset).suffix in (".npz", ".npy"):
        absolute["data.dataset"] = str(Path(cfg.data.dataset).expanduser().absolute())
    if cfg.data.data_dir:
        absolute["data.data_dir"] = str(Path(cfg.data.data_dir).expanduser().absolute())
    return apply(cfg, absolute)


# Why: the "-true" half precisions would cast the weights but not the held-out data the loop scores itself.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "32", "bf16", "16")  # the last three: Fabric's short names
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def validate(cfg: Config) -> None:
    """Fail fast on values the dataclass types cannot express (bad names, non-positive sizes)."""
    t = cfg.train
    for key, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size), ("train.n_samples", t.n_samples),
                       ("train.iw_k", t.iw_k), ("model.latent_dim", cfg.model.latent_dim)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1; got {value}")
    if t.devices < 1 or t.num_nodes < 1:
        raise ConfigError(f"train.devices and train.num_nodes must be >= 1; got {t.devices} and {t.num_nodes}")
    for key, value, least in (("train.log_every", t.log_every, 1), ("train.max_nonfinite", t.max_nonfinite, 1),
                              ("train.max_skips", t.max_skips, 0), ("train.checkpoint_every", t.checkpoint_every, 0)):
        if value < least:
            raise ConfigError(f"{key} must be >= {least}; got {value}")
    for key, value in (("train.beta", t.beta), ("train.warmup_epochs", t.warmup_epochs), ("train.free_bits", t.free_bits),
                       ("train.grad_clip", t.grad_clip), ("train.skip_threshold", t.skip_threshold)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0; got {value}")
    if not 0 <= t.threads <= 1024:
        raise ConfigError(f"train.threads must be in [0, 1024] (0: PyTorch's default); got {t.threads}")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"train.seed must be in [0, 2**32); got {t.seed}")
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install 'hvae[tensorboard]'")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0; got {t.lr}")
    if t.optimizer not in ("adam", "adamax"):
        raise ConfigError(f"train.optimizer must be 'adam' or 'adamax'; got {t.optimizer!r}")
    if not 0 <= t.ema < 1:
        raise ConfigError(f"train.ema must be in [0, 1); got {t.ema}")
    if t.accelerator not in ACCELERATORS:
        raise ConfigError(f"train.accelerator (--device) must be one of {', '.join(ACCELERATORS)}; got {t.accelerator!r}")
    check_accelerator(t.accelerator)
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {t.precision!r}")
    for key in ("hidden", "level_hidden", "conv_channels", "latent_dims"):
        sizes = getattr(cfg.model, key)
        if any(size < 1 for size in sizes):
            raise ConfigError(f"model.{key} sizes must be >= 1; got {list(sizes)}")
    strategies = strategy_names()
    if t.strategy not in strategies:
        raise ConfigError(f"train.strategy (--strategy) must be one of {', '.join(strategies)}; got {t.strategy!r}")
    check_model_config(cfg.model)


def strategy_names() -> list[str]:
    from lightning_fabric.strategies import STRATEGY_REGISTRY

    return ["auto", *sorted(STRATEGY_REGISTRY.available_strategies())]


def check_model_config(model_cfg) -> None:
    """Build the model and score two blank images, so a bad value fails here and not mid-run."""
    from .models import build_checked

    try:
        build_checked(model_cfg, (1, 28, 28) if model_cfg.arch == "conv" else (1, 4, 4))
    except ValueError as e:
        raise ConfigError(f"model config: {e}") from None


def cmd_train(args) -> int:
    from .train import train

    cfg = resolve_train_config(args)
    validate(cfg)
    out, data = args.resume or args.out, None  # other DDP ranks load the data inside train()
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        data = load_dataset(cfg.data.dataset, cfg.data.data_dir)  # bad data fails here, before DIR is touched
        n_train = len(data.train_x) - cfg.data.validation
        if cfg.data.validation < 0 or n_train < 1:
            raise DataError(f"validation size {cfg.data.validation} must be in [0, {len(data.train_x)}) "
                            f"(the training set has {len(data.train_x)} images)")
        if n_train < cfg.train.batch_size:
            raise ConfigError(f"batch size {cfg.train.batch_size} exceeds the {n_train} training images; lower --batch-size")
        world = cfg.train.devices * cfg.train.num_nodes
        if cfg.train.batch_size % world:
            raise ConfigError(f"batch size {cfg.train.batch_size} must be divisible by the {world} processes "
                              "(train.devices x train.num_nodes)")
        if args.resume:
            ckpt.checkpoint_dir(args.resume)
        else:
            prepare_new(out, args.overwrite)
    train(cfg, out, resume=bool(args.resume), argv=sys.argv, progress=not args.no_progress, data=data)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"trained: {out}", file=sys.stderr)
    return 0


def _run_and_model(args):
    cfg = from_dict(ckpt.read_json(args.run / "config.json")) if (args.run / "config.json").exists() else None
    model = ckpt.load(args.run, device_for(args.device), ema=not getattr(args, "no_ema", False))
    return cfg, model


def _test_images(cfg: Config, args, n: int | None):
    data = load_dataset(cfg.data.dataset, args.data_dir or cfg.data.data_dir)
    x = test_input(data.test_x, cfg.model.likelihood)  # fixed-seed binarization over all, then slice
    if n is not None and n > len(x):
        print(f"note: {n} test images asked for, the test set has {len(x)}: using all {len(x)}", file=sys.stderr)
    return x if n is None else x[:n]


def cmd_eval(args) -> int:
    from .evaluate import evaluate

    cfg, model = _run_and_model(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1; got {args.limit}")
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1; got {args.k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {args.batch_size}")
    x = _test_images(cfg, args, args.limit)
    result = evaluate(model, x, k=args.k, batch_size=args.batch_size, device=device_for(args.device),
                      progress=not args.no_progress)
    for level in result["collapsed_levels"]:
        print(f"hvae eval: warning: level {level} has collapsed (mean KL {result['kl_per_level'][level - 1]:.4f} "
              f"nats, {result['active_units_per_level'][level - 1]} active units); try KL warm-up "
              "(train.warmup_epochs) or free bits (train.free_bits)", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}  {value:.4f}" if isinstance(value, float) else f"{key:>24}  {value}")
    return 0


def cmd_generate(args) -> int:
    from .editing import interpolate
    from .visualize import save_grid, to_unit_range

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1; got {args.n}")
    check_seed(args.seed)
    temps = getattr(args, "temperature", [1.0])
    check_temperatures("--temperature", temps)
    if getattr(args, "steps", 2) < 2:
        raise ConfigError(f"--steps must be >= 2; got {args.steps}")
    cfg, model = _run_and_model(args)
    torch.manual_seed(args.seed)
    device = next(model.parameters()).device
    out = args.out or args.run / f"{args.command}.png"
    with torch.no_grad():
        if args.command == "sample":
            try:
                images = model.sample(args.n, temps)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"--temperature {','.join(map(str, temps))}: {e}") from None
            nrow = 8
        elif args.command == "reconstruct":
            x = _test_images(cfg, args, args.n).to(device)
            images, nrow = torch.stack([x, model.reconstruct(x)], 1).flatten(0, 1), 8
        else:
            x = _test_images(cfg, args, None)[: 2 * args.n].to(device)
            if len(x) < 2 * args.n:
                raise ConfigError(f"--n {args.n} pairs need {2 * args.n} test images; the test set has {len(x)}")
            images = interpolate(model, x[: args.n], x[args.n: 2 * args.n], args.steps, args.spherical).flatten(0, 1)
            nrow = args.steps
    write_output(out, lambda path: save_grid(to_unit_range(images, cfg.model.likelihood), path, nrow=nrow))
    print(out)
    return 0


def _test_image(x, index: int, flag: str):
    if not 0 <= index < len(x):
        raise ConfigError(f"{flag} {index} is out of range; the test set has {len(x)} images (0..{len(x) - 1})")
    return x[index:index + 1]


def _edit_interpolate(model, x, y, args):
    from .editing import interpolate

    if args.steps < 2:
        raise ConfigError(f"--steps must be >= 2; got {args.steps}")
    a, b = _test_image(x, args.a, "--a"), _test_image(x, args.b, "--b")
    kinds = {"linear": [False], "spherical": [True], "both": [False, True]}[args.method]
    paths = [interpolate(model, a, b, args.steps, spherical)[0] for spherical in kinds]  # each [steps, *data]
    return torch.stack([torch.cat([a, path, b]) for path in paths])  # [rows, steps + 2, *data]


def _edit_arithmetic(model, x, y, args):
    from .editing import class_arithmetic

    check_finite("--scales", args.scales)
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit must be >= 1; got {args.limit}")
        x, y = x[: args.limit], None if y is None else y[: args.limit]
    return class_arithmetic(model, x, y, args.from_class, args.to_class, args.n, args.scales)


def _edit_traverse(model, x, y, args):
    from .editing import encode_means, most_informative_dims, traverse

    if args.steps < 2:
        raise ConfigError(f"--steps must be >= 2; got {args.steps}")
    check_finite("--span", args.span)
    if args.span <= 0:
        raise ConfigError(f"--span must be > 0 (z_d runs from -SPAN to SPAN); got {args.span}")
    if args.dims is not None and not args.dims:
        raise ConfigError("--dims is empty; give dimensions like 0,3,5, or leave it out for the 10 most informative")
    z = encode_means(model, _test_image(x, args.index, "--index"))[0]
    dims = args.dims if args.dims else most_informative_dims(model, x[:1000], 10)
    return traverse(model, z, dims, torch.linspace(-args.span, args.span, args.steps))


def cmd_edit(args) -> int:
    from .visualize import rows, save_grid, to_unit_range

    cfg, model = _run_and_model(args)
    data = load_dataset(cfg.data.dataset, args.data_dir or cfg.data.data_dir)
    x = test_input(data.test_x, cfg.model.likelihood).to(next(model.parameters()).device)
    edit = {"interpolate": _edit_interpolate, "arithmetic": _edit_arithmetic, "traverse": _edit_traverse}[args.action]
    with torch.no_grad():
        images, nrow = rows(edit(model, x, data.test_y, args))  # [rows * columns, *data]
    out = args.out or args.run / f"edit-{args.action}.png"
    write_output(out, lambda path: save_grid(to_unit_range(images, cfg.model.likelihood), path, nrow=nrow))
    print(out)
    return 0


def cmd_report(args) -> int:
    from .report import ReportOptions, build_report

    check_seed(args.seed)
    check_temperatures("--temperature", [args.temperature])
    out = args.out or args.run / "report.html"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path")
    options = ReportOptions(k=args.k, limit=args.limit, n_samples=args.n, temperature=args.temperature,
                            seed=args.seed, device=device_for(args.device), data_dir=args.data_dir,
                            ema=not args.no_ema, tsne=args.tsne, progress=not args.no_progress)
    try:
        print(build_report(args.run, out, options))
    except OSError as e:
        if e.filename is None or Path(e.filename) not in (out, *out.parents):
            raise
        raise ConfigError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None
    return 0


def cmd_levels(args) -> int:
    from .editing import level_resamples
    from .visualize import save_grid, to_unit_range

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1; got {args.n}")
    check_seed(args.seed)
    check_finite("--temperature", args.temperature)
    cfg, model = _run_and_model(args)
    torch.manual_seed(args.seed)
    x = _test_images(cfg, args, args.n).to(next(model.parameters()).device)
    grid = level_resamples(model, x, args.samples, args.temperature)  # [B, cols, *data]
    out = args.out or args.run / "levels.png"
    write_output(out, lambda path: save_grid(to_unit_range(grid.flatten(0, 1), cfg.model.likelihood), path,
                                             nrow=grid.shape[1]))
    print(out)
    return 0


@torch.no_grad()
def cmd_encode(args) -> int:
    """RUN/latents.npz: z{t}_mean [N, D_t], E_q[z_t | x] for each level t (1 nearest x), and the labels when known."""
    import numpy as np

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1; got {args.limit}")
    cfg, model = _run_and_model(args)
    data = load_dataset(cfg.data.dataset, args.data_dir or cfg.data.data_dir)
    x = test_input(data.test_x, cfg.model.likelihood)[: args.limit]
    from .evaluate import posterior_means

    device = next(model.parameters()).device
    torch.manual_seed(0)
    means = [[m.float().cpu() for m in posterior_means(model, x[lo:lo + 500].to(device))] for lo in range(0, len(x), 500)]
    arrays = {f"z{t + 1}_mean": torch.cat([m[t] for m in means]).numpy() for t in range(len(means[0]))}
    if data.test_y is not None:
        arrays["labels"] = data.test_y[: len(x)].numpy()
    out = args.out or args.run / "latents.npz"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path")
    if out.suffix != ".npz":  # what numpy would write
        out = out.with_name(out.name + ".npz")
    write_output(out, lambda path: np.savez(path, **arrays))
    print(out)
    return 0


COMMANDS = {"levels": cmd_levels, "encode": cmd_encode, "train": cmd_train, "eval": cmd_eval, "sample": cmd_generate, "reconstruct": cmd_generate,
            "interpolate": cmd_generate, "edit": cmd_edit, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    from .train import TrainingError

    try:
        args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    except UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except BAD_INPUT as e:
        print(f"hvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"hvae {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hvae {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
