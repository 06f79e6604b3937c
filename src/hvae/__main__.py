"""python -m hvae ... (the same as the `hvae` command)."""

from .cli import entry

entry()
