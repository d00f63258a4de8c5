"""The whole recording path: `cellwatch synth --pcap` writes the simulated cell as the EtherCAT capture of its
bus (a 1 kHz-class bus, both copies of every frame as captured at the master, a realistic process image at
integer encodings) with its ENI and YAML maps, and the daemon replaying that capture scores each cycle as it
scores the parquet file of the same cycles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from daemon.cli import main


def scores(tmp_path: Path, name: str, source: dict[str, Any], model: Path) -> dict[int, dict[str, Any]]:
    out = tmp_path / f"{name}.jsonl"
    config = {
        "sources": [source],
        "model": {"path": str(model)},
        "scoring": {"batch": 8, "max_wait_ms": 5, "device": "cpu"},
        "sinks": {"file": {"path": str(out)}},
        "metrics": {"listen": None},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    rows = [x for x in lines if x["measurement"] == "anomaly_score"]
    by_cycle = {r["cycle"]: r for r in rows}
    assert len(by_cycle) == len(rows), "a cycle scored twice"
    return by_cycle


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bus")
    argv = ["synth", "--out", str(root / "cell.parquet"), "--cycles", "10", "--seed", "4"]
    assert main([*argv, "--pcap", str(root / "bus.pcapng"), "--bus-hz", "200"]) == 0
    return root


def test_the_synthetic_capture_comes_with_its_maps(capture: Path) -> None:
    for name in ("bus.pcapng", "bus.eni.xml", "bus.map.yaml", "bus.eni-map.yaml"):
        assert (capture / name).stat().st_size > 0, name


@pytest.mark.parametrize("map_name", ["bus.map.yaml", "bus.eni-map.yaml"])
def test_a_bus_capture_scores_as_the_parquet_file_of_the_same_cycles(
    capture: Path, map_name: str, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    _, model = tiny_cell_and_model
    parquet = scores(
        tmp_path,
        "parquet",
        {
            "type": "voraus_replay",
            "robot": "r1",
            "path": str(capture / "cell.parquet"),
            "speed": 1e9,
            "test_split_only": False,
        },
        model,
    )
    bus = scores(
        tmp_path,
        "bus",
        {
            "type": "ethercat",
            "robot": "r1",
            "capture": str(capture / "bus.pcapng"),
            "map": str(capture / map_name),
            "speed": 1e9,
        },
        model,
    )
    # every cycle but the capture's last, whose end the bus never shows (a capture stops mid-cycle)
    last = max(parquet)
    assert sorted(bus) == sorted(c for c in parquet if c != last)
    got = np.array([bus[c]["score"] for c in sorted(bus)])
    want = np.array([parquet[c]["score"] for c in sorted(bus)])
    # the bus carries integers (positions at 0.1 µrad, targets at 1e-6): the flow's part of the score
    # agrees to about 1e-4; the fused score, whose local residual measures exact relations between
    # signals (at a floor of 1e-3 of a signal's spread), to about 1e-2 or 0.05 normal spreads
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=0.05)
    nll = "part_nll"
    span = np.array([abs(parquet[c][nll]) for c in sorted(bus)]) + 1.0
    assert np.all(np.abs([bus[c][nll] - parquet[c][nll] for c in sorted(bus)]) <= 5e-3 * span)
    assert [bus[c]["is_anomaly"] for c in sorted(bus)] == [parquet[c]["is_anomaly"] for c in sorted(bus)]


def test_a_map_that_does_not_fit_the_capture_fails_at_start_naming_the_signal(
    capture: Path, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signal at a logical address no datagram of the bus covers is a config error (exit 2, no restart
    loop), found when the first process data arrives, before anything is scored."""
    _, model = tiny_cell_and_model
    text = (capture / "bus.map.yaml").read_text()
    wrong = tmp_path / "wrong.map.yaml"
    wrong.write_text(text + "  - {name: extra_signal, address: 0x00090000, type: int32}\n")
    config = {
        "sources": [
            {"type": "ethercat", "capture": str(capture / "bus.pcapng"), "map": str(wrong), "speed": 1e9}
        ],
        "model": {"path": str(model)},
        "sinks": {"file": {"path": str(tmp_path / "scores.jsonl")}},
        "metrics": {"listen": None},
    }
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "extra_signal" in err
    assert (
        not (tmp_path / "scores.jsonl").exists()
        or "anomaly_score" not in (tmp_path / "scores.jsonl").read_text()
    )
