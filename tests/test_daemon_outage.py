"""The whole daemon through an InfluxDB outage: ``cellwatch run`` replays a recording into InfluxDB,
InfluxDB is stopped mid-replay and started again, and the stored series equals a clean run's, point for
point (timestamps, tags and fields of every anomaly score and every alert).

The sink-level version of this (tests/test_influx_sink.py) drives InfluxSink directly; here the real
daemon process does everything: scoring, alerting, spooling to disk while InfluxDB is down, retrying,
and draining the spool before it exits.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from services import InfluxServer, free_port, wait_until

from daemon.sinks.spool import Spool

CELLWATCH = Path(sys.executable).parent / "cellwatch"
START = "2024-05-01T06:00:00Z"  # fixed, so two runs of the same recording give the same timestamps

pytestmark = pytest.mark.slow


def write_config(
    tmp_path: Path, cell: Path, model: Path, influx_url: str, database: str, speed: float, port: int
) -> Path:
    config = {
        "sources": [
            {"type": "voraus_replay", "robot": "r1", "path": str(cell), "speed": speed, "start": START}
        ],
        "model": {"path": str(model)},
        # one window per inference batch: the scores cannot depend on how windows happened to be batched
        "scoring": {"batch": 1, "max_wait_ms": 0},
        "sinks": {
            "influxdb": {
                "url": influx_url,
                "database": database,
                "flush_interval_ms": 20,  # points land live, not at the end of the replay
                "spool_dir": str(tmp_path / f"spool-{database}"),
                "timeout_s": 2,
            }
        },
        "metrics": {"listen": f"127.0.0.1:{port}"},
        "state_dir": str(tmp_path),
        "stop_drain_s": 120,  # at the end of the replay, wait for InfluxDB and drain the spool
    }
    path = tmp_path / f"{database}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_daemon(config: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    stdout, stderr = config.with_suffix(".out"), config.with_suffix(".err")  # files: a pipe could fill up
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [str(CELLWATCH), "--log-format", "json", "run", "--config", str(config)], stdout=out, stderr=err
        )
    return proc, stdout, stderr


def finish(proc: subprocess.Popen[bytes], stderr: Path, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.read_text()[-3000:]


def metric(port: int, name: str) -> float | None:
    """One sample of the daemon's Prometheus endpoint (None while it is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def stored(influx: InfluxServer, database: str, measurement: str) -> tuple[list[str], list[list[Any]]]:
    """Every point of a measurement: the column names (time, fields and tags) and the rows, by time."""
    result = influx.query(f'SELECT * FROM "{measurement}" ORDER BY time', database)["results"][0]
    assert "error" not in result, result
    if not result.get("series"):
        return [], []
    [series] = result["series"]
    return list(series["columns"]), list(series["values"])


def landed(influx: InfluxServer, database: str) -> int:
    rows = influx.series('SELECT count("score") FROM "anomaly_score"', database)
    return int(rows[0][1]) if rows else 0


def test_influx_outage_mid_replay_loses_nothing(
    influx: InfluxServer, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    cell, model = tiny_cell_and_model
    for database in ("outage_a", "clean_b"):
        influx.create_database(database)
    port = free_port()
    # ~36 test cycles of ~12 s at 40x real time: about 11 s of replay, long enough to stop InfluxDB in
    proc, _, stderr = start_daemon(write_config(tmp_path, cell, model, influx.url, "outage_a", 40, port))
    try:
        wait_until(lambda: landed(influx, "outage_a") >= 3, 120, "the first scores in InfluxDB")
        before_outage = landed(influx, "outage_a")
        influx.stop()
        assert proc.poll() is None, "the replay ended before the outage began"
        scored_at_outage = metric(port, "cellwatch_windows_scored_total") or 0

        def spooled_during_outage() -> bool:
            scored = metric(port, "cellwatch_windows_scored_total") or 0
            spooled = metric(port, "cellwatch_spool_bytes") or 0
            retries = metric(port, "cellwatch_sink_retries_total") or 0
            return scored >= scored_at_outage + 3 and spooled > 0 and retries > 0

        wait_until(spooled_during_outage, 60, "three more scores, spooled and retried while InfluxDB is down")
        influx.start()
        finish(proc, stderr, timeout=180)  # the daemon drains its spool before exiting
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not influx.ping():  # the session's InfluxDB must be up again for later tests
            influx.start()
    with Spool(tmp_path / "spool-outage_a") as spool:
        assert spool.pending_bytes == 0  # everything spooled during the outage went out before the exit
    assert not (tmp_path / "spool-outage_a" / "rejected").exists()
    logs = [json.loads(line) for line in stderr.read_text().splitlines()]
    assert any(r["msg"].startswith("InfluxDB write failed") for r in logs)  # the outage was visible

    # a clean run of the same recording, at full speed, into its own database
    clean, _, clean_err = start_daemon(
        write_config(tmp_path, cell, model, influx.url, "clean_b", float("inf"), free_port())
    )
    finish(clean, clean_err, timeout=180)

    for measurement in ("anomaly_score", "alert"):
        columns_a, rows_a = stored(influx, "outage_a", measurement)
        columns_b, rows_b = stored(influx, "clean_b", measurement)
        assert columns_a == columns_b
        assert len(rows_a) == len(rows_b)
        for a, b in zip(rows_a, rows_b, strict=True):
            assert dict(zip(columns_a, a, strict=True)) == dict(zip(columns_b, b, strict=True))
    columns, rows = stored(influx, "clean_b", "anomaly_score")
    assert len(rows) >= 30  # every test cycle of the recording was scored and stored
    assert before_outage < len(rows)  # InfluxDB went down mid-replay, not after it
    assert {"time", "score", "is_anomaly", "cycle", "robot", "model", "mode"} <= set(columns)
    assert stored(influx, "clean_b", "alert")[1], "the comparison covered no alert"
