"""`cellwatch check`: the config, the model, the files and every service, checked without starting, against
the real services (InfluxDB, Tansu, Mosquitto) and a real model; the exit status says what to do next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from brokers import MosquittoServer, SecureMosquittoServer, TansuServer
from services import InfluxServer, free_port

CELLWATCH = Path(sys.executable).parent / "cellwatch"


def check(
    config: dict[str, Any], tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[int, Any]:
    path = tmp_path / "cellwatch.yaml"
    path.write_text(yaml.safe_dump(config))
    environ = {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")}
    result = subprocess.run(
        [str(CELLWATCH), "check", "--config", str(path), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**environ, **(env or {})},
    )
    assert result.stdout, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["exit_status"] == result.returncode
    return result.returncode, {c["check"]: c for c in report["checks"]}


def failed(checks: dict[str, Any]) -> dict[str, Any]:
    return {name: c for name, c in checks.items() if not c["ok"]}


@pytest.fixture(scope="module")
def topic(tansu: TansuServer) -> str:
    tansu.create_topic("check-signals", 1)
    return "check-signals"


@pytest.fixture
def everything(
    tiny_cell_and_model: tuple[Path, Path],
    influx: InfluxServer,
    tansu: TansuServer,
    topic: str,
    mosquitto: MosquittoServer,
    tmp_path: Path,
) -> dict[str, Any]:
    """A config naming every kind of source and sink, all of them up."""
    cell, model = tiny_cell_and_model
    influx.create_database("checked")
    return {
        "sources": [
            {"type": "voraus_replay", "robot": "r1", "path": str(cell)},
            {"type": "kafka", "bootstrap": [tansu.bootstrap], "topic": topic, "group": "g"},
            {"type": "mqtt", "host": "127.0.0.1", "port": mosquitto.port, "client_id": "cw-check-test"},
        ],
        "model": {"path": str(model)},
        "sinks": {
            "influxdb": {"url": influx.url, "database": "checked", "spool_dir": str(tmp_path / "spool")},
            "file": {"path": str(tmp_path / "out" / "scores.jsonl")},
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port},
            "kafka": {"bootstrap": [tansu.bootstrap]},
        },
    }


def test_everything_up_passes_and_writes_nothing(
    everything: dict[str, Any], influx: InfluxServer, tmp_path: Path
) -> None:
    status, checks = check(everything, tmp_path)
    assert status == 0, failed(checks)
    assert all(c["ok"] for c in checks.values())
    names = " ".join(checks)
    for part in ("config", "model", "voraus_replay r1", "kafka", "mqtt", "sinks.influxdb", "sinks.file.path"):
        assert part in names
    assert "signals match the model" in checks["sources[0] voraus_replay r1"]["detail"]
    assert "database checked exists" in checks[f"sinks.influxdb {influx.url}"]["detail"]
    assert "check-signals exist" in next(c["detail"] for n, c in checks.items() if n.startswith("sources[1]"))
    # the check stored nothing and created nothing
    assert influx.series("SHOW MEASUREMENTS", "checked") == []
    assert not (tmp_path / "spool").exists()
    assert not (tmp_path / "out").exists()


def test_a_bad_field_is_a_config_error_naming_the_field(everything: dict[str, Any], tmp_path: Path) -> None:
    everything["scoring"] = {"batch": 0}
    status, checks = check(everything, tmp_path)
    assert status == 2
    assert list(checks) == ["config"]  # nothing else is tried on a config that does not parse
    assert "scoring.batch" in checks["config"]["detail"]
    assert "(got 0)" in checks["config"]["detail"]


def test_model_and_file_errors_are_config_errors(everything: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "not-a-model").mkdir()
    everything["model"] = {"path": str(tmp_path / "not-a-model")}
    status, checks = check(everything, tmp_path)
    assert status == 2
    assert set(failed(checks)) == {"model"}
    assert "not a cellwatch model" in checks["model"]["detail"]

    everything["model"] = {"path": str(Path(everything["sources"][0]["path"]).parent / "model")}
    everything["sources"][0]["path"] = str(tmp_path / "missing.parquet")
    status, checks = check(everything, tmp_path)
    assert status == 2
    assert set(failed(checks)) == {"sources[0] voraus_replay r1"}
    assert "missing.parquet" in checks["sources[0] voraus_replay r1"]["detail"]


def test_a_missing_database_is_a_config_error(
    everything: dict[str, Any], influx: InfluxServer, tmp_path: Path
) -> None:
    everything["sinks"]["influxdb"]["database"] = "never-created"
    status, checks = check(everything, tmp_path)
    assert status == 2
    [(name, result)] = failed(checks).items()
    assert name == f"sinks.influxdb {influx.url}"
    assert "database never-created does not exist" in result["detail"]


def test_services_that_cannot_be_reached_exit_75_naming_each(
    tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    _, model = tiny_cell_and_model
    kafka_port, mqtt_port, influx_port = free_port(), free_port(), free_port()  # nothing listens there
    config = {
        "sources": [
            {"type": "kafka", "bootstrap": [f"127.0.0.1:{kafka_port}"], "topic": "t"},
            {"type": "mqtt", "host": "127.0.0.1", "port": mqtt_port},
        ],
        "model": {"path": str(model)},
        "sinks": {"influxdb": {"url": f"http://127.0.0.1:{influx_port}", "spool_dir": str(tmp_path / "s")}},
    }
    status, checks = check(config, tmp_path, "--timeout", "2")
    assert status == 75
    bad = failed(checks)
    assert set(bad) == {
        f"sources[0] kafka 127.0.0.1:{kafka_port}",
        f"sources[1] mqtt 127.0.0.1:{mqtt_port}",
        f"sinks.influxdb http://127.0.0.1:{influx_port}",
    }
    assert {c["kind"] for c in bad.values()} == {"unreachable"}
    assert all(c["ok"] for name, c in checks.items() if name not in bad)  # config and model are fine


def test_a_stopped_broker_exits_75(tiny_cell_and_model: tuple[Path, Path], tmp_path: Path) -> None:
    _, model = tiny_cell_and_model
    with MosquittoServer(tmp_path / "mosquitto") as broker:
        config = {
            "sources": [{"type": "mqtt", "host": "127.0.0.1", "port": broker.port}],
            "model": {"path": str(model)},
        }
        status, _ = check(config, tmp_path)
        assert status == 0
    status, checks = check(config, tmp_path)
    assert status == 75
    assert "cannot connect" in checks[f"sources[0] mqtt 127.0.0.1:{broker.port}"]["detail"]


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMosquittoServer]:
    with SecureMosquittoServer(tmp_path_factory.mktemp("secure"), {"cw": "right-one"}) as server:
        yield server


def test_credentials_are_read_from_the_install_layout_and_checked_by_the_broker(
    tiny_cell_and_model: tuple[Path, Path], secure_broker: SecureMosquittoServer, tmp_path: Path
) -> None:
    """CONFIG_DIR/credentials (where install-service puts them) stands in for $CREDENTIALS_DIRECTORY."""
    _, model = tiny_cell_and_model
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "mqtt-password").write_text("right-one\n")
    config = {
        "sources": [
            {
                "type": "mqtt",
                "host": "127.0.0.1",
                "port": secure_broker.port,
                "username": "cw",
                "password": {"file": "mqtt-password"},
                "tls": {"ca_file": str(secure_broker.ca)},
            }
        ],
        "model": {"path": str(model)},
    }
    status, checks = check(config, tmp_path)
    assert status == 0, failed(checks)
    assert "mqtt-password" in checks["sources[0].password"]["detail"]
    assert "right-one" not in json.dumps(checks)  # the secret itself is never shown

    (credentials / "mqtt-password").write_text("wrong-one\n")
    status, checks = check(config, tmp_path)
    assert status == 2  # a wrong password is the config's fault: retrying will not help
    assert "refused" in checks[f"sources[0] mqtt 127.0.0.1:{secure_broker.port}"]["detail"]

    (credentials / "mqtt-password").unlink()
    status, checks = check(config, tmp_path)
    assert status == 2
    assert not checks["sources[0].password"]["ok"]
    assert "mqtt-password" in checks["sources[0].password"]["detail"]
