"""The README documents what the code does: every metric the daemon exposes is in its metric table,
and every command the CLI registers is in its command table."""

from __future__ import annotations

import re
from pathlib import Path

from daemon.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_metric_in_the_code_is_in_the_readme() -> None:
    names: set[str] = set()
    for folder in ("daemon", "ingest"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r'"(cellwatch_[a-z0-9_]+)"', path.read_text()))
    assert len(names) > 20  # the search found the metrics
    missing = sorted(n for n in names if f"`{n}" not in README)
    assert not missing, f"metrics missing from the README's metric table: {missing}"


def test_every_command_is_in_the_readme() -> None:
    missing = [name for name in COMMANDS if f"`cellwatch {name}" not in README]
    assert not missing, f"commands missing from the README's command table: {missing}"
