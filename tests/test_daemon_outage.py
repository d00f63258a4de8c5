"""The whole daemon through an InfluxDB outage: ``cellwatch run`` replays a recording into InfluxDB,
InfluxDB is stopped mid-replay and started again, and the stored series equals a clean run's, point for
point (timestamps, tags and fields of every anomaly score, every alert and every alert's localization
map).

The sink-level version of this (tests/test_influx_sink.py) drives InfluxSink directly; here the real
daemon process does everything: scoring, alerting, spooling to disk while InfluxDB is down, retrying,
and draining the spool before it exits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from daemons import Daemon
from services import InfluxServer, wait_until

from daemon.sinks.spool import Spool

START = "2024-05-01T06:00:00Z"  # fixed, so two runs of the same recording give the same timestamps

pytestmark = pytest.mark.slow


def daemon_config(
    tmp_path: Path, cell: Path, model: Path, influx_url: str, database: str, speed: float
) -> dict:
    return {
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
        "state_dir": str(tmp_path),
        "stop_drain_s": 120,  # at the end of the replay, wait for InfluxDB and drain the spool
    }


def finish(daemon: Daemon, timeout: float) -> None:
    """The replay ends by itself: wait for a clean exit."""
    assert daemon.proc is not None
    try:
        daemon.proc.wait(timeout=timeout)
    finally:
        daemon.kill()
    assert daemon.proc.returncode == 0, daemon.log_tail()


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
    # ~36 test cycles of ~12 s at 40x real time: about 11 s of replay, long enough to stop InfluxDB in
    outage = Daemon(tmp_path, "outage", daemon_config(tmp_path, cell, model, influx.url, "outage_a", 40))
    try:
        outage.start()
        wait_until(lambda: landed(influx, "outage_a") >= 3, 120, "the first scores in InfluxDB")
        before_outage = landed(influx, "outage_a")
        influx.stop()
        assert outage.alive, "the replay ended before the outage began"
        scored_at_outage = outage.metric("cellwatch_windows_scored_total")

        def spooled_during_outage() -> bool:
            scored = outage.metric("cellwatch_windows_scored_total")
            spooled = outage.metric("cellwatch_spool_bytes")
            retries = outage.metric("cellwatch_sink_retries_total")
            return scored >= scored_at_outage + 3 and spooled > 0 and retries > 0

        wait_until(spooled_during_outage, 60, "three more scores, spooled and retried while InfluxDB is down")
        influx.start()
        finish(outage, timeout=180)  # the daemon drains its spool before exiting
    finally:
        outage.kill()
        if not influx.ping():  # the session's InfluxDB must be up again for later tests
            influx.start()
    with Spool(tmp_path / "spool-outage_a") as spool:
        assert spool.pending_bytes == 0  # everything spooled during the outage went out before the exit
    assert not (tmp_path / "spool-outage_a" / "rejected").exists()
    logs = [json.loads(line) for line in outage.stderr.read_text().splitlines()]
    assert any(r["msg"].startswith("InfluxDB write failed") for r in logs)  # the outage was visible

    # a clean run of the same recording, at full speed, into its own database
    clean = Daemon(
        tmp_path, "clean", daemon_config(tmp_path, cell, model, influx.url, "clean_b", float("inf"))
    )
    clean.start()
    finish(clean, timeout=180)

    for measurement in ("anomaly_score", "alert", "localization"):
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


def test_long_outage_with_a_full_spool_is_backpressure_not_a_stall(
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: once the spool was full the pipeline stopped "moving", the watchdog stopped being fed and
    systemd killed the daemon, again and again for as long as InfluxDB was down. Now: WATCHDOG=1 keeps
    coming while the delivery loop is alive and retrying, STATUS= says why the pipeline waits, and when
    InfluxDB is back everything scored is stored and the daemon stops cleanly on SIGTERM."""
    from test_systemd import FakeNotifySocket

    cell, model = tiny_cell_and_model
    database = "backpressure"
    influx.create_database(database)
    config = daemon_config(tmp_path, cell, model, influx.url, database, speed=20)  # ~22 s of replay
    # a 2 KiB spool (~10 points), and at most 2 points held in memory before it (batch_points)
    config["sinks"]["influxdb"] |= {"spool_max_mb": 0.002, "timeout_s": 1, "batch_points": 2}
    # every point also goes to a file sink, which appends: it counts what InfluxDB's merging of equal
    # timestamps would hide (a window scored twice)
    scores_file = tmp_path / "backpressure-scores.jsonl"
    config["sinks"]["file"] = {"path": str(scores_file)}
    fake = FakeNotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WATCHDOG=1 due every 0.5 s
    daemon = Daemon(tmp_path, "backpressure", config)

    def statuses() -> list[str]:
        return [m.removeprefix("STATUS=") for m in fake.drain() if m.startswith("STATUS=")]

    try:
        daemon.start()
        wait_until(lambda: landed(influx, database) >= 2, 120, "the first scores in InfluxDB")
        influx.stop()
        try:
            wait_until(
                lambda: any(s.startswith("backpressure") for s in statuses()), 60, "STATUS=backpressure"
            )
            assert daemon.alive
            fed = fake.count("WATCHDOG=1")  # the last points in memory (batch_points) fill, the scorer waits
            wait_until(lambda: fake.count("WATCHDOG=1") >= fed + 2, 30, "one more watchdog period")
            fed, scored = fake.count("WATCHDOG=1"), daemon.metric("cellwatch_windows_scored_total")
            wait_until(lambda: fake.count("WATCHDOG=1") >= fed + 6, 30, "three more watchdog periods")
            # the pipeline really was held (scoring stopped, windows waiting): only the sink's liveness
            # can have fed the watchdog
            assert daemon.metric("cellwatch_windows_scored_total") == scored
            assert daemon.metric("cellwatch_queue_depth") > 0
            assert daemon.metric("cellwatch_spool_full") == 1
        finally:
            influx.start()
        held = [s for s in statuses() if s.startswith("backpressure")]
        assert held[0].startswith("backpressure: InfluxDB unreachable (")
        assert held[0].endswith(", spool full 2.0 KiB")
        wait_until(lambda: statuses()[-1].startswith("scoring "), 60, "STATUS= back to normal")
        assert daemon.stop(timeout=120) == 0  # SIGTERM: drains what is left and exits cleanly
    finally:
        daemon.kill()
        fake.close()
        if not influx.ping():
            influx.start()
    summary = (tmp_path / "backpressure.out").read_text()
    match = re.search(r"scored (\d+) windows from (\d+) cycles", summary)
    assert match, summary
    scored_total = int(match.group(1))
    assert scored_total > scored  # it went on after the outage
    cycles = [row[1] for row in influx.series('SELECT "cycle" FROM "anomaly_score"', database)]
    assert len(cycles) == scored_total  # every window scored is stored
    assert sorted(cycles) == sorted(set(cycles))
    lines = [json.loads(line) for line in scores_file.read_text().splitlines()]
    written = [p["cycle"] for p in lines if p["measurement"] == "anomaly_score"]
    assert sorted(written) == sorted(cycles)  # and each was written once: none scored twice
    logs = [json.loads(line)["msg"] for line in daemon.stderr.read_text().splitlines()]
    assert any(m.startswith("InfluxDB reachable again after ") for m in logs)
    assert "spool drained" in logs
    assert not any("still spooled" in m for m in logs)
    with Spool(tmp_path / f"spool-{database}") as spool:
        assert spool.pending_bytes == 0
