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
from .models import MODELS, VAEConfig
from .objectives import OBJECTIVES, ElboObjective
from .schema import check_section, option


@dataclass
class DataConfig:
    """`data`: which images."""

    dataset: str = option("fashion-mnist", help="fashion-mnist | mnist | PATH.npz | PATH.npy")
    data_dir: str | None = option(None, help="folder holding the IDX files")
    validation: int = option(0, ge=0, help="training images held out (seeded) for model selection")


@dataclass
class OptimConfig:
    """`optim`: how a gradient becomes an update: the optimizer, the update guard, the weight average."""

    optimizer: str = option("adam", choices=("adam", "adamax"))
    lr: float = option(1e-3, gt=0)
    weight_decay: float = option(0.0, ge=0, help="decoupled weight decay (adam: AdamW; adamax: an L2 term)")
    spectral_reg: float = option(0.0, ge=0, help="NVAE's spectral regularization: add this times the sum of the "
                                 "largest singular values of the conv and linear weights to the loss (0: off)")
    ema: float = option(0.0, ge=0, lt=1, help="EMA decay of the weights used for evaluation (0: off)")
    grad_clip: float = option(0.0, ge=0, help="clip the gradient norm to this (0: off)")
    skip_threshold: float = option(0.0, ge=0, help="skip updates whose gradient norm exceeds this (0: off)")
    max_skips: int = option(10, ge=0, help="after this many skips in a row, clip instead of skipping")
    max_nonfinite: int = option(20, ge=1, help="stop after this many non-finite losses/gradients in a row")
    schedule: str = option("constant", choices=("constant", "cosine"),
                           help="the learning rate: constant, or cosine-annealed to lr_min over decay_epochs")
    decay_epochs: float = option(0.0, ge=0, help="cosine: epochs over which the lr falls from lr to lr_min")
    lr_min: float = option(0.0, ge=0, help="cosine: the lr at and after decay_epochs")
    lr_warmup_epochs: float = option(0.0, ge=0, help="linear lr warm-up from 0 over this many epochs (0: off)")

    def check(self) -> None:
        if self.schedule == "cosine" and self.decay_epochs <= 0:
            raise ConfigError("optim.schedule=cosine needs optim.decay_epochs > 0 (the epochs over which the lr falls to "
                              "optim.lr_min), e.g. --set optim.decay_epochs=100")
        if self.lr_min > self.lr:
            raise ConfigError(f"optim.lr_min ({self.lr_min}) must not exceed optim.lr ({self.lr}); lower lr_min")


@dataclass
class TrainConfig:
    """`train`: the run: how long, in what batches, from which seed, and what it writes on the way."""

    epochs: int = option(20, ge=1)
    batch_size: int = option(128, ge=1, help="global batch, split across devices")
    seed: int = option(0, ge=0, lt=2**32)
    checkpoint_every: int = option(0, ge=0, help="steps between checkpoints (0: each epoch end only)")
    checkpoint_minutes: float = option(10.0, ge=0, help="also a checkpoint when this much wall time has passed since "
                                       "the last one, so a SIGKILL loses at most that much (0: off)")
    log_every: int = option(50, ge=1, help="steps between metric lines")
    tensorboard: bool = option(False, help="also write TensorBoard events (pip install 'hvae[tensorboard]')")


# Why a fixed list: the accelerators hvae runs on; whether this machine has one is checked when training starts.
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
# Why: the "-true" half precisions would cast the weights but not the held-out data the loop scores itself.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "32", "bf16", "16")  # the last three: Fabric's short names


@dataclass
class RuntimeConfig:
    """`runtime`: where and how fast; none of it changes the mathematics of the run."""

    accelerator: str = option("auto", choices=ACCELERATORS)
    devices: int = option(1, ge=1, help="processes (devices) per machine")
    num_nodes: int = option(1, ge=1, help="machines, for multi-node DDP (launched with torchrun or Fabric's environment)")
    strategy: str = option("auto", help="auto | ddp | ... (Fabric's strategies; checked when training starts)")
    precision: str = option("32-true", choices=PRECISIONS)
    threads: int = option(0, ge=0, le=1024, help="torch CPU threads: N pins N; 0 measures the fastest count at the "
                          "start (and again when the step time drifts, where results do not depend on it)")
    compile: bool = option(False, help="torch.compile the training step")


