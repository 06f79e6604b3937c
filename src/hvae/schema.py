"""Config fields that declare their own range, checked once when a config is built.

A component declares its settings as a dataclass beside its code (a model in models/, an objective in
objectives.py), each field made with `option(default, ...)`; `check_section` checks every field's declared range
and then the class's own `check()` for rules between fields. Errors name the config key ('model.latent_dim'),
never a command-line flag: the CLI says which flag sets which key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from .errors import ConfigError


def option(default: Any, *, ge: float | None = None, gt: float | None = None, lt: float | None = None,
           le: float | None = None, choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
           each_ge: int | None = None, min_len: int = 0, help: str = "") -> Any:
    """A dataclass field with its range: ge/gt/lt/le bound a number, `choices` (or a function returning them,
    read at check time) names the valid strings, each_ge bounds every item of a list, min_len its length."""
    rules = {k: v for k, v in dict(ge=ge, gt=gt, lt=lt, le=le, choices=choices, each_ge=each_ge).items() if v is not None}
    if min_len:
        rules["min_len"] = min_len
    meta = {"rules": rules, "help": help}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check_value(key: str, value: Any, rules: dict[str, Any]) -> None:
    bounds = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for name, holds, text in bounds:
        if name in rules and isinstance(value, (int, float)) and not (math.isfinite(value) and holds(value, rules[name])):
            raise ConfigError(f"{key} must be {text} {rules[name]}; got {value}")
    if "choices" in rules:
        choices = rules["choices"]() if callable(rules["choices"]) else rules["choices"]
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    if isinstance(value, list):
        if len(value) < rules.get("min_len", 0):
            raise ConfigError(f"{key} needs at least {rules['min_len']} size(s); got {value}")
        if "each_ge" in rules and any(v < rules["each_ge"] for v in value):
            raise ConfigError(f"{key} sizes must be >= {rules['each_ge']} each; got {value}")


def check_section(obj: Any, section: str) -> None:
    """Check every field of the dataclass `obj` against its declared range, then obj.check() (rules between
    fields) if it has one. Raises ConfigError naming '<section>.<field>'."""
    for f in dataclasses.fields(obj):
        _check_value(f"{section}.{f.name}", getattr(obj, f.name), f.metadata.get("rules", {}))
    if hasattr(obj, "check"):
        obj.check()
