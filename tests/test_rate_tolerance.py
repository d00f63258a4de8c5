"""Real recordings are not exactly on the nominal clock (voraus-AD 100 Hz: 10.07 ms median step, 99.3 Hz):
training and replay go by the nominal rate within a documented tolerance, and refuse a file outside it
with a message naming both rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from parquet_damage import jitter_time

from daemon.cli import main


@pytest.fixture(scope="module")
def jittered_and_20hz_model(
    tiny_cell_and_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The tiny cell with a real recording's clock, and a 20 Hz model (rate divider 5) trained on it."""
    cell, _ = tiny_cell_and_model
    root = tmp_path_factory.mktemp("jitter")
    real = jitter_time(cell, root / "real.parquet", step_s=0.01007)
    model = root / "model20"
    argv = ["train", "--data", str(real), "--out", str(model), "--rate-divider", "5", "--epochs", "1"]
    assert main([*argv, "--device", "cpu"]) == 0
    return real, model


def test_a_model_trained_on_a_jittered_file_records_the_nominal_rate(
    jittered_and_20hz_model: tuple[Path, Path],
) -> None:
    _, model = jittered_and_20hz_model
    card = json.loads((model / "model.json").read_text())
    assert card["rate_hz"] == 20  # 100 Hz nominal / 5, not 99.3 / 5
    assert card["training"]["source_rate_hz"] == 100


def test_replay_of_a_99_3_hz_file_with_a_20_hz_model_runs(
    jittered_and_20hz_model: tuple[Path, Path], tmp_path: Path
) -> None:
    real, model = jittered_and_20hz_model
    out = tmp_path / "out.jsonl"
    assert main(["replay", str(real), "--model", str(model), "--speed", "1e6", "--out", str(out)]) == 0
    scores = [x for x in map(json.loads, out.read_text().splitlines()) if x["measurement"] == "anomaly_score"]
    assert len(scores) == 36  # every test cycle of the 60-cycle plan is scored


def test_a_90_hz_file_is_refused_naming_both_rates(
    jittered_and_20hz_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real, model = jittered_and_20hz_model
    slow = jitter_time(real, tmp_path / "slow.parquet", step_s=1 / 90)
    out = tmp_path / "out.jsonl"
    assert main(["replay", str(slow), "--model", str(model), "--speed", "1e6", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "sampling rate 90 Hz (nominal 90 Hz)" in err
    assert "model's 20 Hz × divider 5 = 100 Hz" in err
    assert "±2%" in err
    assert not out.exists() or not out.read_text()