@dataclass
class Config:
    """The whole configuration. `model` and `objective` are the config classes of the model and objective named by
    their `name` key (models.MODELS, objectives.OBJECTIVES): each declares only the settings it uses."""

    model: Any = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: Any = field(default_factory=ElboObjective)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


NAMED = {"model": MODELS, "objective": OBJECTIVES}  # sections whose fields depend on their `name`

# Keys of the layout before the model/objective/optim/runtime sections (config.json of older runs, presets):
# read at their new place.
LEGACY = {**{f"train.{k}": f"optim.{k}" for k in ("optimizer", "lr", "ema", "grad_clip", "skip_threshold",
                                                 "max_skips", "max_nonfinite")},
          **{f"train.{k}": f"objective.{k}" for k in ("beta", "warmup_epochs", "free_bits", "n_samples", "analytic_kl")},
          **{f"train.{k}": f"runtime.{k}" for k in ("accelerator", "devices", "num_nodes", "strategy", "precision",
                                                   "threads", "compile")}}
# The one flat model section of older runs held every model's keys; each model now declares its own.
LEGACY_MODEL_KEYS = ("arch", "latent_dim", "hidden", "conv_channels", "likelihood", "activation", "variance", "levels",
                     "latent_dims", "level_hidden", "posterior", "skip", "norm")


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key of cfg (its model's and objective's own keys, with their `name`)."""
    cfg = cfg or Config()
    keys = []
    for section in _fields(cfg):
        keys += [f"{section}.name"] if section in NAMED else []
        keys += [f"{section}.{name}" for name in _fields(getattr(cfg, section))]
    return keys


def _unknown(key: Any, valid: list[str]) -> ConfigError:
    """The closest valid key: by the whole dotted name, else by its last part ('lr' -> 'train.lr')."""
    key = str(key)
    in_section = [k for k in valid if k.startswith(key + ".")]
    if in_section:
        return ConfigError(f"{key!r} is a section, not a key; set one of its keys, e.g. {in_section[0]!r}")
    named = [*valid, *LEGACY]  # an older key's misspelling: the closest is its new place
    close = [LEGACY.get(m, m) for m in difflib.get_close_matches(key, named, n=1, cutoff=0.5)]
    if not close:
        leaves = {k.split(".", 1)[1]: k for k in valid}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)]
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, annotation: Any, label: str | None = None) -> Any:
    """Check `value` against the field's type; accept ints for floats. Errors name the key (`label`: how to name
    it, default 'key') and the expected type."""
    label = label or f"'{key}'"
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
                raise ConfigError(f"config key {label} must be a finite number; got {value!r}")
            return number
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint in (bool, str) and type(value) is hint:
            return value
    names = " or ".join(getattr(h, "__name__", str(h)) for h in hints)
    raise ConfigError(f"config key {label} must be {names}; got {value!r}")


def _translate(updates: dict[str, Any], legacy: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Older keys at their new place (LEGACY; train.iw_k = k > 1 is objective iwae with k). -> (updates, new key ->
    the key as given, for messages). `legacy` (a config.json of an older run): its settings that did not apply to
    its model or objective (the flat layout held them all) are dropped instead of refused."""
    out, given = {}, {}
    for key, value in updates.items():
        if key == "train.iw_k":
            k = _coerce(key, value, int)
            if k < 1:
                raise ConfigError(f"train.iw_k must be >= 1; got {k} (it is now objective.name=iwae with objective.k)")
            if k > 1:
                out["objective.name"], out["objective.k"] = "iwae", k
                given["objective.k"] = key
            continue
        new = LEGACY.get(key, key)
        out[new] = value
        if new != key:
            given[new] = key
    if legacy:
        model = MODELS.get(out.get("model.name", Config().model.name))
        objective = OBJECTIVES.get(out.get("objective.name", Config().objective.name))
        for key in list(out):
            section, _, name = str(key).partition(".")
            unused = (section == "model" and model and name in LEGACY_MODEL_KEYS and name not in _fields(model)) or \
                (section == "objective" and objective and key in given and name not in _fields(objective))
            if unused:
                del out[key]
    return out, given


