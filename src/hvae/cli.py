"""hvae's command line: argparse subcommands that parse, then call library functions.

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback), 1 anything else, 3 (EXIT_STOPPED) training stopped
by SIGTERM or SIGINT after writing a checkpoint (one line says how to resume), 128 + N interrupted by signal N
(a second signal while training stops, SIGTERM or Ctrl-C in the other commands; an output file being written is
left as it was). Option values are checked by their argparse types; the library's errors name config keys, and
`main` adds the flag that set a key.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import explore
from .arguments import TRAIN_FLAGS, UsageError, build_parser
from .config import ConfigError, resolve
from .data import test_set
from .errors import InputError, RunDirError
from .preemption import EXIT_STOPPED, TrainingStopped, sigterm_interrupts


def train_arguments(args) -> dict:
    """hvae.train's arguments for this command line: a resume (only --epochs and --device may change) or a new
    run's resolved config (with --auto-resume: start or resume)."""
    flags = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items()}
    if args.auto_resume and (args.resume or args.overwrite):
        raise ConfigError("--auto-resume starts or resumes the run by itself; "
                          f"drop --{'resume' if args.resume else 'overwrite'}")
    if args.resume:
        if not args.resume.is_dir():
            raise RunDirError(f"--resume {args.resume}: no such run directory; pass the --out folder of hvae train")
        if args.out and args.out != args.resume:
            raise ConfigError("--resume DIR continues DIR itself; drop --out (or give the same folder)")
        others = [f for f, key in TRAIN_FLAGS.items() if flags[key] is not None and f not in ("epochs", "device")]
        if others or args.set or args.config:
            raise ConfigError("--resume uses the run's saved config; only --epochs and --device may change "
                              f"(got --{(others or ['config' if args.config else 'set'])[0].replace('_', '-')})")
        return {"out": args.resume, "resume": True, "train__epochs": args.epochs, "runtime__accelerator": args.device}
    if not args.out:
        raise ConfigError("hvae train needs --out DIR (the run directory) or --resume DIR")
    return {"config": resolve(args.config, flags, args.set), "out": args.out, "overwrite": args.overwrite,
            "auto_resume": args.auto_resume}


def cmd_train(args) -> int:
    from .loop import train

    try:
        _, out = train(**train_arguments(args), progress=not args.no_progress, argv=sys.argv)
    except TrainingStopped as e:
        # Why 0 on the other ranks: Lightning's launcher kills rank 0 (which may still be writing) when another rank
        # exits with any other code; the stop is reported by rank 0, the process that was started.
        if e.rank == 0:
            again = "rerun this same command to resume" if args.auto_resume else \
                f"resume with: hvae train --resume {shlex.quote(str(e.out))}"
            print(f"hvae train: {e}; {again}", file=sys.stderr)
        return EXIT_STOPPED if e.rank == 0 else 0
    print(f"trained: {out}", file=sys.stderr)
    return 0


def load_run(args):
    """The run's config, its model (EMA weights unless --no-ema) on --device, and a function giving test images."""
    cfg = ckpt.read_config(args.run) if (args.run / "config.json").exists() else None
    model = ckpt.load(args.run, args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                      ema=not getattr(args, "no_ema", False))

    def images(n: int | None = None, labels: bool = False):
        x, y = test_set(cfg.data.dataset, args.data_dir or cfg.data.data_dir, cfg.model.likelihood)  # then sliced
        if n is not None and n > len(x):
            print(f"note: {n} test images asked for, the test set has {len(x)}: using all {len(x)}", file=sys.stderr)
        x = (x if n is None else x[:n]).to(next(model.parameters()).device)
        return (x, y) if labels else x
    return cfg, model, images


def write_output(out: Path, write) -> Path:
    """Run write(out), turning an unwritable --out (a folder, a file as parent, no permission) into bad input."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(out)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None
    print(out)
    return out


def save_images(args, cfg, images, nrow: int, default: str) -> int:
    from .visualize import save_grid, to_unit_range

    write_output(args.out or args.run / default, lambda path: save_grid(to_unit_range(images, cfg.model.likelihood),
                                                                        path, nrow=nrow))
    return 0


def evaluate_on(args, cfg, model, x) -> dict:
    """`hvae eval`'s metrics of x, and "threads": the count it ran with (threads.choose_for_eval: --threads, else the
    run's pinned runtime.threads; where neither pins one, measured once over a few throwaway calls)."""
    from .evaluate import evaluate
    from .threads import choose_for_eval, eval_probe

    chosen = choose_for_eval(eval_probe(model, x, args.k, args.batch_size, args.draws),
                             args.threads if args.threads is not None else cfg.runtime.threads if cfg else 0,
                             x.device.type == "cpu")
    result = evaluate(model, x, k=args.k, batch_size=args.batch_size, passes=args.passes, draws=args.draws,
                      device=next(model.parameters()).device, progress=not args.no_progress)
    return result | {"threads": chosen["count"]}


