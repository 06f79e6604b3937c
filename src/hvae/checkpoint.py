"""Run directories and checkpoints: config.json, safetensors weights, training state as safetensors + JSON.

A checkpoint is written into a temporary folder, flushed, then renamed into place, so a crash leaves the
previous one whole. Nothing here unpickles: foreign .pt files go through torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CheckpointError

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; when the block ends, flush it, fsync it and rename it to
    `path`. A failure or an interrupt (KeyboardInterrupt, SIGTERM in the CLI) removes it: `path` is never
    half-written, and an old file there stays whole. Every file hvae writes for a user goes through here."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (atomic_file)."""
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; is {path.parent} an hvae run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is damaged") from None


def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts/lists of tensors and plain values) into tensors and a JSON skeleton."""
    tensors: dict[str, Tensor] = {}
    if isinstance(tree, Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return tensors, {"__tensor__": prefix}
    if isinstance(tree, dict):
        skeleton = {}
        for k, v in tree.items():
            t, s = flatten_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
            skeleton[str(k)] = {"__key_type__": type(k).__name__, "value": s}
        return tensors, {"__dict__": skeleton}
    if isinstance(tree, (list, tuple)):
        items = [flatten_state(v, f"{prefix}.{i}") for i, v in enumerate(tree)]
        for t, _ in items:
            tensors.update(t)
        return tensors, {"__list__": [s for _, s in items]}
    return tensors, tree


def unflatten_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of flatten_state."""
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        cast = {"int": int, "str": str}
        return {cast[v["__key_type__"]](k): unflatten_state(v["value"], tensors) for k, v in skeleton["__dict__"].items()}
    if isinstance(skeleton, dict) and "__list__" in skeleton:
        return [unflatten_state(s, tensors) for s in skeleton["__list__"]]
    return skeleton


def save_checkpoint(run_dir: Path, weights: dict[str, Tensor], state: dict[str, Any],
                    ema: dict[str, Tensor] | None = None) -> Path:
    """Write run_dir/checkpoints/last atomically: model.safetensors, [ema.safetensors], state.safetensors + state.json."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would (mkdtemp makes it private)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        tensors, skeleton = flatten_state(state)
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT_VERSION, "state": skeleton}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:  # e.g. a full disk: no half-written checkpoint left behind; `last` is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    last, old = ckpt_root / "last", ckpt_root / "last.old"
    if last.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(last, old)
    os.replace(tmp, last)  # the commit point: from here on `last` is the new checkpoint
    if old.exists():
        shutil.rmtree(old)
    return last


def checkpoint_dir(run_dir: Path) -> Path:
    """The newest whole checkpoint: last/, or last.old/ if a crash came between the two renames."""
    for name in ("last", "last.old"):
        d = run_dir / "checkpoints" / name
        if (d / "state.json").is_file() and (d / "model.safetensors").is_file():
            return d
    raise CheckpointError(f"{run_dir} has no checkpoint (checkpoints/last); train it first with hvae train --out {run_dir}")


def load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the checkpoint is damaged") from None


def load_state(ckpt: Path) -> dict[str, Any]:
    meta = read_json(ckpt / "state.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int) or "state" not in meta:
        raise CheckpointError(f"{ckpt}/state.json is not an hvae training state (needs an integer 'format' and "
                              "a 'state'); the checkpoint is damaged or foreign")
    if meta["format"] > FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} was written by a newer hvae (format {meta['format']} > {FORMAT_VERSION}); "
                              "upgrade hvae to read it")
    return unflatten_state(meta["state"], load_tensors(ckpt / "state.safetensors"))


def upgrade_weights(model: torch.nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights saved under an older layout of the model's modules, under today's names (the model's `legacy_key`
    maps an old name to the new one; models without one keep their names)."""
    rename = getattr(model, "legacy_key", None)
    return weights if rename is None else {rename(k): v for k, v in weights.items()}


def load_weights_into(model: torch.nn.Module, weights: dict[str, Tensor], source: Path) -> None:
    """Load weights strictly; a mismatch names the first differing key and says the config does not match."""
    weights = upgrade_weights(model, weights)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    bad_shape = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or bad_shape:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"shape of {bad_shape[0]} {tuple(weights[bad_shape[0]].shape)} vs {tuple(own[bad_shape[0]].shape)}")
        raise CheckpointError(f"{source} does not fit this model ({what}); it comes from another model or config")
    model.load_state_dict(weights)


def optimizer_state_for(model: torch.nn.Module, saved: dict[str, Any]) -> dict[str, Any]:
    """The saved optimizer state, ordered as model.parameters() is today. An optimizer's state is indexed by the
    order of the parameters it was given: checkpoints name them (`param_names`); older ones were written in the
    order of the model's older layout, which the model states (`legacy_parameter_order`) where it has changed."""
    state = saved["optimizer"]
    names = saved.get("param_names")
    if names is None and hasattr(model, "legacy_parameter_order"):
        names = model.legacy_parameter_order()
    if names is None:
        return state
    now = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    if sorted(now) != sorted(names) or len(state["param_groups"]) != 1:
        raise CheckpointError("the checkpoint's optimizer state does not fit this model's parameters; it comes from "
                              "another model or config")
    old_to_new = {i: now[n] for i, n in enumerate(names)}
    group = dict(state["param_groups"][0], params=sorted(old_to_new[i] for i in state["param_groups"][0]["params"]))
    return {"state": {old_to_new[i]: v for i, v in state["state"].items()}, "param_groups": [group]}


def read_config(run_dir: Path):
    """The Config of a run directory (config.json, in today's layout or an older one)."""
    from .config import ConfigError, from_dict

    try:
        return from_dict(read_json(Path(run_dir) / "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{run_dir}/config.json does not match this hvae ({e})") from None


def load_foreign_weights(path: Path) -> dict[str, Tensor]:
    """Weights from .safetensors, or a .pt/.pth state dict read with torch.load(weights_only=True) (no code runs)."""
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (and others) for anything not plain weights
        raise CheckpointError(f"{path}: refused to load ({type(e).__name__}); only plain tensor state dicts "
                              "are accepted, never pickled code") from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict)")
    return obj


def load(run_dir: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True) -> torch.nn.Module:
    """The trained model of a run directory, in eval mode; the EMA weights when the run has them (and ema)."""
    from .models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; pass the --out folder of hvae train")
    cfg = read_config(run_dir)
    last = checkpoint_dir(run_dir)
    state = load_state(last)
    try:
        model = build_model(cfg.model, state["data_shape"])
    except ValueError as e:
        raise CheckpointError(f"{run_dir}/config.json: {e}; the file was edited or is damaged") from None
    source = last / ("ema.safetensors" if ema and (last / "ema.safetensors").exists() else "model.safetensors")
    load_weights_into(model, load_tensors(source), source)
    return model.to(device).eval()