def _switch(cfg: Config, section: str, updates: dict[str, Any]) -> None:
    """Set a named section (model, objective) to the defaults of the class `<section>.name` picks, when it changes."""
    key = f"{section}.name"
    if key not in updates:
        return
    name, registry = _coerce(key, updates.pop(key), str), NAMED[section]
    if name not in registry:
        raise ConfigError(f"unknown {key} {name!r}; choose one of {', '.join(registry)}")
    if name != getattr(cfg, section).name:
        setattr(cfg, section, registry[name]())
        # A new model brings its own default objective (a diffusion model: vdm) unless one is named, and leaves one
        # that trains only other models.
        default = getattr(cfg.model, "default_objective", "elbo")
        models = getattr(cfg.objective, "models", None)
        if section == "model" and "objective.name" not in updates and (
                default != "elbo" or (models is not None and name not in models)):
            updates["objective.name"] = default


def _not_for(key: str, cfg: Config) -> ConfigError | None:
    """A key that belongs to another model or objective than the one chosen: say so, and whose it is."""
    section, _, name = key.partition(".")
    if section not in NAMED:
        return None
    owners = [n for n, c in NAMED[section].items() if name in _fields(c)]
    if not owners:
        return None
    chosen = getattr(cfg, section).name
    return ConfigError(f"{key} does not apply to {section} {chosen!r} (it is a setting of {', '.join(owners)}); "
                       f"remove it, or set {section}.name")


def apply(cfg: Config, updates: dict[str, Any], legacy: bool = False) -> Config:
    """Set dotted keys ('optim.lr': 3e-4) on a copy of cfg, strictly, then check every range (validate).

    'model.name' / 'objective.name' switch that section to the named class's defaults first (when it changes),
    so the other keys are checked against the chosen model's and objective's own settings. Keys of the older
    layout ('train.lr') are read at their new place."""
    cfg = copy.deepcopy(cfg)  # no list shared between the input and the result
    updates, given = _translate(updates, legacy)
    for section in NAMED:
        _switch(cfg, section, updates)
    valid = all_keys(cfg)
    for key, value in updates.items():
        if key not in valid:
            raise _not_for(str(key), cfg) or _unknown(given.get(key, key), valid)
        section, name = key.split(".")
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        label = f"'{key}' (given as '{given[key]}')" if key in given else None
        setattr(getattr(cfg, section), name, _coerce(key, value, hints[name], label))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every section's declared ranges (schema.option) and its rules between fields; ConfigError names the key.
    Then the pair: an objective may train only some models (its `models`), a model may refuse an objective (its
    `check_objective`, e.g. a continuous-time diffusion model has no explicit levels for the ELBO objective)."""
    for section in _fields(cfg):
        check_section(getattr(cfg, section), section)
    models = getattr(cfg.objective, "models", None)
    if models is not None and cfg.model.name not in models:
        raise ConfigError(f"objective {cfg.objective.name!r} trains only model {' or '.join(models)}; set "
                          f"objective.name to one of {', '.join(n for n, c in OBJECTIVES.items() if not getattr(c, 'models', None))} "
                          f"for model {cfg.model.name!r}")
    if hasattr(cfg.model, "check_objective"):
        cfg.model.check_objective(cfg.objective.name)


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
    """Sections as plain dicts (what config.json holds); the named sections lead with their name."""
    tree = {}
    for section in _fields(cfg):
        value = getattr(cfg, section)
        tree[section] = ({"name": value.name} if section in NAMED else {}) | dataclasses.asdict(value)
    return tree


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from to_dict output (e.g. a run's config.json), strictly. A config.json of an older run
    (no `objective` section) is read in its own layout: see _translate."""
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections (model/data/objective/...); got {type(tree).__name__}")
    return apply(Config(), flatten(tree), legacy="objective" not in tree)


def resolve(presets: list[str | Path], flags: dict[str, Any], sets: list[str]) -> Config:
    """The config of a new run: the defaults, then YAML presets in order (later ones win, key by key), then named
    options (e.g. the CLI's --epochs; None: not given), then `section.key=value` items."""
    updates: dict[str, Any] = {}
    for preset in presets:
        updates.update(load_yaml(preset))
    updates.update({k: v for k, v in flags.items() if v is not None})
    updates.update(parse_set(sets))
    return apply(Config(), updates)
