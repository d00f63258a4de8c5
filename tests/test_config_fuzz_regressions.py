"""Configs that the fuzz campaign (benchmarks/fuzz_decoders.py) found to escape `load_config` with
an exception other than ConfigError: each must be one clear ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config

BASE = "sources:\n  - type: voraus_replay\n    robot: r1\n    path: cell.parquet\nmodel:\n  path: model\n"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("alerts:\n  k: 2026-13-45\n", "not valid YAML: ValueError: month must be in 1..12"),  # a date
        ("alerts:\n  k: !!float x\n", "not valid YAML: ValueError"),
        ("alerts:\n  k: !!int x\n", "not valid YAML: ValueError"),
        ("alerts:\n  k: !!timestamp x\n", "not valid YAML: AttributeError"),
        ("alerts:\n  k: !!int ''\n", "not valid YAML: IndexError"),  # 13 of 1,000,000 inputs
        ("alerts:\n  k: !!float ''\n", "not valid YAML: IndexError"),
        ("alerts:\n  k: !!int '-'\n", "not valid YAML: IndexError"),
        ("alerts:\n  k: !!bool x\n", "not valid YAML: KeyError"),
        ("alerts: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML: RecursionError"),
    ],
)
def test_malformed_typed_scalars_and_deep_nesting_are_config_errors(
    tmp_path: Path, extra: str, expected: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + extra)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"not UTF-8 text \(byte {len(BASE) + 5}\)"):
        load_config(path)
