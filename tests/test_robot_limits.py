"""Bounded state per robot. Robot ids come from MQTT topics and Kafka keys, which anyone on the bus
can make up: each new id costs a windower, an alert tracker and InfluxDB series. An allow-list and
`max_robots` bound them (others rejected with a reason and counted), and a robot that falls silent in
the middle of a cycle is forgotten after `idle_timeout_s`, its unfinished cycle rejected and its
messages acknowledged, instead of being held (with its acks) forever."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoServer
from daemons import Daemon
from services import InfluxServer, wait_until
from test_stream_ingest import T0, config, mqtt_source, stored, unique, wait_stored

from ingest.loadgen import Target, plan, publish

pytestmark = pytest.mark.slow


def send(url: str, batches: list[Any]) -> None:
    asyncio.run(publish(Target.parse(url), iter(batches), speed=math.inf))


def test_unknown_robots_and_one_too_many_are_rejected_and_counted(
    mosquitto: MosquittoServer, influx: InfluxServer, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    cell, model = tiny_cell_and_model
    prefix, db = unique("cell"), unique("limits")
    cfg = config(model, influx, db, tmp_path, mqtt_source(mosquitto, prefix, unique("cw")))
    cfg["robots"] = {"allow": ["arm-1", "arm-2", "arm-3"], "max_robots": 2}
    daemon = Daemon(tmp_path, "d", cfg).start()
    try:
        url = f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals"
        send(url, list(plan(cell, ["arm-1", "arm-2"], start_ns=T0, max_cycles=2)))
        wait_stored(influx, db, 4, 60, [daemon])  # two cycles of each allowed robot
        send(url, list(plan(cell, ["intruder", "arm-3"], start_ns=T0, max_cycles=1)))
        wait_until(
            lambda: (
                daemon.metric("cellwatch_rejects_total", reason="robot_not_allowed") > 0
                and daemon.metric("cellwatch_rejects_total", reason="too_many_robots") > 0
                and daemon.metric("cellwatch_source_unacked") == 0
            ),
            60,
            "the intruder and the third robot rejected, their messages acknowledged",
        )
        assert {robot for robot, _ in stored(influx, db)} == {"arm-1", "arm-2"}
        assert daemon.metric("cellwatch_robots") == 2
        assert daemon.metric("cellwatch_cycles_in_total") == 4  # streams count their cycles too
        assert daemon.alive
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_a_robot_silent_mid_cycle_is_forgotten_and_its_messages_released(
    mosquitto: MosquittoServer, influx: InfluxServer, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    cell, model = tiny_cell_and_model
    prefix, db = unique("cell"), unique("idle")
    cfg = config(model, influx, db, tmp_path, mqtt_source(mosquitto, prefix, unique("cw")))
    cfg["robots"] = {"idle_timeout_s": 1.0}
    daemon = Daemon(tmp_path, "d", cfg).start()
    try:
        batches = list(plan(cell, ["arm-1"], start_ns=T0, max_cycles=2))
        ends = [i for i, b in enumerate(batches) if b.cycle_end]
        # the first cycle whole, then the second without its last message: its end never comes
        sent = batches[: ends[1]]
        assert not sent[-1].cycle_end
        send(f"mqtt://127.0.0.1:{mosquitto.port}/{prefix}/+/signals", sent)
        wait_stored(influx, db, 1, 60, [daemon])
        wait_until(
            lambda: (
                daemon.metric("cellwatch_rejects_total", reason="cycle_timeout") == 1
                and daemon.metric("cellwatch_source_unacked") == 0
            ),
            60,
            "the unfinished cycle rejected after 1 s of silence and its messages acknowledged",
        )
        assert daemon.metric("cellwatch_robots_retired_total") == 1
        assert daemon.metric("cellwatch_robots") == 0
        assert len(stored(influx, db)) == 1  # the unfinished cycle is not scored as if it were whole
        assert daemon.stop() == 0
    finally:
        daemon.kill()
