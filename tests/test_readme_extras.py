"""The README lists every extra of setup.py, each with a line saying what it is for."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _extras() -> list:
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return [k.value for k in node.value.keys]
    raise AssertionError("setup.py has no extras_require")


def test_readme_lists_every_extra():
    extras = _extras()
    assert "deploy" in extras and "mmseg" in extras
    listed = re.findall(r"^- `([\w-]+)`: \S", (REPO / "README.md").read_text(encoding="utf-8"), re.M)
    missing = [e for e in extras if e not in listed]
    assert not missing, f"README.md lists no line '- `<extra>`: what it is for' for {missing}"
