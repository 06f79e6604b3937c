"""Typed configuration: dataclasses with defaults, YAML presets listing only what differs, and strict
dotted overrides (`--set train.lr=3e-4`) that reject unknown keys with the closest valid name."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "vae"  # vae | mhvae | ladder
    arch: str = "mlp"  # mlp | conv
    latent_dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    conv_channels: list[int] = field(default_factory=lambda: [32, 64])
    likelihood: str = "bernoulli"  # bernoulli | gaussian | gaussian-learned | logistic
    activation: str = "relu"
    variance: str = "clamp"  # clamp | softplus
    # Hierarchical models (mhvae, ladder); level 1 is nearest x.
    levels: int = 2  # T, the number of latent levels
    latent_dims: list[int] = field(default_factory=list)  # D_1..D_T; empty: latent_dim at every level
    level_hidden: list[int] = field(default_factory=lambda: [256])  # widths of each level's small MLPs
    posterior: str = "residual"  # ladder: residual | precision | independent
    skip: bool = False  # ladder: the likelihood sees every level's z, not only z_1
    norm: str = "none"  # none | layer | batch, in the hierarchical models' level MLPs


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | PATH.npz | PATH.npy
    data_dir: str | None = None
    validation: int = 0  # training images held out (seeded) for model selection


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128  # global batch, split across devices
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamax
    seed: int = 0
    beta: float = 1.0
    warmup_epochs: float = 0.0  # KL warm-up: beta ramps linearly from 0 over this many epochs
    free_bits: float = 0.0  # nats per level, on batch means
    n_samples: int = 1  # L Monte Carlo samples for the reconstruction term
    iw_k: int = 1  # IWAE training objective with k samples (1 = ELBO)
    analytic_kl: bool = True
    grad_clip: float = 0.0  # clip the gradient norm to this (0: off)
    skip_threshold: float = 0.0  # skip updates whose gradient norm exceeds this (0: off)
    max_skips: int = 10  # after this many skips in a row, clip instead of skipping
    max_nonfinite: int = 20  # stop after this many non-finite losses/gradients in a row
    ema: float = 0.0  # EMA decay of the weights used for evaluation (0: off)
    compile: bool = False  # torch.compile the training step
    checkpoint_every: int = 0  # steps between checkpoints (0: each epoch end only)
    log_every: int = 50  # steps between metric lines
    accelerator: str = "auto"
    devices: int = 1  # processes (devices) per machine
    num_nodes: int = 1  # machines, for multi-node DDP (each launched with torchrun or Fabric's environment)
    strategy: str = "auto"
    precision: str = "32-true"
    tensorboard: bool = False
    threads: int = 0  # torch CPU threads (0: PyTorch's default)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def all_keys(cfg: Config | None = None) -> list[str]:
    cfg = cfg or Config()
    return [f"{section}.{name}" for section in _fields(cfg) for name in _fields(getattr(cfg, section))]


def _unknown(key: Any, valid: list[str]) -> ConfigError:
    """The closest valid key: by the whole dotted name, else by its last part ('lr' -> 'train.lr')."""
    key = str(key)
    in_section = [k for k in valid if k.startswith(key + ".")]
    if in_section:
        return ConfigError(f"{key!r} is a section, not a key; set one of its keys, e.g. {in_section[0]!r}")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        leaves = {k.split(".", 1)[1]: k for k in valid}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)]
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's type; accept ints for floats. Errors name key and expected type."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in hints:
        return None
    for hint in hints:
        origin = typing.get_origin(hint)
        if origin is list and isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        if hint is float and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads '3e-4' (no dot) as a string
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf  # float() of a huge int raises
            if not math.isfinite(number):
                raise ConfigError(f"config key {key!r} must be a finite number; got {value!r}")
            return number
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint in (bool, str) and type(value) is hint:
            return value
    names = " or ".join(getattr(h, "__name__", str(h)) for h in hints)
    raise ConfigError(f"config key {key!r} must be {names}; got {value!r}")


def apply(cfg: Config, updates: dict[str, Any]) -> Config:
    """Set dotted keys ('train.lr': 3e-4) on a copy of cfg, strictly."""
    cfg = copy.deepcopy(cfg)  # no list shared between the input and the result
    valid = all_keys(cfg)
    type_hints = {s: typing.get_type_hints(type(getattr(cfg, s))) for s in _fields(cfg)}
    for key, value in updates.items():
        if key not in valid:
            raise _unknown(key, valid)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, _coerce(key, value, type_hints[section][name]))
    return cfg


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; a non-section at the top level is an unknown key."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML preset as dotted keys. Errors: missing file, bad YAML, not a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}; check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; give a YAML preset") from None
    tree = _yaml_value(text, f"{path} is not valid YAML", "fix the syntax")
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model/data/train); got {type(tree).__name__}")
    # An empty section ('train:' with nothing under it) lists nothing that differs from the defaults.
    return flatten({k: v for k, v in tree.items() if not (v is None and k in _fields(Config))})


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error (YAML would keep the last one,
    silently dropping the rest), and integers are YAML 1.2's: 010 is not octal 8, 1:30 is not base-60 90 (such
    text stays a string, which the config then refuses)."""


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_INT = "tag:yaml.org,2002:int"
_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)
_StrictLoader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
                                         for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$|^0x[0-9a-fA-F_]+$"),
                                    list("-+0123456789"))


def _yaml_value(text: str, what: str, fix: str) -> Any:
    """YAML (the strict loader above), with every failure as a one-line ConfigError (constructors raise
    ValueError too, e.g. for a date such as 2020-13-45)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{what} ({first}); {fix}") from None
    except (ValueError, OverflowError, RecursionError) as e:
        raise ConfigError(f"{what} ({e}); {fix}") from None


def parse_set(items: list[str]) -> dict[str, Any]:
    """['train.lr=3e-4', 'model.hidden=[256,128]'] -> dotted dict; values parsed as YAML scalars/lists."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. train.lr=3e-4); got {item!r}")
        out[key.strip()] = _yaml_value(raw, f"--set {item!r}: cannot parse the value",
                                       "quote strings, write lists as [1,2]") if raw.strip() else None
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from to_dict output (e.g. a run's config.json), strictly."""
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections (model/data/train); got {type(tree).__name__}")
    return apply(Config(), flatten(tree))