def cmd_eval(args) -> int:
    cfg, model, images = load_run(args)
    result = {} if args.fid_only else evaluate_on(args, cfg, model, images(args.limit))
    if args.fid or args.fid_only:
        result |= sample_quality_of(args, cfg, model)
    for level in result.get("collapsed_levels", []):
        print(f"hvae eval: warning: level {level} has collapsed (mean KL {result['kl_per_level'][level - 1]:.4f} "
              f"nats, {result['active_units_per_level'][level - 1]} active units); try KL warm-up "
              "(objective.warmup_epochs) or free bits (objective.free_bits)", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    for key, value in ({} if args.json else result).items():
        if key not in ("fid_curve", "fid_reference"):  # rows: printed as a table below
            print(f"{key:>24}  {value:.4f}" if isinstance(value, float) else f"{key:>24}  {value}")
    if not args.json and "fid_curve" in result:
        print(quality_table(result))
    return 0


def sample_quality_of(args, cfg, model) -> dict:
    """`hvae eval --fid`: the sample-quality keys (sample_quality.sample_quality), rows appended to the run's
    sample-quality.jsonl."""
    from .data import load_dataset
    from .sample_quality import sample_quality

    data = load_dataset(cfg.data.dataset, args.data_dir or cfg.data.data_dir)
    return sample_quality(model, data, cfg.model.likelihood, args.samples, args.temperature,
                          progress=not args.no_progress, run_dir=args.run)


def quality_table(result: dict) -> str:
    """The sample-quality rows as aligned text: each temperature, then the reference rows."""
    rows = [(f"samples, temperature {r['temperature']:g}", r) for r in result["fid_curve"]]
    rows += [(f"reference: {name}", r) for name, r in result.get("fid_reference", {}).items()]
    lines = [f"{'':>32}  {'fid':>9}  {'kid':>9}  {'kid_se':>8}  {'precision':>9}  {'recall':>7}"]
    lines += [f"{name:>32}  {r['fid']:9.3f}  {r['kid']:9.5f}  {r['kid_se']:8.5f}  {r['precision']:9.4f}  "
              f"{r['recall']:7.4f}" for name, r in rows]
    return "\n".join(lines)


def is_diffusion(model) -> bool:
    from .protocol import DiffusionModel

    return isinstance(model, DiffusionModel)


def needs_latent_code(model, command: str) -> None:
    """Commands that move through a latent code (interpolate, edit, levels, encode) on a model that has one."""
    if is_diffusion(model):
        raise ConfigError(f"hvae {command} works on a latent code; a diffusion model's latents have the data's shape "
                          "(use sample --chain to see its denoising chain, reconstruct to encode and denoise)")


@torch.no_grad()
def cmd_sample(args) -> int:
    cfg, model, _ = load_run(args)
    torch.manual_seed(args.seed)
    if (args.steps or args.chain) and not is_diffusion(model):
        raise ConfigError("--steps and --chain are for diffusion models (model.name vdm)")
    if is_diffusion(model):
        if len(args.temperature) != 1:
            raise ConfigError("--temperature: a diffusion model takes one temperature")
        if args.chain:
            chain = model.denoising_chain(args.n, args.steps, args.chain, args.temperature[0])  # [n, frames, *data]
            return save_images(args, cfg, chain.flatten(0, 1), args.chain, "chain.png")
        images = model.sample(args.n, args.temperature[0], args.steps, progress=not args.no_progress)
        return save_images(args, cfg, images, 8, "sample.png")
    try:
        images = model.sample(args.n, args.temperature)
    except ValueError as e:
        raise ConfigError(f"--temperature {','.join(map(str, args.temperature))}: {e}") from None
    return save_images(args, cfg, images, 8, "sample.png")


@torch.no_grad()
def cmd_reconstruct(args) -> int:
    cfg, model, images = load_run(args)
    torch.manual_seed(args.seed)
    x = images(args.n)
    return save_images(args, cfg, torch.stack([x, model.reconstruct(x)], 1).flatten(0, 1), 8, "reconstruct.png")


@torch.no_grad()
def cmd_interpolate(args) -> int:
    from .editing import interpolate

    cfg, model, images = load_run(args)
    needs_latent_code(model, "interpolate")
    torch.manual_seed(args.seed)
    x = images()[: 2 * args.n]
    if len(x) < 2 * args.n:
        raise ConfigError(f"--n {args.n} pairs need {2 * args.n} test images; the test set has {len(x)}")
    paths = interpolate(model, x[: args.n], x[args.n:], args.steps, args.spherical).flatten(0, 1)
    return save_images(args, cfg, paths, args.steps, "interpolate.png")


@torch.no_grad()
def cmd_levels(args) -> int:
    from .editing import level_resamples

    cfg, model, images = load_run(args)
    needs_latent_code(model, "levels")
    torch.manual_seed(args.seed)
    grid = level_resamples(model, images(args.n), args.samples, args.temperature)  # [B, cols, *data]
    return save_images(args, cfg, grid.flatten(0, 1), grid.shape[1], "levels.png")


def _test_image(x, index: int, flag: str):
    if not 0 <= index < len(x):
        raise ConfigError(f"{flag} {index} is out of range; the test set has {len(x)} images (0..{len(x) - 1})")
    return x[index:index + 1]


@torch.no_grad()
def cmd_edit(args) -> int:
    from . import editing
    from .visualize import rows

    cfg, model, images = load_run(args)
    needs_latent_code(model, "edit")
    x, y = images(labels=True)
    if args.action == "interpolate":
        grid = editing.interpolation_rows(model, _test_image(x, args.a, "--a"), _test_image(x, args.b, "--b"),
                                          args.steps, args.method)
    elif args.action == "arithmetic":
        x, y = x[: args.limit], None if y is None else y[: args.limit]
        grid = editing.class_arithmetic(model, x, y, args.from_class, args.to_class, args.n, args.scales)
    else:
        z = editing.encode_means(model, _test_image(x, args.index, "--index"))[0]
        dims = args.dims or editing.most_informative_dims(model, x[:1000], 10)
        grid = editing.traverse(model, z, dims, torch.linspace(-args.span, args.span, args.steps))
    images, nrow = rows(grid)  # [rows * columns, *data]
    return save_images(args, cfg, images, nrow, f"edit-{args.action}.png")


def cmd_report(args) -> int:
    from .report import ReportOptions, build_report

    out = args.out or args.run / "report.html"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path")
    options = ReportOptions(k=args.k, limit=args.limit, n_samples=args.n, temperature=args.temperature, seed=args.seed,
                            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                            data_dir=args.data_dir, ema=not args.no_ema, tsne=args.tsne, progress=not args.no_progress)
    try:
        print(build_report(args.run, out, options))
    except OSError as e:
        written = e.filename is not None and (Path(e.filename) in (out, *out.parents)
                                              or Path(e.filename).parent == out.parent)  # or its temporary file
        if not written:
            raise
        raise ConfigError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None
    return 0


@torch.no_grad()
def cmd_encode(args) -> int:
    """RUN/latents.npz: z{t}_mean [N, D_t], E_q[z_t | x] for each level t (1 nearest x), and the labels when known."""
    from .editing import latent_arrays

    _, model, images = load_run(args)
    needs_latent_code(model, "encode")
    x, y = images(labels=True)
    torch.manual_seed(0)
    arrays = latent_arrays(model, x[: args.limit], y)
    out = args.out or args.run / "latents.npz"
    if out.suffix != ".npz" and not out.is_dir():  # what numpy would write
        out = out.with_name(out.name + ".npz")
    write_output(out, lambda path: write_npz(path, arrays))
    return 0


def write_npz(path: Path, arrays: dict) -> None:
    """np.savez, atomically (a file object: numpy adds no suffix to the temporary file's name)."""
    import numpy as np

    with ckpt.atomic_file(path) as f:
        np.savez(f, **arrays)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "reconstruct": cmd_reconstruct,
            "interpolate": cmd_interpolate, "levels": cmd_levels, "edit": cmd_edit, "report": cmd_report,
            "encode": cmd_encode, "explore": explore.cmd_explore}


def with_flag(message: str, argv: list[str]) -> str:
    """A library message names config keys; where the user set that key with a named flag, say which."""
    for flag, key in TRAIN_FLAGS.items():
        option = f"--{flag.replace('_', '-')}"
        if key in message and option in argv and option not in message:
            return f"{message} (set by {option})"
    return message


def main(argv: list[str] | None = None) -> int:
    from .optim import TrainingError

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{' '.join(e.prog.split()[:2])}: error: {e}", file=sys.stderr)  # 'hvae edit', as other errors say
        return 2
    try:
        with nullcontext() if args.command == "train" else sigterm_interrupts():  # train: its own handlers
            return COMMANDS[args.command](args)
    except InputError as e:
        print(f"hvae {args.command}: error: {with_flag(str(e), argv)}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"hvae {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM (sigterm_interrupts); a second signal in training (StopNow)
        print(f"hvae {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)


def entry() -> None:
    sys.exit(main())
