"""The tree is the architecture: each concern's package says what it does and where to start."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import gateway

ROOT = Path(gateway.__file__).parent
PACKAGES = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


@pytest.mark.parametrize("name", PACKAGES)
def test_package_docstring_names_a_module_to_open_first(name: str) -> None:
    doc = importlib.import_module(f"gateway.{name}").__doc__ or ""
    assert doc.strip(), f"gateway/{name}/__init__.py has no docstring"
    named = re.findall(r"`(\w+\.py)`", doc)
    if len(list((ROOT / name).glob("*.py"))) > 2:  # a package of one module needs no pointer
        assert named, f"gateway/{name}: the docstring names no module to open first"
    for module in named:
        assert (ROOT / name / module).exists(), f"gateway/{name}: names {module}, which is not there"


def test_the_frame_stays_small() -> None:
    top = [p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) < 15, top


def test_no_concern_imports_the_app_or_the_cli() -> None:
    for path in ROOT.rglob("*.py"):
        if path.parent == ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("gateway.app", "gateway.cli"):
                raise AssertionError(f"{path.relative_to(ROOT)} imports {node.module}")
