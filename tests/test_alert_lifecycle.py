"""The alert lifecycle end to end (Alertmanager's model): an alert is reported `firing` as soon as it
opens, updated while it lasts, and `resolved` when it ends, under one id, in the file sink and in the
real InfluxDB. A fault that persists (every cycle anomalous) must not wait for its end to be seen."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from daemons import Daemon
from services import InfluxServer, wait_until

from ingest.voraus.reader import VorausReader

pytestmark = pytest.mark.slow


def every_test_cycle_faulty(cell: Path, out: Path) -> list[int]:
    """A copy of `cell` whose test cycles all have a stuck offset on one motor current (a loose cable
    or a drifting sensor: anomalous from start to end); returns the test cycles' ids."""
    table = pq.read_table(cell)
    with VorausReader(cell, ["motor_iq_2"]) as reader:
        test = [c.sample for c in reader.cycles() if not c.is_train]
    samples = table.column("sample").to_numpy()
    name = "motor_iq_2"
    values = table.column(name).to_numpy().copy()
    faulty = np.isin(samples, test)
    values[faulty] += 30 * values.std()
    pq.write_table(table.set_column(table.column_names.index(name), name, [values]), out)
    return test


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_persisting_fault_fires_long_before_the_stream_ends(
    tiny_cell_and_model: tuple[Path, Path], influx: InfluxServer, tmp_path: Path
) -> None:
    cell, model = tiny_cell_and_model
    faulty = tmp_path / "faulty.parquet"
    test_cycles = every_test_cycle_faulty(cell, faulty)
    influx.create_database("lifecycle")
    scores = tmp_path / "scores.jsonl"
    config = {
        "sources": [
            {
                "type": "voraus_replay",
                "robot": "r1",
                "path": str(faulty),
                "speed": 40,
                "start": "2026-01-01T00:00:00Z",
            }
        ],
        "model": {"path": str(model)},
        "scoring": {"batch": 1, "max_wait_ms": 0},
        "alerts": {"update_interval_s": 30},
        "sinks": {
            "influxdb": {
                "url": influx.url,
                "database": "lifecycle",
                "spool_dir": str(tmp_path / "spool"),
                "flush_interval_ms": 50,
            },
            "file": {"path": str(scores)},
        },
    }
    daemon = Daemon(tmp_path, "d", config).start()
    try:

        def firing() -> list[dict[str, Any]]:
            return [x for x in lines(scores) if x["measurement"] == "alert" and x["state"] == "firing"]

        wait_until(lambda: bool(firing()) or not daemon.alive, 120, "a firing alert")
        assert daemon.alive, daemon.log_tail()
        scored = [x for x in lines(scores) if x["measurement"] == "anomaly_score"]
        assert len(scored) < len(test_cycles) / 2  # long before the stream ends
        first = firing()[0]
        # within one window of the crossing: the first anomalous window opens it (k = n = 1)
        first_anomalous = next(x for x in scored if x["is_anomaly"])
        assert first["time_ns"] == first_anomalous["time_ns"]
        assert first["firing"] == 1
        # InfluxDB shows it firing while the fault lasts
        wait_until(
            lambda: influx.series('SELECT "state" FROM "alert"', "lifecycle") != [],
            30,
            "the alert in InfluxDB",
        )
        assert [r[1] for r in influx.series('SELECT "state" FROM "alert"', "lifecycle")] == ["firing"]
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=120) == 0  # the replay ends by itself
    finally:
        daemon.kill()

    records = lines(scores)
    alerts = [x for x in records if x["measurement"] == "alert"]
    assert len({a["alert_id"] for a in alerts}) == 1  # one fault, one alert, one id throughout
    states = [a["state"] for a in alerts]
    assert states[-1] == "resolved"
    assert set(states[:-1]) == {"firing"}
    updates = alerts[1:-1]
    assert updates, "a long alert is updated while it lasts"
    # updates at most every update_interval_s of data time, each with the peak and cycles so far
    times = [a["updated_ns"] for a in alerts]
    assert all(b - a >= 30e9 for a, b in itertools.pairwise(times[:-1]))
    assert [a["peak_score"] for a in alerts] == sorted(a["peak_score"] for a in alerts)
    assert [a["cycle_count"] for a in alerts] == sorted(a["cycle_count"] for a in alerts)
    scored = [x for x in records if x["measurement"] == "anomaly_score"]
    assert [x["cycle"] for x in scored] == test_cycles
    assert alerts[-1]["cycle_count"] == sum(x["is_anomaly"] for x in scored)
    assert alerts[-1]["peak_score"] == pytest.approx(max(x["normalized_score"] for x in scored))
    # InfluxDB keeps one point per alert (at its start), now resolved, with the final figures
    rows = influx.series(
        'SELECT "alert_id", "state", "firing", "peak_score", "end_ns" FROM "alert"', "lifecycle"
    )
    assert len(rows) == 1
    _, alert_id, state, firing_flag, peak, end_ns = rows[0]
    assert (alert_id, state, firing_flag) == (alerts[-1]["alert_id"], "resolved", 0)
    assert peak == pytest.approx(alerts[-1]["peak_score"])
    assert end_ns == scored[-1]["time_ns"]
