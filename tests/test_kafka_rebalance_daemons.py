"""Two real daemons in one Kafka group, the first one's pipeline stalled, a rebalance forced by the
second joining: backpressure holds across the rebalance (the stalled daemon stays paused, its
fetched-but-unscored queue stays bounded), what it had fetched from the partitions it lost is dropped
instead of being scored twice, and the second daemon scores the partitions it took over, each window
once. (The source-level mechanics are in test_kafka_source.py; this is the same through the daemon.)"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from brokers import TansuServer
from daemons import Daemon
from services import InfluxServer, free_port, wait_until
from test_stream_ingest import (
    T0,
    config,
    expected_windows,
    kafka_source,
    unique,
    with_scores_file,
    written,
)

from ingest.loadgen import Target, plan, publish, robot_ids

pytestmark = pytest.mark.slow
QUEUE = 40  # queue_messages: paused at 30 fetched, one fetch (10) beyond at most


def test_backpressure_holds_across_a_rebalance_between_two_daemons(
    tansu: TansuServer, influx: InfluxServer, tiny_cell_and_model: tuple[Path, Path], tmp_path: Path
) -> None:
    cell, model = tiny_cell_and_model
    topic, db, group = unique("signals"), unique("rebalance"), unique("g")
    tansu.create_topic(topic, 4)
    robots = robot_ids(8)
    batches = list(plan(cell, robots, start_ns=T0, max_cycles=10))
    asyncio.run(publish(Target.parse(f"kafka://{tansu.bootstrap}/{topic}"), iter(batches), speed=math.inf))
    expected = expected_windows(cell, robots, max_cycles=10)

    source = kafka_source(tansu, topic, group, queue_messages=QUEUE, session_timeout_ms=3000)
    # the first daemon writes to an InfluxDB that is not there, through a tiny spool: its pipeline
    # stalls (backpressure) after a few windows, and its source must pause
    stalled = config(model, influx, db, tmp_path, source)
    stalled["sinks"]["influxdb"] = {
        **stalled["sinks"]["influxdb"],
        "url": f"http://127.0.0.1:{free_port()}",
        "spool_max_mb": 0.002,
        "spool_dir": str(tmp_path / "spool-stalled"),
        "create_database": False,
    }
    stalled["scoring"] = {"batch": 1, "max_wait_ms": 0}
    first = Daemon(tmp_path, "first", with_scores_file(stalled, tmp_path / "first.jsonl"))
    healthy = with_scores_file(config(model, influx, db, tmp_path, source), tmp_path / "second.jsonl")
    second = Daemon(tmp_path, "second", healthy)
    try:
        first.start()
        wait_until(lambda: first.metric("cellwatch_source_paused") == 1, 90, "the stalled daemon to pause")
        assert first.metric("cellwatch_source_queued") <= QUEUE
        second.start()
        wait_until(
            lambda: (
                second.metric("cellwatch_kafka_assigned_partitions") >= 1
                and first.metric("cellwatch_kafka_rebalances_total") >= 1
            ),
            90,
            "the rebalance",
        )
        # the second daemon scores the partitions it took over; meanwhile the first stays paused and
        # bounded, also for the partitions it was given afresh
        wait_until(lambda: sum(written(tmp_path / "second.jsonl").values()) >= 10, 90, "the second's scores")
        wait_until(lambda: first.metric("cellwatch_source_paused") == 1, 30, "the first paused again")
        assert first.metric("cellwatch_source_queued") <= QUEUE
        assert first.metric("cellwatch_kafka_revoked_dropped_total") > 0  # lost partitions: not scored
        held = first.metric("cellwatch_kafka_assigned_partitions")
        assert held + second.metric("cellwatch_kafka_assigned_partitions") == 4
        assert first.alive
        assert second.alive
        assert second.stop() == 0
        assert first.stop() == 0  # a full spool does not hold the drain hostage
    finally:
        first.kill()
        second.kill()
    got = written(tmp_path / "second.jsonl")
    assert set(got) <= set(expected)
    twice = {k: n for k, n in got.items() if n > 1}
    assert not twice, f"the second daemon wrote {len(twice)} windows twice"
