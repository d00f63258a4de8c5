"""The flow stays one-way: models (flows/) never import the daemon or the adapters, adapters (ingest/)
never import the daemon. Checked on the source, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
RULES = {"flows": ("daemon", "ingest"), "ingest": ("daemon",)}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_does_not_import_downstream(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) & set(RULES[package]))
        for f in files
        if imported_packages(f) & set(RULES[package])
    }
    assert offenders == {}
