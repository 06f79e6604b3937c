"""docs/equations.md names, for each equation, its home in the code and the tests that check it: every named
function and test must exist (so the table cannot silently go stale)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = (ROOT / "docs" / "equations.md").read_text()


def test_every_test_named_in_the_equation_table_exists():
    named = 0
    for row in (line for line in TABLE.splitlines() if line.startswith("|") and "tests/" in line):
        current = None
        for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", row):
            current = path or current
            assert current, row
            assert re.search(rf"^def {name}\(", (ROOT / current).read_text(), re.M), f"{current}::{name} is gone"
            named += 1
    assert named > 20


def test_every_code_home_named_in_the_equation_table_exists():
    homes = [h for h in re.findall(r"`(\w+):(\w+)(?:\.(\w+))?`", TABLE) if h[0] != "module"]  # the legend's example
    assert len(homes) > 10
    for module, name, attr in homes:
        source = (ROOT / "src" / "hvae" / f"{module}.py").read_text()
        assert re.search(rf"^(def|class) {name}\b|^{name} =", source, re.M), f"{module}:{name} is gone"
        if attr:
            assert re.search(rf"^\s+def {attr}\(|^\s+{attr}:", source, re.M), f"{module}:{name}.{attr} is gone"
